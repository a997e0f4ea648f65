import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import train
from conftest import ROOT, fail_writes, hold_lock, run_torchrun, write_token_corpus
from nanosuno.baselines import unigram_kl, unigrams
from nanosuno.checkpoint import (checkpoint_path, load_checkpoint, make_checkpoint, model_from_checkpoint,
                                 save_checkpoint, with_resume_state)
from nanosuno.codec import load_codec
from nanosuno.common import UserError
from nanosuno.data import read_meta
from nanosuno.evaluate import split_losses
from nanosuno.generate import generate
from nanosuno.model import GPT, GPTConfig

# a model small enough that a CPU trains it in seconds
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--dtype=float32", "--compile=False", "--eval_iters=2", "--log_interval=5", "--warmup_iters=5",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--lr_decay_iters=50", "--sample_every=0"]


def run(data_dir, out_dir, *extra):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *extra])


def load(out_dir, last=False):
    """out_dir's best checkpoint (ckpt.pt) or, with last, its latest (last.pt: what resume continues)."""
    return torch.load(checkpoint_path(out_dir, last), weights_only=True)


def test_loss_falls_and_outputs_are_written(token_corpus, tmp_path):
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=40", "--eval_interval=20")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    evals = [r for r in records if "train_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]   # every eval_interval and at the end
    assert evals[0]["train_loss"] > 6.0                       # ~ln(1024) = 6.93 at init
    assert steps[-1]["loss"] < evals[0]["train_loss"] - 2.0   # the synthetic phrases are learnable
    assert len(evals[-1]["val_codebook_losses"]) == 8
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in steps)
    assert (out / "loss.png").stat().st_size > 10_000
    ckpt = load(out, last=True)
    assert ckpt["iter_num"] == 40 and ckpt["codec"]["name"] == "untrained"
    best = min((r for r in evals if r["iter"] > 0), key=lambda r: r["val_loss"])
    assert (load(out)["iter_num"], load(out)["val_loss"]) == (best["iter"], best["val_loss"])
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["codec"]["n_codebooks"] == 8
    assert not [f for f in os.listdir(out) if ".tmp" in f]    # atomic writes leave no temporaries


def test_eval_shows_the_baselines_and_bit_rate(token_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=10", "--eval_interval=10")
    meta = json.load(open(os.path.join(token_corpus, "meta.json")))
    best = [min(v for v in (meta["baselines"][name][k] for name in ("unigram", "prev_frame", "lower_codebook"))
                if v is not None) for k in range(8)]
    record = [json.loads(line) for line in open(out / "log.jsonl") if "val_loss" in line][-1]
    assert record["baseline_codebook_losses"] == pytest.approx(best)
    assert record["baseline_loss"] == pytest.approx(sum(best) / 8)
    assert record["val_bits_per_second"] == pytest.approx(75 * sum(record["val_codebook_losses"]) / math.log(2))
    captured = capsys.readouterr()
    line = [l for l in (captured.out + captured.err).splitlines() if l.startswith("iter 10:")][0]
    assert f"best simple baseline {sum(best) / 8:.4f}: {record['val_loss'] - sum(best) / 8:+.4f}" in line
    assert "bit/s, codec 6,000" in line
    assert load(out)["baselines"] == meta["baselines"]


def test_progress_samples(token_corpus, tmp_path):
    """sample_every=2: a progress sample at every second evaluation and at the end, listed newest first."""
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=12", "--eval_interval=4", "--sample_every=2")
    progress = out / "progress"
    wavs = sorted(f for f in os.listdir(progress) if f.endswith(".wav"))
    assert wavs == ["iter_000000.wav", "iter_000008.wav", "iter_000012.wav"]
    audio, rate = sf.read(progress / "iter_000012.wav")
    assert rate == 24000 and abs(len(audio) - train.PROGRESS_SECONDS * 24000) <= 320
    assert (progress / "iter_000012.png").stat().st_size > 1000
    page = open(progress / "index.html").read()
    assert page.index("iter_000012.wav") < page.index("iter_000008.wav") < page.index("iter_000000.wav")
    assert "MEANINGLESS" in page


def test_a_codec_that_cannot_load_means_no_progress_samples_and_one_note(token_corpus, tmp_path, monkeypatch, capsys):
    tries = []

    def missing(*args):
        tries.append(args)
        raise UserError("the codec's weights are missing")
    monkeypatch.setattr(train, "codec_for", missing)
    run(token_corpus, tmp_path / "out", "--max_iters=6", "--eval_interval=2", "--sample_every=1")
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("note: no progress samples (the codec's weights are missing)") == 1
    assert len(tries) == 1 and not os.path.exists(tmp_path / "out" / "progress")
    assert load(tmp_path / "out", last=True)["iter_num"] == 6   # training went on


def test_resume_is_exact(tmp_path):
    """N iterations + resume + N iterations = 2N iterations, bit for bit, on CPU; with style labels
    dropped at random (cfg_dropout) too."""
    data = tmp_path / "tokens"
    write_token_corpus(data, file_frames=[400, 300, 50], val_file_frames=[200], styles=["a", "b", None, "a"])
    common = ["--eval_interval=1000", "--dropout=0.1", "--gradient_accumulation_steps=2", "--cfg_dropout=0.5"]
    run(data, tmp_path / "split", "--max_iters=6", *common)
    run(data, tmp_path / "split", "--max_iters=12", "--init_from=resume", *common)
    run(data, tmp_path / "whole", "--max_iters=12", *common)
    split, whole = load(tmp_path / "split", last=True), load(tmp_path / "whole", last=True)
    assert whole["styles"] == ["a", "b"] and whole["model"]["style_emb.weight"].shape == (3, 32)
    assert split["iter_num"] == whole["iter_num"] == 12
    for name, tensor in whole["model"].items():
        assert torch.equal(split["model"][name], tensor), name
    for key, state in whole["optimizer"]["state"].items():   # Muon's momentum and AdamW's moments alike
        for name, tensor in state.items():
            assert torch.equal(split["optimizer"]["state"][key][name], tensor), (key, name)


def test_a_style_steers_generation(tmp_path):
    """The proof that styles steer: two very different styles in two folders, "low" (4 codes in 5 from
    the lower half of the codebook) and "high" (the mirror image), a tiny model trained briefly. Codes
    generated in each style are closer to that style's per-codebook code statistics than to the
    other's (unigram KL), and cfg_coef 3 separates the two further than 1 (plain conditional)."""
    V, K = 32, 2   # codes drawn from the first V of the codec's 1024
    rng = np.random.default_rng(0)
    styles = ["high"] * 3 + ["low"] * 3 + ["high", "low"]    # 3 train files each, then a val file each
    train_codes = {"high": [], "low": []}

    def piece(split, i, frames):   # codebook 1 a fixed function of codebook 0, as a codec's tend to be
        style = styles[i + (6 if split == "val" else 0)]
        low = rng.random(frames) < (0.8 if style == "low" else 0.2)
        code = np.where(low, rng.integers(0, V // 2, frames), rng.integers(V // 2, V, frames))
        codes = np.stack([code, (5 * code + 3) % V])
        if split == "train":
            train_codes[style].append(codes.T)
        return codes
    write_token_corpus(tmp_path / "tokens", [300] * 6, [100] * 2, n_codebooks=K, codes_of=piece, styles=styles)
    run(tmp_path / "tokens", tmp_path / "out", "--n_codebooks=2", "--n_layer=1", "--block_size=16", "--batch_size=16",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--max_iters=60", "--lr_decay_iters=60", "--eval_interval=60")
    ckpt = load_checkpoint(tmp_path / "out")
    model, names = model_from_checkpoint(ckpt).eval(), ckpt["styles"]
    assert names == ["high", "low"]
    target = {style: unigrams(np.concatenate(train_codes[style]), V) for style in names}
    margins = {}
    for cfg_coef in (1.0, 3.0):
        for style, other in zip(names, reversed(names)):
            codes = generate(model, 16, num_samples=64, style_ids=[names.index(style)], cfg_coef=cfg_coef, top_k=V)
            sampled = unigrams(codes.transpose(1, 2).reshape(-1, K).numpy(), V)
            own, others = unigram_kl(sampled, target[style]), unigram_kl(sampled, target[other])
            print(f"cfg_coef {cfg_coef}, style {style}: KL to its own style {own:.3f}, to the other {others:.3f}")
            margins[cfg_coef, style] = others - own
    # (seeds 0-2 gave margins 0.69-0.82 at cfg_coef 1 and 1.22-1.36 at 3; at most log 4 = 1.39 here)
    for style in names:
        assert margins[1.0, style] > 0.3
        assert margins[3.0, style] > margins[1.0, style] + 0.2


def test_short_files_are_used_and_padded(tmp_path):
    """Every file shorter than a window: training still runs, on padded windows."""
    data = tmp_path / "tokens"
    write_token_corpus(data, file_frames=[10, 20, 15], val_file_frames=[12])
    run(data, tmp_path / "out", "--max_iters=10", "--eval_interval=5")
    assert load(tmp_path / "out")["iter_num"] == 10


def test_batches_stay_inside_one_file_and_pad_with_special(tmp_path):
    from nanosuno.data import Batches, read_meta
    data = tmp_path / "tokens"
    # file i holds only code i + 1 in every codebook: a window mixing files would mix codes
    meta = write_token_corpus(data, file_frames=[40, 5, 40], styles=["rock", None, "jazz"],
                              codes_of=lambda split, i, frames: np.full((8, frames), i + 1))
    batches = Batches(str(data), read_meta(str(data)), "train", n_codebooks=8, block_size=16)
    x, y, styles = batches.sample(64)
    assert x.shape == y.shape == (64, 8, 16) and styles.shape == (64,)
    assert torch.equal(x[:, :, 1:], y[:, :, :-1])
    for window, style in zip(torch.cat([x, y[:, :, -1:]], dim=2), styles.tolist()):
        real = window[window != 1024].unique()
        assert len(real) == 1                                  # one file per window
        assert all(window[k, :k].eq(1024).all() for k in range(8))   # delay warm-up
        if real.item() == 2:                                   # the 5-frame file: padded, not dropped
            assert window[0, 5:].eq(1024).all()
        # its file's style id: styles sorted by name (jazz 0, rock 1), 2 = no style
        assert style == {1: 1, 2: 2, 3: 0}[real.item()]
    assert meta["splits"]["train"]["frames"] == 85
    assert meta["styles"] == [{"name": "jazz", "frames": 40}, {"name": "rock", "frames": 40}]


def test_style_dropout_uses_the_batch_generator_only_with_styles(tmp_path):
    """Labels become "no style" at the cfg_dropout rate; a corpus without styles draws nothing for it,
    so its batches (and the generator's state after them) are those of a run without dropout."""
    from nanosuno.data import Batches, read_meta
    for styled in (True, False):
        data = tmp_path / f"tokens_{styled}"
        write_token_corpus(data, file_frames=[40, 40], styles=["a", "b"] if styled else None)
        make = lambda: Batches(str(data), read_meta(str(data)), "train", n_codebooks=8, block_size=16, seed=3)
        plain, dropped = make(), make()
        x0, _, s0 = plain.sample(4000)
        x1, _, s1 = dropped.sample(4000, style_dropout=0.25)
        assert torch.equal(x0, x1)                            # the same windows
        if styled:
            assert set(s0.tolist()) == {0, 1}
            changed = s1 != s0
            assert s1[changed].eq(2).all() and 0.22 < changed.float().mean() < 0.28
        else:
            assert s0.eq(0).all() and torch.equal(s0, s1)     # id 0 = "no style" when there are none
            assert torch.equal(plain.generator.get_state(), dropped.generator.get_state())


def test_missing_data_says_run_prepare(tmp_path):
    with pytest.raises(UserError, match="run prepare.py first"):
        run(tmp_path / "nothing", tmp_path / "out", "--max_iters=1")


def test_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={tmp_path}",
                             "--device=cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "run prepare.py first" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_too_many_codebooks(tmp_path):
    data = tmp_path / "tokens"
    write_token_corpus(data, file_frames=[100], n_codebooks=4)
    with pytest.raises(UserError, match="n_codebooks=8 but .* holds 4"):
        run(data, tmp_path / "out", "--max_iters=1")


def test_resume_refuses_other_codec_or_shape(token_corpus, tmp_path):
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=2", "--eval_interval=1000")
    ckpt = load(out)    # a corpus without styles: the model has no style table at all
    assert ckpt["styles"] == [] and ckpt["model_args"]["n_styles"] == 0
    assert not [name for name in ckpt["model"] if "style" in name]
    with pytest.raises(UserError, match="another model shape .*n_embd 32 -> 48"):
        run(token_corpus, out, "--max_iters=4", "--init_from=resume", "--n_embd=48")
    styled, other = tmp_path / "styled", tmp_path / "other_styles"
    write_token_corpus(styled, file_frames=[400, 300], styles=["a", "b"])
    write_token_corpus(other, file_frames=[400, 300], styles=["a", "c"])
    with pytest.raises(UserError, match=r"cannot resume .*: it learned the styles \[\] but .* has \['a', 'b'\]; "
                                         r"prepare .* with --styles=none, or train from scratch"):
        run(styled, out, "--max_iters=4", "--init_from=resume")
    run(styled, tmp_path / "styled_out", "--max_iters=2", "--eval_interval=1000")
    with pytest.raises(UserError, match=r"it learned the styles \['a', 'b'\] but .* has \['a', 'c'\]"):
        run(other, tmp_path / "styled_out", "--max_iters=4", "--init_from=resume")
    other = tmp_path / "other"
    write_token_corpus(other, file_frames=[400], codec="encodec_24khz")
    with pytest.raises(UserError, match="codec mismatch"):
        run(other, out, "--max_iters=4", "--init_from=resume")
    with pytest.raises(UserError, match="codec mismatch"):
        run(token_corpus, tmp_path / "new", "--max_iters=1", "--codec=encodec_24khz")


def test_resume_without_checkpoint(token_corpus, tmp_path):
    with pytest.raises(UserError, match="no checkpoint .* train first"):
        run(token_corpus, tmp_path / "out", "--init_from=resume")


def test_empty_val_split_skips_validation(tmp_path, capsys):
    data = tmp_path / "tokens"
    write_token_corpus(data, file_frames=[200, 100], val_file_frames=())
    run(data, tmp_path / "out", "--max_iters=6", "--eval_interval=3")
    assert "skipping validation" in capsys.readouterr().out
    evals = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl") if "train_loss" in line]
    assert len(evals) == 3 and all("val_loss" not in r for r in evals)
    assert load(tmp_path / "out")["iter_num"] == 6


def torchrun(data_dir, out_dir, *extra):
    """train.py under torchrun with two CPU processes (DDP over gloo); returns its output."""
    result = run_torchrun(["--nproc_per_node=2", os.path.join(ROOT, "train.py"), f"--data_dir={data_dir}",
                           f"--out_dir={out_dir}", *TINY, "--device=cpu", *extra],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_two_process_resume_is_exact(token_corpus, tmp_path):
    """With two processes, N iterations + resume + N iterations = 2N iterations, bit for bit: each
    rank gets back its own batch sampler and dropout state. Rank 0 writes the one checkpoint."""
    common = ["--eval_interval=1000", "--dropout=0.1", "--gradient_accumulation_steps=2"]
    out = torchrun(token_corpus, tmp_path / "whole", "--max_iters=6", *common)
    assert "2 process(es)" in out
    assert sorted(f for f in os.listdir(tmp_path / "whole") if f.endswith(".pt")) == ["ckpt.pt", "last.pt"]
    torchrun(token_corpus, tmp_path / "split", "--max_iters=3", *common)
    torchrun(token_corpus, tmp_path / "split", "--max_iters=6", "--init_from=resume", *common)
    split, whole = load(tmp_path / "split", last=True), load(tmp_path / "whole", last=True)
    assert split["iter_num"] == whole["iter_num"] == 6
    for name, tensor in whole["model"].items():
        assert torch.equal(split["model"][name], tensor), name
    assert len(whole["rng"]) == 2 and not torch.equal(whole["rng"][0]["batches"], whole["rng"][1]["batches"])


def test_resume_with_another_number_of_processes_says_so(token_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=2", "--eval_interval=1000")
    ckpt = load(out, last=True)
    ckpt["rng"] = ckpt["rng"] * 2  # as if two processes had written it
    torch.save(ckpt, checkpoint_path(out, last=True))
    run(token_corpus, out, "--max_iters=4", "--init_from=resume", "--eval_interval=1000")
    assert "written by 2 process(es), this run has 1: random batches and dropout go on from fresh seeds" in \
        capsys.readouterr().out
    assert load(out, last=True)["iter_num"] == 4


def test_finetuning_learns_a_new_corpus_faster_than_scratch(tmp_path, capsys):
    """A model trained on corpus A, fine-tuned on corpus B, is ahead of one trained on B from scratch
    for the same iterations. A and B share their structure (phrases of the same 32 codes that repeat,
    codebooks that follow codebook 0), not their phrases."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_token_corpus(a, file_frames=[400, 400, 300], val_file_frames=[200], seed=1, phrase_codes=32)
    write_token_corpus(b, file_frames=[300, 200], val_file_frames=[200, 200], seed=2, phrase_codes=32)
    run(a, tmp_path / "pretrained", "--max_iters=60", "--eval_interval=1000")
    pretrained = checkpoint_path(tmp_path / "pretrained")
    # no shape settings: the shape comes from the checkpoint
    short = ["--batch_size=4", "--dtype=float32", "--compile=False", "--eval_iters=4", "--warmup_iters=2",
             "--max_iters=10", "--eval_interval=10", "--learning_rate=1e-3", "--lr_decay_iters=10", "--sample_every=0"]
    train.main([f"--data_dir={b}", f"--out_dir={tmp_path / 'finetuned'}", f"--init_from={pretrained}", *short])
    assert f"fine-tuning {pretrained} (iteration 60)" in capsys.readouterr().out
    run(b, tmp_path / "scratch", *short)
    finetuned, scratch = load(tmp_path / "finetuned"), load(tmp_path / "scratch")
    assert finetuned["iter_num"] == scratch["iter_num"] == 10
    assert finetuned["model_args"] == load(tmp_path / "pretrained")["model_args"]
    assert finetuned["finetuned_from"] == {"path": os.path.abspath(pretrained), "iter_num": 60}
    assert scratch["finetuned_from"] is None
    assert finetuned["best_val_loss"] < scratch["best_val_loss"] - 1.0, (finetuned["best_val_loss"], scratch["best_val_loss"])


def test_finetuning_refuses_a_missing_file_another_codec_or_shape(token_corpus, tmp_path):
    run(token_corpus, tmp_path / "pretrained", "--max_iters=1", "--eval_interval=1000")
    pretrained = checkpoint_path(tmp_path / "pretrained")
    with pytest.raises(UserError, match="init_from=.*missing.pt: no such checkpoint file"):
        run(token_corpus, tmp_path / "new", f"--init_from={tmp_path / 'missing.pt'}")
    with pytest.raises(UserError, match="another model shape .*n_layer 2 -> 3, n_embd 32 -> 48"):
        run(token_corpus, tmp_path / "new", f"--init_from={pretrained}", "--n_layer=3", "--n_embd=48")
    # a shape setting given on purpose is refused even at its default value (n_codebooks=8 here)
    run(token_corpus, tmp_path / "four", "--max_iters=1", "--eval_interval=1000", "--n_codebooks=4")
    with pytest.raises(UserError, match="another model shape .*n_codebooks 4 -> 8"):
        run(token_corpus, tmp_path / "new", f"--init_from={checkpoint_path(tmp_path / 'four')}", "--n_codebooks=8")
    run(token_corpus, tmp_path / "tuned", f"--init_from={checkpoint_path(tmp_path / 'four')}", "--max_iters=1")
    assert load(tmp_path / "tuned", last=True)["model_args"]["n_codebooks"] == 4   # left unset: the checkpoint's
    other = tmp_path / "other"
    write_token_corpus(other, file_frames=[400], codec="encodec_24khz")
    with pytest.raises(UserError, match="codec mismatch: the checkpoint .*ckpt.pt uses untrained"):
        run(other, tmp_path / "new", f"--init_from={pretrained}")


def test_a_config_files_shape_yields_to_the_checkpoint(token_corpus, tmp_path, capsys):
    """config/small.py's shape changes between versions (n_kv_head and bigram were added): resuming or
    fine-tuning a checkpoint with the config file keeps the checkpoint's shape and says so, and a
    checkpoint older than a setting (no such key in model_args) is read as that setting's default."""
    run(token_corpus, tmp_path / "old", "--max_iters=2", "--eval_interval=1000")
    for last in (False, True):   # as if trained before n_kv_head and bigram existed
        ckpt = load(tmp_path / "old", last)
        del ckpt["model_args"]["n_kv_head"], ckpt["model_args"]["bigram"]
        save_checkpoint(tmp_path / "old", ckpt, last)
    config = tmp_path / "new_small.py"
    config.write_text("n_kv_head = 1\nbigram = True\n")
    capsys.readouterr()
    train.main([str(config), f"--data_dir={token_corpus}", f"--out_dir={tmp_path / 'old'}", *TINY,
                "--max_iters=4", "--init_from=resume"])
    assert "has its own model shape: n_kv_head 0 (not 1), bigram False (not True), as it was trained" \
        in capsys.readouterr().out
    resumed = load(tmp_path / "old", last=True)
    assert resumed["iter_num"] == 4 and (resumed["model_args"]["n_kv_head"], resumed["model_args"]["bigram"]) == (0, False)
    train.main([str(config), f"--data_dir={token_corpus}", f"--out_dir={tmp_path / 'tuned'}", *TINY,
                "--max_iters=1", f"--init_from={checkpoint_path(tmp_path / 'old')}"])
    assert load(tmp_path / "tuned", last=True)["model_args"]["n_kv_head"] == 0
    # on the command line the same setting is this run's, and a shape the checkpoint lacks is refused
    with pytest.raises(UserError, match="another model shape .*n_kv_head 0 -> 1"):
        run(token_corpus, tmp_path / "old", "--max_iters=6", "--init_from=resume", "--n_kv_head=1")


def test_finetuning_keeps_the_styles_it_learned(token_corpus, tmp_path):
    """The style table's rows are the checkpoint's styles: fine-tuning needs a corpus with the same
    style names (other files, other music), and the new checkpoint keeps them; other styles, or
    styles for a model that learned none, are refused in one line that says what to do."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    write_token_corpus(tmp_path / "styled", file_frames=[400, 300], styles=["a", "b"], seed=1)
    write_token_corpus(mine, file_frames=[300, 200, 100], styles=["b", "a", None], seed=2)
    write_token_corpus(other, file_frames=[400, 300], styles=["a", "c"])
    run(tmp_path / "styled", tmp_path / "pretrained", "--max_iters=1", "--eval_interval=1000")
    pretrained = checkpoint_path(tmp_path / "pretrained")
    run(mine, tmp_path / "finetuned", f"--init_from={pretrained}", "--max_iters=1", "--eval_interval=1000")
    finetuned = load(tmp_path / "finetuned")
    assert finetuned["styles"] == ["a", "b"] and finetuned["model_args"]["n_styles"] == 2
    with pytest.raises(UserError, match=r"cannot fine-tune .*ckpt.pt: it learned the styles \['a', 'b'\] but .* has "
                                        r"\['a', 'c'\]; prepare .* from audio sorted into the folders a, b, or train"):
        run(other, tmp_path / "new", f"--init_from={pretrained}", "--max_iters=1")
    run(token_corpus, tmp_path / "plain", "--max_iters=1", "--eval_interval=1000")
    with pytest.raises(UserError, match=r"cannot fine-tune .*ckpt.pt: it learned the styles \[\] but .* has "
                                        r"\['a', 'b'\]; prepare .* with --styles=none, or train from scratch"):
        run(mine, tmp_path / "new", f"--init_from={checkpoint_path(tmp_path / 'plain')}", "--max_iters=1")

# --- nothing lost, one clear line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-iteration run (data_dir, out_dir) to copy: one training run for many tests."""
    root = tmp_path_factory.mktemp("trained")
    write_token_corpus(root / "tokens", file_frames=[400, 300, 50], val_file_frames=[200])
    run(root / "tokens", root / "out", "--max_iters=2", "--eval_interval=1000")
    return root / "tokens", root / "out"


def copy_run(trained, tmp_path):
    data, out = trained
    shutil.copytree(out, tmp_path / "out")
    return data, tmp_path / "out"


def snapshot(out_dir):
    return {name: open(os.path.join(out_dir, name), "rb").read() for name in ("ckpt.pt", "log.jsonl", "loss.png")}


def test_a_scratch_run_never_replaces_a_checkpoint_unasked(token_corpus, tmp_path):
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=4", "--eval_interval=2")
    before = snapshot(out)
    with pytest.raises(UserError, match=r"ckpt.pt exists: continue that run with --init_from=resume, or start "
                                        r"from scratch with --overwrite=True") as e:
        run(token_corpus, out, "--max_iters=6", "--eval_interval=2")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="multiple of n_head"):       # a bad setting deletes nothing
        run(token_corpus, out, "--max_iters=6", "--n_head=3", "--overwrite=True")
    with pytest.raises(UserError, match="run prepare.py first"):     # nor does missing data
        run(tmp_path / "nothing", out, "--max_iters=6", "--overwrite=True")
    assert snapshot(out) == before
    run(token_corpus, out, "--max_iters=2", "--eval_interval=1", "--overwrite=True")   # on purpose
    assert load(out, last=True)["iter_num"] == 2
    assert [json.loads(line)["iter"] for line in open(out / "log.jsonl") if "train_loss" in line] == [0, 1, 2]


def test_resume_past_max_iters_says_so(trained, tmp_path):
    data, out = copy_run(trained, tmp_path)
    with pytest.raises(UserError, match="has already trained 2 iterations, max_iters is 2: raise --max_iters"):
        run(data, out, "--max_iters=2", "--init_from=resume")


def test_a_second_train_on_one_out_dir_is_refused_with_the_holders_pid(token_corpus, tmp_path):
    holder = hold_lock(tmp_path / "out", "out_dir")   # e.g. a first train.py run, still going
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={token_corpus}",
                                 f"--out_dir={tmp_path / 'out'}", *TINY, "--device=cpu", "--max_iters=2"],
                                capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: out_dir {tmp_path / 'out'} is in use by another run (pid {holder.pid}): "
                                     f"wait for it to end, or use another out_dir")
    assert os.listdir(tmp_path / "out") == [".lock"]


def test_out_dir_that_is_a_file_or_cannot_be_written(token_corpus, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=f"^out_dir {tmp_path / 'file'} is not a folder$"):
        run(token_corpus, tmp_path / "file", "--max_iters=1")
    fail_writes(monkeypatch, str(tmp_path / "locked"), errno.EACCES)
    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'locked' / '.lock'}: permission denied$"):
        run(token_corpus, tmp_path / "locked", "--max_iters=1")


@pytest.mark.parametrize("room", [0, 1000])   # full from the start, or once torch has written a little
def test_a_full_disk_keeps_the_last_checkpoint(trained, tmp_path, monkeypatch, room):
    data, out = copy_run(trained, tmp_path)
    before = open(out / "last.pt", "rb").read()
    fail_writes(monkeypatch, "last.pt", room=room)   # written at every evaluation (torch.save's own message: "unexpected pos 704 vs 598")
    with pytest.raises(UserError, match=f"^no space left on {out}$"):
        run(data, out, "--max_iters=4", "--eval_interval=1000", "--init_from=resume")
    monkeypatch.undo()
    assert open(out / "last.pt", "rb").read() == before and load(out, last=True)["iter_num"] == 2
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_a_log_cut_off_by_a_crash_is_resumed(trained, tmp_path, capsys):
    data, out = copy_run(trained, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 3, "loss": 6.1, "lr"')   # a crash in the middle of a line
    run(data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert f"note: the last line of {out / 'log.jsonl'} was cut off" in capsys.readouterr().out
    records = [json.loads(line) for line in open(out / "log.jsonl")]   # every line whole: none glued on
    assert [r["iter"] for r in records if "train_loss" in r] == [0, 2, 2, 4] and load(out, last=True)["iter_num"] == 4
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 5, "lo')
    from nanosuno.plots import save_loss_plot
    save_loss_plot(out / "log.jsonl", out / "loss.png")   # the plot leaves a torn last line out


def corrupt(ckpt):
    """Checkpoints that torch loads safely but that are not what train/sample expect."""
    model_args, state = ckpt["model_args"], ckpt["model"]
    return {
        "a list": [1, 2, 3],
        "no model_args": {k: v for k, v in ckpt.items() if k != "model_args"},
        "a bad shape": {**ckpt, "model_args": {**model_args, "n_head": 3}},
        "other weights": {**ckpt, "model": {k: v[:1] for k, v in state.items()}},
        "no optimizer": {k: v for k, v in ckpt.items() if k != "optimizer"},
    }


@pytest.mark.parametrize("kind, message", [
    ("a list", r"is not a nanosuno checkpoint \(a list, not a dict\)"),
    ("no model_args", r"is not a nanosuno checkpoint \(no model_args of type dict\)"),
    ("a bad shape", r"model_args: n_embd \(32\) must be a multiple of n_head \(3\)"),
    ("other weights", "the checkpoint's weights do not fit the model its model_args describe"),
    ("no optimizer", r"no optimizer or rng \(random states\): it cannot be resumed"),
])
def test_a_checkpoint_of_another_structure_is_one_line(trained, tmp_path, kind, message):
    data, out = copy_run(trained, tmp_path)
    torch.save(corrupt(load(out, last=True))[kind], checkpoint_path(out, last=True))
    with pytest.raises(UserError, match=message) as e:
        run(data, out, "--max_iters=3", "--init_from=resume")
    assert "\n" not in str(e.value)


def test_a_diverging_run_keeps_its_best_model_and_resumes_from_its_latest(token_corpus, tmp_path, monkeypatch):
    """val goes 8.67, 5.26, 7.66, 5.92, 8.64 (the attack round's diverging run): ckpt.pt keeps the
    weights that scored 5.26, last.pt the latest, each recording its own val loss and iteration."""
    scripted = iter([8.67, 5.26, 7.66, 5.92, 8.64])
    real_evaluate = train.estimate_losses

    def evaluate(*args):
        losses = real_evaluate(*args)
        return {**losses, "val": (next(scripted), losses["val"][1])}
    monkeypatch.setattr(train, "estimate_losses", evaluate)
    out = tmp_path / "out"
    run(token_corpus, out, "--max_iters=8", "--eval_interval=2")
    best, latest = load(out), load(out, last=True)
    assert (best["iter_num"], best["val_loss"], best["best_val_loss"]) == (2, 5.26, 5.26)
    assert (latest["iter_num"], latest["val_loss"], latest["best_val_loss"]) == (8, 8.64, 5.26)
    assert "optimizer" not in best and "optimizer" in latest
    assert not all(torch.equal(best["model"][k], v) for k, v in latest["model"].items())
    # sampling and fine-tuning take the best model; resuming goes on from the latest
    assert load_checkpoint(str(out))["iter_num"] == 2 and load_checkpoint(str(out), resume=True)["iter_num"] == 8
    monkeypatch.setattr(train, "estimate_losses", real_evaluate)
    run(token_corpus, out, "--max_iters=10", "--eval_interval=2", "--init_from=resume")
    assert load(out, last=True)["iter_num"] == 10


def test_weights_that_turn_nan_are_never_saved_and_never_loaded(trained, tmp_path, monkeypatch):
    data, out = copy_run(trained, tmp_path)
    before = {name: open(out / name, "rb").read() for name in ("ckpt.pt", "last.pt")}
    real_step = train.train_step

    def step_that_diverges(model, *args):
        loss = real_step(model, *args)
        next(model.parameters()).data.fill_(float("nan"))
        return loss
    monkeypatch.setattr(train, "train_step", step_that_diverges)
    with pytest.raises(UserError, match=r"^training diverged at iteration 4: the weights hold NaN or inf, so nothing "
                                        r"was saved \(.*ckpt.pt keeps the best model so far, val [\d.]+\); lower "
                                        r"--learning_rate and --muon_lr"):
        run(data, out, "--max_iters=4", "--eval_interval=1000", "--init_from=resume")
    assert {name: open(out / name, "rb").read() for name in before} == before
    # a checkpoint that holds NaN weights anyway (written by another tool) is refused in one line
    ckpt = load(out)
    ckpt["model"]["lm_heads.0.weight" if "lm_heads.0.weight" in ckpt["model"] else next(iter(ckpt["model"]))][0, 0] = float("inf")
    torch.save(ckpt, checkpoint_path(out))
    monkeypatch.setattr(train, "train_step", real_step)
    with pytest.raises(UserError, match=r"ckpt.pt is not a nanosuno checkpoint \(its weights hold NaN or inf: the "
                                        r"run that wrote it diverged\)") as e:
        run(data, tmp_path / "finetune", f"--init_from={checkpoint_path(out)}", "--max_iters=4")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="refusing to save a checkpoint whose weights hold NaN or inf"):
        train.save_checkpoint(str(tmp_path / "new"), ckpt)
    assert not os.path.exists(tmp_path / "new" / "ckpt.pt")


def test_make_checkpoint_makes_the_layout_that_loads(tmp_path):
    """checkpoint.py makes the layout it checks on load: make_checkpoint's is ckpt.pt's, and
    with_resume_state's on top of it is last.pt's, which resume loads."""
    model = GPT(GPTConfig(block_size=16, n_codebooks=2, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(1e-3, 1e-2, 0.1, (0.9, 0.95))
    ckpt = make_checkpoint(model, load_codec("untrained").info(2), 5, 4.5, 4.25, styles=(),
                           reference_codes=torch.zeros(2, 3, dtype=torch.long))
    rng = [{"torch": torch.get_rng_state(), "batches": torch.Generator().get_state(), "cuda": None}]
    save_checkpoint(str(tmp_path), ckpt)
    save_checkpoint(str(tmp_path), with_resume_state(ckpt, optimizer.state_dict(), rng), last=True)
    best, latest = load_checkpoint(str(tmp_path)), load_checkpoint(str(tmp_path), resume=True)
    assert (best["iter_num"], best["val_loss"], best["best_val_loss"], best["config"]) == (5, 4.5, 4.25, {})
    assert "optimizer" not in best and latest.keys() == best.keys() | {"optimizer", "rng"}
    assert model_from_checkpoint(best).config == model.config


@pytest.mark.parametrize("change, message", [
    (lambda c: c["codec"].update(codebook_size=2048), r"codec untrained: codebook_size 2048 \(the codec's is 1024\)"),
    (lambda c: c["codec"].update(frame_rate=0), r"codec untrained: frame_rate 0 \(the codec's is 75\)"),
    (lambda c: c["model_args"].update(codebook_size=512),
     r"its model has 8 codebooks of 512 codes, its codec 8 of 1024"),
    (lambda c: c.update(reference_codes=torch.full((8, 5), 5000)), r"reference_codes are not codes \(n_codebooks, frames\)"),
    (lambda c: c.update(reference_codes=torch.zeros(3, 5, dtype=torch.long)), r"reference_codes are not codes"),
])
def test_a_checkpoint_whose_vocabulary_is_not_its_codecs_is_one_line(trained, tmp_path, change, message):
    data, out = copy_run(trained, tmp_path)
    ckpt = load(out)
    change(ckpt)
    torch.save(ckpt, checkpoint_path(out))
    with pytest.raises(UserError, match=r"ckpt.pt is not a nanosuno checkpoint \(" + message):
        load_checkpoint(str(out))


@pytest.mark.parametrize("content, message", [
    (b"hello, not a checkpoint\n", r"it is not a file torch.save wrote"),
    (None, r"it is truncated or damaged"),
])
def test_init_from_a_file_that_is_no_checkpoint_says_what_it_is(trained, tmp_path, content, message):
    data, out = copy_run(trained, tmp_path)
    path = tmp_path / "given.pt"
    path.write_bytes(content if content is not None else open(out / "ckpt.pt", "rb").read()[:5000])
    with pytest.raises(UserError, match=fr"^cannot load checkpoint {path}: {message} \(.*\); give a checkpoint that "
                                        r"train.py wrote, or train again$"):
        run(data, tmp_path / "new", f"--init_from={path}", "--max_iters=1")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(UserError, match="is a folder, not a file"):
        run(data, tmp_path / "new", f"--init_from={tmp_path / 'folder.pt'}", "--max_iters=1")


def test_a_time_budget_ends_on_time_at_min_lr_and_resumes_with_what_is_left(token_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    start = time.time()
    run(token_corpus, out, "--max_minutes=0.1", "--eval_interval=1000000", "--log_interval=1")
    elapsed = time.time() - start
    assert 6 <= elapsed < 20   # 6 s of training, then one evaluation, a checkpoint and the plot
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    steps, final = [r for r in records if "loss" in r], records[-1]
    assert len(steps) > 5 and final["iter"] == steps[-1]["iter"] and "val_loss" in final
    assert final["lr"] == pytest.approx(3e-4)                             # min_lr at the end of the budget
    assert steps[-1]["lr"] < 3e-4 + 0.05 * (3e-3 - 3e-4)                  # the last steps were near it already
    assert all(a["lr"] >= b["lr"] for a, b in zip(steps[5:], steps[6:]))   # decaying after warmup
    latest = load(out, last=True)
    assert latest["config"]["max_minutes"] == 0.1 and 6 <= latest["train_seconds"] < 10
    assert "time budget: 0.1 min" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"has already trained 0.1 min, max_minutes is 0.1: raise --max_minutes"):
        run(token_corpus, out, "--max_minutes=0.1", "--init_from=resume")
    run(token_corpus, out, "--max_minutes=0.15", "--init_from=resume", "--eval_interval=1000000")
    assert 9 <= load(out, last=True)["train_seconds"] < 13


@pytest.mark.parametrize("music,table", [("phrases", True), ("noise", False)])
def test_bigram_min_gain_builds_the_table_only_where_the_previous_frame_tells_enough(tmp_path, capsys, music, table):
    # repeated phrases: one frame tells the next (several nats better than the unigram); independent
    # random codes: it tells nothing, and a new model is built without the table, said in one line
    rng = np.random.default_rng(0)
    noise = (lambda split, i, frames: rng.integers(0, 1024, (8, frames))) if music == "noise" else None
    data = tmp_path / "tokens"
    write_token_corpus(data, file_frames=[2000, 1000], val_file_frames=[200], codes_of=noise)
    run(data, tmp_path / "out", "--bigram=True", "--bigram_min_gain=1.0", "--max_iters=2")
    out = capsys.readouterr().out
    gain = float(re.search(r"bigram table (?:on|off): the previous frame predicts the train split ([\d.]+) nats/token", out)[1])
    assert (gain > 3) if table else (0 <= gain < 0.1)
    assert f"bigram table {'on' if table else 'off'}" in out
    ckpt = load(tmp_path / "out")
    assert ckpt["model_args"]["bigram"] is table and any(k.startswith("bigram.") for k in ckpt["model"]) is table
    # bigram_min_gain = 0 (the code's default): the table whenever bigram is True, nothing measured
    run(data, tmp_path / "out0", "--bigram=True", "--max_iters=1")
    assert load(tmp_path / "out0")["model_args"]["bigram"] is True and "bigram table" not in capsys.readouterr().out


def test_a_bigram_model_starts_at_the_previous_frame_baseline(tmp_path, monkeypatch):
    # the table starts from the train split's counts: before any step, the model predicts each
    # codebook as well as the previous-frame bigram that prepare.py scored on val. Music here: each
    # codebook a Markov chain (its own successor of each code 3 times in 4, else any code), in train and val
    rng = np.random.default_rng(0)
    successor = rng.integers(0, 1024, size=(8, 1024))

    def chain(split, i, frames):
        codes = np.zeros((8, frames), dtype=np.int64)
        for t in range(1, frames):
            codes[:, t] = np.where(rng.random(8) < 0.75, successor[np.arange(8), codes[:, t - 1]], rng.integers(0, 1024, 8))
        return codes
    data = tmp_path / "tokens"
    write_token_corpus(data, file_frames=[3000, 2000], val_file_frames=[1000], codes_of=chain)
    # (windows of 256 steps: the first step of each window has no previous frame to look up)
    run(data, tmp_path / "out", "--bigram=True", "--block_size=256", "--max_iters=1", "--learning_rate=1e-9", "--min_lr=0",
        "--muon_lr=1e-9")
    meta = read_meta(data)
    val = split_losses(model_from_checkpoint(load(tmp_path / "out")), data, meta, 8)   # the whole val split
    assert val == pytest.approx(meta["baselines"]["prev_frame"], abs=0.1)   # (the heads start near, not at, 0)
    assert max(meta["baselines"]["prev_frame"]) < math.log(1024) - 2      # far below a new model's ~6.93
    # a resumed run goes on with the checkpoint's table: it never counts again
    monkeypatch.setattr(train, "init_bigram", lambda *args: pytest.fail("a resumed run started its table again"))
    run(data, tmp_path / "out", "--bigram=True", "--block_size=256", "--max_iters=2", "--init_from=resume")
    assert load(tmp_path / "out", last=True)["iter_num"] == 2
