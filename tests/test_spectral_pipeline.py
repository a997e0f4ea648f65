"""The spectral codec through the pipeline: prepare.py fits it on the corpus and stores it beside the
tokens, train.py puts it in every checkpoint, sample.py decodes with it without the data_dir. A small
synthetic corpus (the spectral codec needs >= 14 s of train audio), CPU."""
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import prepare
import sample
import train
from nanosuno import demo
from nanosuno.checkpoint import checkpoint_path
from nanosuno.codec import codec_from_weights
from nanosuno.common import UserError
from nanosuno.data import read_meta
from nanosuno.spectral import load_spectral
from test_train import TINY


def make_corpus(folder, seconds=(8.0, 8.0, 8.0)):
    os.makedirs(folder, exist_ok=True)
    for i, s in enumerate(seconds):
        sf.write(os.path.join(folder, f"piece_{i}.wav"), demo.synth_piece(i, s, 24000), 24000)
    return str(folder)


def run_prepare(corpus, data_dir, *args):
    prepare.main([f"--input_dir={corpus}", f"--data_dir={data_dir}", "--codec=spectral", "--val_fraction=0.3", *args])


def read_bytes(data_dir):
    return {name: open(os.path.join(data_dir, name), "rb").read()
            for name in ("codec.pt", "train.bin", "val.bin", "meta.json")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A corpus prepared with --codec=spectral, and what prepare printed."""
    root = tmp_path_factory.mktemp("spectral")
    corpus = make_corpus(root / "wavs")
    run_prepare(corpus, root / "tokens")
    return root, corpus


def test_prepare_fits_and_stores_the_codec_and_a_rerun_hits_the_cache(prepared, capsys):
    root, corpus = prepared
    meta = read_meta(root / "tokens")
    assert meta["codec"] == "spectral" and meta["codec_file"]["path"] == "codec.pt"
    assert meta["splits"]["train"]["frames"] > 1024 and meta["splits"]["val"]["frames"] > 0
    before = read_bytes(root / "tokens")
    run_prepare(corpus, root / "tokens")
    out = capsys.readouterr().out
    # the same train files and seed: the stored codec, not a new fit, and every file from the cache
    assert f"using the spectral codec in {root / 'tokens' / 'codec.pt'}: fitted on the same train files" in out
    assert "fitted the spectral codec" not in out
    assert "with codec spectral into" in out and ": 0 to encode, 3 cached" in out
    assert read_bytes(root / "tokens") == before


def test_the_codec_is_fitted_again_when_its_train_files_seed_or_file_change(tmp_path, capsys):
    corpus, data = make_corpus(tmp_path / "wavs"), tmp_path / "tokens"
    run_prepare(corpus, data)
    assert "fitted the spectral codec on the train split (2 file(s), 1,200 frames, 1,200 sampled) in " in \
        capsys.readouterr().out
    first = read_bytes(data)
    run_prepare(corpus, data, "--seed=2")   # another seed samples other frames: another codec
    assert "fitted the spectral codec" in capsys.readouterr().out and read_bytes(data)["codec.pt"] != first["codec.pt"]
    run_prepare(corpus, data)   # back to the first seed: fitted again, the same codec as the first time
    assert "fitted the spectral codec" in capsys.readouterr().out and read_bytes(data) == first
    train_file = os.path.join(corpus, read_meta(data)["splits"]["train"]["files"][0]["path"])
    sf.write(train_file, demo.synth_piece(7, 8.0, 24000), 24000)   # a train file rewritten
    run_prepare(corpus, data)
    out = capsys.readouterr().out
    assert "fitted the spectral codec" in out and ": 3 to encode, 0 cached" in out   # a new codec: new codes
    with open(data / "codec.pt", "r+b") as f:   # a damaged codec file is fitted again, not an error
        f.truncate(1000)
    run_prepare(corpus, data)
    assert "fitted the spectral codec" in capsys.readouterr().out
    assert load_spectral(data / "codec.pt").cache_key == read_meta(data)["codec_file"]["key"]


def test_the_same_corpus_prepared_twice_gives_the_same_bytes(prepared, tmp_path):
    root, corpus = prepared
    run_prepare(corpus, tmp_path / "again")
    assert read_bytes(tmp_path / "again") == read_bytes(root / "tokens")


def test_too_little_audio_to_fit_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"cannot fit the spectral codec on the train split of .* \(1 file\(s\), "
                                        r"3\.0 s\): the spectral codec needs at least 1024 frames") as error:
        run_prepare(make_corpus(tmp_path / "wavs", (3.0,)), tmp_path / "tokens", "--val_fraction=0")
    assert "\n" not in str(error.value)


def test_a_corrupt_codec_file_is_one_line(prepared, tmp_path):
    data = tmp_path / "tokens"
    shutil.copytree(prepared[0] / "tokens", data)
    with open(data / "codec.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"codec\.pt: not a readable spectral codec file .*: run prepare\.py again") as error:
        train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=1"])
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def trained(prepared):
    """A tiny model trained on a copy of the prepared corpus, with a progress sample; the copy is then
    deleted: what uses the checkpoint has no data_dir."""
    root, _ = prepared
    out, data = root / "out", root / "gone"
    shutil.copytree(root / "tokens", data)
    train.main([f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2",
                "--sample_every=1"])
    shutil.rmtree(data)
    return out


def test_the_checkpoint_carries_the_codec_and_sample_needs_no_data_dir(prepared, trained, tmp_path):
    root, _ = prepared
    assert os.path.isfile(trained / "progress" / "iter_000002.wav")
    ckpt = torch.load(checkpoint_path(trained), weights_only=True)
    fitted = torch.load(root / "tokens" / "codec.pt", weights_only=True)
    assert torch.equal(ckpt["codec_weights"]["codebooks"], fitted["codebooks"])
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    sample.main([f"--out_dir={out}", "--device=cpu", "--seconds=1", "--num_samples=1"])
    audio, rate = sf.read(out / "samples" / "001" / "sample_000.wav")
    assert rate == 24000 and len(audio) == 24000 and abs(audio).max() > 0
    # beside the samples: the start of a val file through the codec, from the checkpoint alone
    reference, _ = sf.read(out / "samples" / "001" / "reference.wav")
    val = json.load(open(root / "tokens" / "meta.json"))["splits"]["val"]["files"][0]
    assert len(reference) == min(600, val["frames"]) * 320 and abs(reference).max() > 0
    assert torch.equal(ckpt["reference_codes"], torch.from_numpy(
        np.fromfile(root / "tokens" / "val.bin", dtype=np.uint16).reshape(-1, 8)[:min(600, val["frames"])].astype(np.int64)).T)
    assert "your music through the codec" in open(out / "samples" / "001" / "index.html").read()


def test_a_checkpoint_with_corrupt_codec_weights_is_one_line(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt = torch.load(checkpoint_path(out), weights_only=True)
    ckpt["codec_weights"]["codebooks"][0, 0, 0] = float("nan")
    torch.save(ckpt, checkpoint_path(out))
    with pytest.raises(UserError, match=r"is not a nanosuno checkpoint \(codec_weights: spectral codec codebooks hold "
                                        r"NaN or infinite values") as error:
        sample.main([f"--out_dir={out}", "--device=cpu", "--seconds=1"])
    assert "\n" not in str(error.value)


def test_torchrun_ranks_rebuild_the_fitted_codec_from_its_weights(prepared):
    fitted = load_spectral(prepared[0] / "tokens" / "codec.pt")
    copy = codec_from_weights("spectral", fitted.weights())
    audio = torch.as_tensor(demo.synth_piece(5, 2.0, 24000))
    assert copy.cache_key == fitted.cache_key and torch.equal(copy.encode(audio), fitted.encode(audio))
