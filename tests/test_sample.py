"""Generation (nanosuno/generate.py) and sample.py: the sampler, delay pattern, KV cache, sliding window,
prompts, outputs and errors. A tiny random-init model saved as a checkpoint, the `untrained` codec, CPU."""
import errno
import os
import re
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import sample
from conftest import fail_writes, hold_lock, write_token_corpus
from nanosuno import demo
from nanosuno.audio import load_audio, save_wav
from nanosuno.checkpoint import (checkpoint_path, load_checkpoint, make_checkpoint, model_from_checkpoint,
                                 save_checkpoint)
from nanosuno.codec import load_codec
from nanosuno.common import UserError
from nanosuno.evaluate import frame_cross_entropy
from nanosuno.generate import (context_keep_steps, generate, generate_loop, loop_bridge,
                               prompt_frames_used, sample_next)
from nanosuno.model import GPT, GPTConfig
from nanosuno.pattern import delay_deinterleave, delay_interleave

V = 1024  # the codec's codebook size; the special token is V


def tiny_model(K=4, block_size=64, codebook_size=V, seed=0, n_styles=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, n_codebooks=K, codebook_size=codebook_size, n_layer=2,
                         n_head=2, n_embd=32, n_styles=n_styles)).eval()


@pytest.fixture(scope="module")
def codec():
    return load_codec("untrained")


def save_tiny_checkpoint(out_dir, codec, K=8, block_size=64, codec_name=None, styles=(), reference_codes=None):
    model = tiny_model(K, block_size, n_styles=len(styles))
    info = {**codec.info(K), "name": codec_name or codec.name}
    save_checkpoint(str(out_dir), make_checkpoint(model, info, iter_num=7, val_loss=9.9, best_val_loss=9.9, styles=styles,
                                                  reference_codes=reference_codes))
    return str(out_dir)


def run_sample(out_dir, *args):
    """Run sample.py; returns the folder the run wrote (the newest in its sample_dir)."""
    sample.main([f"--out_dir={out_dir}", "--device=cpu", *args])
    sample_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--sample_dir=")), os.path.join(out_dir, "samples"))
    return latest_run(sample_dir)


def latest_run(sample_dir):
    return os.path.join(sample_dir, max((n for n in os.listdir(sample_dir) if n.isdigit()), key=int))


def reference_greedy(model, frames, prompt=None, context_stride=0.25, style=None, cfg_coef=None):
    """Greedy generation the slow, obvious way: every step runs the plain forward (no cache) over the
    current window of delayed steps, re-applying the warm-up triangle at the window's start. With a
    style: conditioned on it; with cfg_coef too: uncond + cfg_coef * (cond - uncond), the
    unconditional logits from a second forward without the style."""
    K, special, block_size = model.config.n_codebooks, model.config.codebook_size, model.config.block_size
    keep = context_keep_steps(block_size, context_stride, K)
    P = 0 if prompt is None else prompt.shape[1]
    steps = frames + K - 1
    delayed = torch.full((1, K, steps), special)
    if P:
        delayed[0, :, :P + K - 1] = delay_interleave(prompt, special)
    start = 0                                   # first step of the window
    for s in range(P, steps):
        if s == 0:                              # from scratch: an all-special start step
            inputs = torch.full((1, K, 1), special)
        else:
            if s - start > block_size:          # window full: keep the last `keep` steps
                start = s - keep
            inputs = delayed[:, :, start:s].clone()
            for k in range(1, K):
                inputs[:, k, :k] = special
        logits = model(inputs, style_ids=None if style is None else torch.tensor([style]))[0][:, :, -1]
        if cfg_coef is not None:
            uncond = model(inputs)[0][:, :, -1]
            logits = uncond + cfg_coef * (logits - uncond)
        codes = logits.argmax(-1)
        for k in range(K):
            if s - k < P:                       # warm-up (special) or prompt: forced
                codes[:, k] = delayed[:, k, s]
        delayed[:, :, s] = codes
    return delay_deinterleave(delayed)


def test_sampling_greedy_top_k_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 3.0, 2.0]).repeat(2000, 3, 1)        # (B=2000, K=3, V=4)
    assert torch.equal(sample_next(logits, temperature=0), torch.full((2000, 3), 2))
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).unique().tolist()) == {2, 3}  # 2 most likely
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).unique().tolist()) == {2}   # p(2) = 0.64
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).unique().tolist()) == {2, 3}  # 0.64 + 0.24
    draws = sample_next(logits, 1.0, generator=g)
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits[0, 0], -1), atol=0.03)  # samples follow softmax
    cold = sample_next(logits, 0.25, generator=g)                            # low temperature sharpens
    assert (cold == 2).float().mean() > 0.95


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(4, 8, 64)
    a = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(5))
    c = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("K,block_size,frames,prompt_frames,style,cfg_coef", [
    (4, 64, 30, 0, None, None), (4, 64, 30, 9, None, None), (1, 64, 20, 3, None, None),
    (4, 16, 100, 0, None, None), (3, 16, 60, 12, None, None), (4, 16, 60, 40, None, None),  # these slide
    (8, 8, 40, 0, None, None),                                                   # keeps K - 1 steps, not 6
    (4, 64, 30, 9, 1, None), (4, 16, 60, 12, 0, None),        # conditional: a style, no guidance
    (4, 64, 30, 0, 1, 3.0), (3, 16, 60, 12, 0, 2.0), (8, 8, 40, 0, 1, 5.0)])   # guided
def test_cached_greedy_equals_full_recompute(K, block_size, frames, prompt_frames, style, cfg_coef):
    model = tiny_model(K, block_size, n_styles=2).double()  # float64: no argmax flips from rounding
    prompt = torch.randint(0, V, (K, prompt_frames)) if prompt_frames else None
    fast = generate(model, frames - prompt_frames, prompt, temperature=0, context_stride=0.25,
                    style_ids=None if style is None else [style], cfg_coef=cfg_coef)
    slow = reference_greedy(model, frames, prompt, context_stride=0.25, style=style, cfg_coef=cfg_coef)
    # generate() continues only the prompt's last frames that fit the context: the same codes
    used = prompt_frames_used(model, prompt_frames, context_stride=0.25)
    slow = slow[:, :, prompt_frames - used:]
    assert fast.shape == (1, K, used + frames - prompt_frames)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("block_size,prompt_frames", [(64, 0), (64, 9), (16, 12)])   # 16: slides
def test_guidance_at_coef_1_is_conditional_sampling(block_size, prompt_frames):
    """cfg_coef = 1 through the guided path (conditional and unconditional streams in one batch, the
    sampler on the combined logits) gives exactly the codes of plain conditional sampling, which runs
    no unconditional stream; other coefficients give other codes. Several styles and samples per
    style in one batch: the pieces come style by style, each as if generated alone."""
    # float64: the batch of 2B and the batch of B cannot round differently enough to flip a pick
    model = tiny_model(K=4, block_size=block_size, n_styles=3).double()
    prompt = torch.randint(0, V, (4, prompt_frames)) if prompt_frames else None
    settings = dict(temperature=1.0, top_k=50, num_samples=2, seed=3)
    conditional = generate(model, 50, prompt, style_ids=[2, 0], **settings)
    guided = generate(model, 50, prompt, style_ids=[2, 0], cfg_coef=1.0, **settings)
    assert conditional.shape[0] == 4 and torch.equal(guided, conditional)
    assert not torch.equal(generate(model, 50, prompt, style_ids=[2, 0], cfg_coef=3.0, **settings), conditional)
    greedy = dict(settings, temperature=0.0)
    both = generate(model, 50, prompt, style_ids=[2, 0], **greedy)
    assert torch.equal(both[:2], generate(model, 50, prompt, style_ids=[2], **greedy))
    assert torch.equal(both[2:], generate(model, 50, prompt, style_ids=[0], **greedy))
    assert not torch.equal(both[:2], both[2:])


@pytest.mark.parametrize("arguments, message", [
    (dict(top_k=0), fr"^top_k must be between 1 and the codebook size {V}, got 0$"),
    (dict(top_k=V + 1), fr"^top_k must be between 1 and the codebook size {V}, got {V + 1}$"),
    (dict(temperature=-1.0), r"^temperature must be >= 0 \(0 = greedy\), got -1.0$"),
    (dict(temperature=float("nan")), r"^temperature must be >= 0"),
    (dict(top_p=1.5), r"^top_p must be in \[0, 1\] \(0 = off\), got 1.5$"),
    (dict(num_samples=0), r"^num_samples must be >= 1, got 0$"),
    (dict(context_stride=0), r"^context_stride must be in \(0, 1\], got 0$"),
])
def test_generate_checks_its_arguments(arguments, message):
    """The library's own check (ValueError), not the config system's: sample.py turns it into one line."""
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(K=2), 5, **arguments)


def test_seed_reproducible_and_prompt_is_prefix():
    model = tiny_model(K=4)
    prompt = torch.randint(0, V, (4, 10))
    a = generate(model, 30, prompt, top_k=50, num_samples=3, seed=1)
    b = generate(model, 30, prompt, top_k=50, num_samples=3, seed=1)
    c = generate(model, 30, prompt, top_k=50, num_samples=3, seed=2)
    assert a.shape == (3, 4, 40)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, :, 10:], c[:, :, 10:])
    assert not torch.equal(a[0], a[1])               # the samples of a batch differ
    assert torch.equal(a[:, :, :10], prompt.expand(3, -1, -1))


def test_progress_is_told_the_step_count():
    class Bar:  # what generate() uses of a tqdm bar
        total, n = None, 0

        def refresh(self):
            pass

        def update(self, steps):
            self.n += steps
    bar = Bar()
    generate(tiny_model(K=4), 20, torch.randint(0, V, (4, 5)), progress=bar)
    assert bar.total == bar.n == 20 + 3     # the new frames and the drain's K - 1 steps


@pytest.mark.parametrize("settings", [dict(temperature=5.0, top_k=V), dict(temperature=1.0, top_k=5, top_p=0.5),
                                      dict(temperature=0.0)])
def test_special_token_never_in_output(settings):
    # from scratch, past the context (block 16), with a prompt: all paths that force the special token
    model = tiny_model(K=8, block_size=16)
    for prompt in (None, torch.randint(0, V, (8, 5))):
        codes = generate(model, 100 - (0 if prompt is None else prompt.shape[1]), prompt, num_samples=2, **settings)
        assert codes.shape == (2, 8, 100)
        assert codes.min() >= 0 and codes.max() < V


@pytest.mark.parametrize("K", [1, 8])
def test_wav_length_and_index(tmp_path, codec, K):
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=K)
    sample_dir = run_sample(out_dir, "--seconds=0.5", "--num_samples=2", "--top_k=100")
    page = open(os.path.join(sample_dir, "index.html")).read()
    wavs = sorted(f for f in os.listdir(sample_dir) if f.endswith(".wav"))
    assert wavs == ["sample_000.wav", "sample_001.wav"]
    for name in wavs:
        audio, rate = sf.read(os.path.join(sample_dir, name))
        assert rate == 24000 and audio.ndim == 1
        assert abs(len(audio) - 0.5 * 24000) <= 24000 / 75
        assert f'src="{name}"' in page and f'src="{name[:-4]}.png"' in page
        assert os.path.getsize(os.path.join(sample_dir, name[:-4] + ".png")) > 1000
    for setting in ("iteration 7", "untrained", "MEANINGLESS", "seed", "temperature"):
        assert setting in page


def test_styles_through_sample_py(tmp_path, codec):
    """--style=b,a: num_samples pieces per style in one batch, each labelled in index.html with its
    style and cfg_coef; an unknown style names the ones the checkpoint knows."""
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2, styles=("a", "b"))
    sample_dir = run_sample(out_dir, "--seconds=0.2", "--num_samples=2", "--style=b,a", "--cfg_coef=2.5")
    assert sorted(f for f in os.listdir(sample_dir) if f.endswith(".wav")) == [f"sample_00{i}.wav" for i in range(4)]
    page = open(os.path.join(sample_dir, "index.html")).read()
    labels = [page[page.index(f"<h2>sample_00{i}</h2>"):].split("<p>")[1].split("</p>")[0] for i in range(4)]
    assert labels == ["style b, cfg_coef 2.5"] * 2 + ["style a, cfg_coef 2.5"] * 2
    assert "<th>style</th><td>b, a</td>" in page and "<th>cfg_coef</th><td>2.5</td>" in page
    run_sample(out_dir, "--seconds=0.2", f"--sample_dir={tmp_path / 'plain'}")   # no style: unconditional
    assert "<p>no style (unconditional)</p>" in open(os.path.join(latest_run(tmp_path / "plain"), "index.html")).read()
    with pytest.raises(UserError, match="unknown style 'c': .*ckpt.pt knows a, b"):
        run_sample(out_dir, "--style=a,c", f"--sample_dir={tmp_path / 'none'}")
    assert not os.path.exists(tmp_path / "none")


def test_a_checkpoint_without_its_styles_is_one_line(tmp_path, codec):
    """Every checkpoint carries its style names ([] for an unconditional model)."""
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2)
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    del ckpt["styles"]
    save_checkpoint(out_dir, ckpt)
    with pytest.raises(UserError, match=r"ckpt.pt is not a nanosuno checkpoint \(styles None are not the names of its 0 "
                                        r"styles\)"):
        run_sample(out_dir, "--seconds=0.2")


def test_prompt_continuation_through_sample_py(tmp_path, codec):
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=8, block_size=64)
    t = torch.arange(24000) / 24000
    save_wav(str(tmp_path / "prompt.wav"), 0.3 * torch.sin(2 * torch.pi * 440 * t), 24000)  # 1 s > context
    kept_frames = context_keep_steps(64, 0.25, 8)
    sample_dir = run_sample(out_dir, f"--prompt={tmp_path / 'prompt.wav'}", "--seconds=0.4", "--top_k=10")
    audio, _ = sf.read(os.path.join(sample_dir, "sample_000.wav"))
    assert abs(len(audio) - (kept_frames * 320 + 0.4 * 24000)) <= 320      # prompt (cut) + continuation
    sample_dir = run_sample(out_dir, f"--prompt={tmp_path / 'prompt.wav'}", "--seconds=0.4", "--top_k=10",
                            "--keep_prompt=False", f"--sample_dir={tmp_path / 'b'}")
    audio, _ = sf.read(os.path.join(latest_run(tmp_path / "b"), "sample_000.wav"))
    assert abs(len(audio) - 0.4 * 24000) <= 320


@pytest.mark.parametrize("args,message", [
    (["--seconds=0"], "setting 'seconds' must be > 0, got 0.0"),
    (["--seconds=-2"], "setting 'seconds' must be > 0"),
    (["--top_k=0"], "setting 'top_k' must be >= 1, got 0"),
    (["--top_k=1025"], "top_k must be between 1 and the codebook size 1024"),
    (["--top_p=1.5"], r"setting 'top_p' must be in \[0, 1\] \(0 = off\)"),
    (["--top_p=-0.1"], r"setting 'top_p' must be in \[0, 1\] \(0 = off\)"),
    (["--temperature=-1"], r"setting 'temperature' must be >= 0"),
    (["--num_samples=0"], r"setting 'num_samples' must be >= 1"),
    (["--context_stride=0"], r"setting 'context_stride' must be in \(0, 1\]"),
    (["--cfg_coef=-1"], r"setting 'cfg_coef' must be >= 0"),
    (["--style=a,,b"], r"setting 'style' must be None or style names separated by commas"),
    (["--style=jazz"], r"ckpt.pt was trained without styles .*: leave style unset"),
    (["--codec=encodec_24khz"], "codec mismatch: .* was trained on untrained tokens but codec=encodec_24khz"),
    (["--prompt=PROMPT"], "bad.wav"),
    (["--prompt=MISSING"], "nope.wav"),
    (["--prompt=FIFO"], r"pipe.wav: not a regular file \(a named pipe\)"),
    (["--seconds=1e9"], r"^1,000,000,000 s x 1 piece\(s\) need about [\d,.]+ GiB of memory \(KV cache, codes, decoded "
                        r"audio\), more than the [\d,.]+ GiB available: at most about [\d,.]+ s per piece with 1 piece\(s\)$"),
    (["--num_samples=10000000"], r"10 s x 10000000 piece\(s\) need about .*: at most about [\d,]+ pieces at a time$"),
])
def test_errors(tmp_path, codec, args, message):
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2)
    (tmp_path / "bad.wav").write_text("not audio")
    os.mkfifo(tmp_path / "pipe.wav")   # a named pipe: opening it would block until someone writes
    args = [a.replace("PROMPT", str(tmp_path / "bad.wav")).replace("MISSING", str(tmp_path / "nope.wav"))
            .replace("FIFO", str(tmp_path / "pipe.wav")) for a in args]
    signal.alarm(600)   # fail rather than hang, should the pipe ever be opened
    with pytest.raises(UserError, match=message) as e:
        run_sample(out_dir, *args)
    signal.alarm(0)
    assert "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(out_dir, "samples"))   # nothing written on a user error


def test_a_checkpoint_that_cannot_sample_is_one_line(tmp_path, codec):
    out_dir = save_tiny_checkpoint(tmp_path / "old", codec, K=1, block_size=1)   # made before block_size was checked
    with pytest.raises(UserError, match=r"ckpt.pt is not a nanosuno checkpoint \(model_args: setting 'block_size' "
                                        r"must be in 2..1000000, got 1\)"):
        run_sample(out_dir)
    torch.save({"model": {}, "iter_num": 3}, checkpoint_path(tmp_path / "old"))   # a valid torch file, but not ours
    with pytest.raises(UserError, match=r"is not a nanosuno checkpoint \(no model_args of type dict\)"):
        run_sample(out_dir)


def test_only_the_end_of_a_long_prompt_is_read(tmp_path, codec, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(path, demo.synth_piece(0, 12.0, 24000), 24000)
    model = tiny_model(K=8, block_size=64)
    used = prompt_frames_used(model, 12 * 75)                      # 48 frames: what generate() continues
    whole = codec.encode(load_audio(str(path)))[:, -used:]
    read = []
    original = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: read.append(original(self, *a, **k)) or read[-1])
    cfg = SimpleNamespace(prompt=str(path), context_stride=0.25)
    prompt, note = sample.load_prompt(cfg, codec, model)
    assert prompt.shape == (8, used) and note.endswith("(12.0 s), last 0.6 s used")
    assert sum(len(r) for r in read) == (used + codec.context) * 320   # its end and 1 s of codec warm-up
    # the codes of the whole file's end, up to rare near-ties (the codec's windows fall elsewhere)
    assert (prompt == whole).float().mean() > 0.95


def test_a_full_disk_or_a_running_sample_is_one_line(tmp_path, codec, monkeypatch):
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2)
    holder = hold_lock(tmp_path / "out" / "samples", "sample_dir")   # another sample.py writing there
    try:
        with pytest.raises(UserError, match=fr"sample_dir {tmp_path / 'out' / 'samples'} is in use by another run "
                                            fr"\(pid {holder.pid}\)"):
            run_sample(out_dir, "--seconds=0.2")
    finally:
        holder.kill()
        holder.wait()
    fail_writes(monkeypatch, "sample_000.png")
    with pytest.raises(UserError, match=f"^no space left on {tmp_path / 'out' / 'samples' / '001'}"):
        run_sample(out_dir, "--seconds=0.2")
    assert sorted(os.listdir(tmp_path / "out" / "samples")) == [".lock"]   # no half-written run, no temporaries


def test_a_sample_dir_that_cannot_be_made_or_written_is_one_line(tmp_path, codec, monkeypatch):
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=f"^sample_dir {tmp_path / 'notes.txt' / 's'} cannot be created: "
                                        f"{tmp_path / 'notes.txt'} is a file, not a folder$"):
        run_sample(out_dir, "--seconds=0.2", f"--sample_dir={tmp_path / 'notes.txt' / 's'}")
    os.makedirs(tmp_path / "s")
    (tmp_path / "s" / "001").write_text("a file where a run's folder would go: it is left as it is")
    assert os.path.basename(run_sample(out_dir, "--seconds=0.2", f"--sample_dir={tmp_path / 's'}")) == "002"
    assert (tmp_path / "s" / "001").read_text().startswith("a file where")
    fail_writes(monkeypatch, str(tmp_path / "ro"), errno.EROFS)
    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'ro' / 's' / '.lock'}: read-only file system$"):
        run_sample(out_dir, "--seconds=0.2", f"--sample_dir={tmp_path / 'ro' / 's'}")


def test_error_no_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint at .*ckpt.pt: train first \(python train.py"):
        run_sample(str(tmp_path / "nothing"))


def test_error_missing_codec_weights(tmp_path, codec, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # weights cached on this machine must not count
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2, codec_name="encodec_24khz")
    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(UserError, match="encodec_24khz-d7cc33bc.th") as e:
        run_sample(out_dir, f"--codec_dir={empty}")
    assert "\n" not in str(e.value)


def refusal(call):
    """The UserError message of call(), which must refuse."""
    with pytest.raises(UserError) as e:
        call()
    return str(e.value)


def test_the_memory_check_suggests_what_fits(monkeypatch):
    monkeypatch.setattr(sample, "available_memory", lambda device=None: 2 ** 30)
    model, info = tiny_model(K=8), {"frame_rate": 75, "sample_rate": 24000}
    check = lambda frames, pieces, guided=False: sample.check_memory(model, info, frames, pieces, "p.wav", "cpu", guided)
    for guided in (False, True):
        message = refusal(lambda: check(10 ** 8, 3, guided))
        seconds = float(re.search(r"at most about ([\d,.]+) s per piece with 3 piece\(s\)$", message)[1].replace(",", ""))
        check(round(seconds * 75), 3, guided)                    # the suggestion fits...
        refusal(lambda: check(round(seconds * 1.01 * 75), 3, guided))   # ...and is close to the limit
        message = refusal(lambda: check(750, 10 ** 6, guided))
        pieces = int(re.search(r"at most about ([\d,]+) pieces at a time$", message)[1].replace(",", ""))
        check(750, pieces, guided)
        refusal(lambda: check(750, round(pieces * 1.01) + 1, guided))


def test_on_cuda_the_memory_check_weighs_the_gpu_and_the_host_apart(monkeypatch):
    """Nothing is allocated: the check only needs the device's name."""
    model, info = tiny_model(K=8), {"frame_rate": 75, "sample_rate": 24000}
    check = lambda: sample.check_memory(model, info, 750 * 60, 4, None, torch.device("cuda:0"))
    monkeypatch.setattr(sample, "available_memory", lambda device=None: 2 ** 24 if device is not None else 2 ** 40)
    assert re.search(r"of GPU memory \(KV cache, codes\), more than the 0.0 GiB free on cuda:0: at most about ", refusal(check))
    monkeypatch.setattr(sample, "available_memory", lambda device=None: 2 ** 40 if device is not None else 2 ** 24)
    assert re.search(r"of memory \(codes, decoded audio\), more than the 0.0 GiB available: at most about ", refusal(check))
    monkeypatch.setattr(sample, "available_memory", lambda device=None: 2 ** 40)
    check()


def test_each_run_writes_a_complete_folder_of_its_own(tmp_path, codec, monkeypatch):
    """An interrupted run leaves nothing beside earlier samples; a finished one overwrites none of
    them; every page describes exactly the files beside it."""
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2)
    first = run_sample(out_dir, "--seconds=0.2", "--num_samples=2")
    before = {name: open(os.path.join(first, name), "rb").read() for name in os.listdir(first)}
    real_save_wav = sample.save_wav

    def interrupted(path, *args):   # Ctrl-C once the first WAV of the second run is written
        real_save_wav(path, *args)
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "save_wav", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sample(out_dir, "--seconds=0.2", "--num_samples=3", "--seed=5")
    monkeypatch.undo()
    samples = os.path.join(out_dir, "samples")
    assert sorted(os.listdir(samples)) == [".lock", "001", "index.html"]
    third = run_sample(out_dir, "--seconds=0.2", "--num_samples=1", "--seed=6")
    assert os.path.basename(third) == "002"
    assert {name: open(os.path.join(first, name), "rb").read() for name in os.listdir(first)} == before
    for run, n in ((first, 2), (third, 1)):
        page = open(os.path.join(run, "index.html")).read()
        wavs = sorted(f for f in os.listdir(run) if f.endswith(".wav"))
        assert wavs == [f"sample_{i:03d}.wav" for i in range(n)]
        assert sorted(re.findall(r'src="(sample_\d+\.wav)"', page)) == wavs
    runs = open(os.path.join(samples, "index.html")).read()
    assert re.findall(r'href="(\d+)/index.html"', runs) == ["002", "001"]   # newest first


# --- loops ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cycle_model(tmp_path_factory):
    """A model trained on music that repeats every 12 frames (every file the same cycle): the right
    loop of a multiple of 12 frames is known."""
    import train
    root = tmp_path_factory.mktemp("cycle")
    cycle = lambda split, i, frames: np.stack([(np.arange(frames) % 12) * 37 + 5, (np.arange(frames) % 12) * 11 + 2])
    write_token_corpus(root / "tokens", file_frames=[400, 300, 300], val_file_frames=[200], n_codebooks=2,
                       codes_of=cycle)
    train.main([f"--data_dir={root / 'tokens'}", f"--out_dir={root / 'out'}", "--n_codebooks=2", "--n_layer=1",
                "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=8", "--dtype=float32", "--compile=False",
                "--eval_iters=2", "--warmup_iters=5", "--learning_rate=1e-2", "--min_lr=1e-3", "--max_iters=40",
                "--lr_decay_iters=40", "--eval_interval=40", "--sample_every=0", "--device=cpu"])
    return str(root / "out")


def test_a_loop_of_a_periodic_model_repeats_without_a_jump(cycle_model):
    model = model_from_checkpoint(load_checkpoint(cycle_model)).eval()
    loop, seam = generate_loop(model, 24, temperature=0.5, seed=3)
    assert loop.shape == (2, 24)
    twice = torch.cat([loop, loop], dim=1)
    assert all(torch.equal(twice[:, t], twice[:, t + 12]) for t in range(36))   # the cycle goes on across the seam
    assert seam < 0.3 and seam < frame_cross_entropy(model, loop, loop_bridge(24)) + 0.1


def test_sample_writes_loops_of_exactly_their_length_and_plays_them_repeated(cycle_model, capsys):
    run = run_sample(cycle_model, "--loop_seconds=0.32", "--num_samples=2", "--temperature=0.5")
    for name in ("sample_000.wav", "sample_001.wav"):
        audio, rate = sf.read(os.path.join(run, name))
        assert rate == 24000 and len(audio) == 24 * 320   # 0.32 s = 24 frames exactly
    page = open(os.path.join(run, "index.html")).read()
    assert page.count("<audio controls loop") == 2 and "a loop of 0.32 s" in page
    out = capsys.readouterr().out
    assert re.search(r"loop 0: 0.320 s \(24 frames\), seam: model [\d.]+ nats vs [\d.]+ inside; spectral flux \d+ vs 95th percentile", out)
    run = run_sample(cycle_model, "--loop_seconds=0.3", "--bpm=120")   # one beat at 120 bpm: 0.5 s
    assert len(sf.read(os.path.join(run, "sample_000.wav"))[0]) == round(0.5 * 75) * 320


@pytest.mark.parametrize("args, message", [
    (["--loop_seconds=2"], r"^loop_seconds=2 is longer than this model can loop: at most 0.68 s \(its context of "
                           r"0.9 s must hold the loop and the start it leads back to\)$"),
    (["--loop_seconds=0.3", "--seconds=4"], r"^loop_seconds sets each loop's length: leave seconds out$"),
    (["--loop_seconds=-1"], r"setting 'loop_seconds' must be None or > 0, got -1.0"),
    (["--bpm=120"], r"^bpm snaps a loop's length to whole beats: give loop_seconds too$"),
])
def test_bad_loop_settings_are_one_line(cycle_model, args, message):
    with pytest.raises(UserError, match=message):
        run_sample(cycle_model, *args)
