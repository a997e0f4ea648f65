"""The codec wrapper: the untrained codec's determinism and code diversity, encode/decode shapes and
windowing, and the message when the pretrained weights cannot be had. CPU, no network."""
import hashlib
import os
import subprocess
import sys
import urllib.error

import pytest
import torch

from conftest import ROOT
from nanosuno import codec as codec_module
from nanosuno.codec import WEIGHTS_FILE, load_codec, pretrained_available
from nanosuno.common import UserError
from nanosuno.demo import synth_piece


@pytest.fixture(scope="module")
def codec():
    return load_codec("untrained")


def music(seconds, index=3):
    return torch.from_numpy(synth_piece(index, seconds))


def state_digest(state):
    """sha256 of a state_dict's names and bytes."""
    sha = hashlib.sha256()
    for key in sorted(state):
        sha.update(key.encode() + state[key].contiguous().numpy().tobytes())
    return sha.hexdigest()


def test_untrained_attributes_and_warning(capsys):
    c = load_codec("untrained")
    assert (c.name, c.sample_rate, c.frame_rate, c.bandwidth, c.n_codebooks, c.codebook_size) == \
        ("untrained", 24000, 75, 6.0, 8, 1024)
    assert "audio quality meaningless" in capsys.readouterr().err.lower()


def test_untrained_is_deterministic_across_processes(codec):
    # a fresh process with one thread builds the weights from scratch: they must match this
    # process's (made with all cores) bit for bit
    script = ("import sys, torch; sys.path.insert(0, 'tests'); from test_codec import state_digest; "
              "torch.set_num_threads(1); "
              "from nanosuno.codec import _untrained_state; print(state_digest(_untrained_state()))")
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == state_digest(codec.model.state_dict())


def test_codes_do_not_depend_on_the_thread_count(codec):
    # what makes prepare's output the same for any number of processes sharing the cores
    audio, threads = music(12.0), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codec.encode(audio)
        torch.set_num_threads(2)
        two = codec.encode(audio)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_codec_from_weights_is_the_same_codec(codec):
    copy = codec_module.codec_from_weights(codec.name, codec.weights())
    assert (copy.name, copy.cache_key, copy.info()) == (codec.name, codec.cache_key, codec.info())
    audio = music(3.0)
    assert torch.equal(copy.encode(audio), codec.encode(audio))


def test_untrained_leaves_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_codec("untrained")
    assert torch.equal(torch.rand(3), expected)


def test_untrained_codes_are_diverse_on_music(codec):
    codes = codec.encode(music(20.0))
    distinct = [len(torch.unique(codes[k])) for k in range(codec.n_codebooks)]
    assert distinct[0] >= 100, distinct
    assert min(distinct) >= 16, distinct


@pytest.mark.parametrize("samples", [1, 319, 320, 321, 36007])
def test_encode_frame_count(codec, samples):
    codes = codec.encode(0.1 * torch.randn(samples))
    assert codes.shape == (8, -(-samples // 320)) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 1024


def test_model_sees_few_input_lengths(codec):
    # the CPU backend keeps memory per input shape: whole seconds only, so prepare's memory stays flat
    lengths = set()
    hook = codec.model.encoder.register_forward_pre_hook(lambda module, args: lengths.add(args[0].shape[-1]))
    try:
        for samples in (3100, 24001, 50000, 290000):
            codes = codec.encode(0.1 * torch.randn(samples))
            assert codes.shape == (8, -(-samples // 320))
    finally:
        hook.remove()
    assert lengths == {24000, 48000, 72000, 264000}  # 264000: a full window, 10 s + 1 s of context


def test_encode_empty(codec):
    assert codec.encode(torch.zeros(0)).shape == (8, 0)


def test_encode_in_windows_matches_one_pass(codec):
    waveform = music(12.0)  # a full window (10 s, + 1 s of context before the next) and a short one
    codes = codec.encode(waveform)
    assert codes.shape == (8, -(-waveform.numel() // 320))
    with torch.inference_mode():
        one_pass = codec.model.quantizer.encode(codec.model.encoder(waveform[None, None]), 75, 6.0)[:, 0]
    # the same up to near-ties of the untrained codebooks at window edges
    assert (codes == one_pass).float().mean() > 0.95
    # blocks of any size give exactly what one waveform gives
    assert torch.equal(codec.encode_blocks(waveform.split(7777)), codes)


def test_decode_shapes(codec):
    codes = codec.encode(music(2.0))
    frames = codes.shape[1]
    for k in (1, 4, 8):
        waveform = codec.decode(codes[:k])
        assert waveform.shape == (frames * 320,) and waveform.dtype == torch.float32
        assert torch.isfinite(waveform).all()
    batch = codec.decode(torch.stack([codes, codes.flip(1)]))
    assert batch.shape == (2, frames * 320)
    assert torch.allclose(batch[0], codec.decode(codes), atol=1e-5)
    assert codec.decode(codes[:, :0]).shape == (0,)


def test_decode_long_input_in_windows(codec):
    codes = torch.randint(0, 1024, (8, 830))  # 11 s: two windows
    waveform = codec.decode(codes)
    assert waveform.shape == (830 * 320,)
    with torch.inference_mode():
        one_pass = codec.model.decoder(codec.model.quantizer.decode(codes[:, None]))[0, 0]
    assert torch.allclose(waveform, one_pass, atol=1e-4)


def test_decode_rejects_bad_codes(codec):
    with pytest.raises(ValueError, match="K <= 8"):
        codec.decode(torch.zeros(9, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie in"):
        codec.decode(torch.full((8, 10), 1024))


def test_unknown_codec_lists_valid_names():
    with pytest.raises(UserError, match="encodec_24khz, spectral, untrained"):
        load_codec("encodec_48khz")


def test_missing_weights_in_codec_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    empty = tmp_path / "weights"
    empty.mkdir()
    assert not pretrained_available(str(empty)) and not pretrained_available()
    with pytest.raises(UserError) as error:
        load_codec("encodec_24khz", codec_dir=str(empty))
    message = str(error.value)
    for part in (WEIGHTS_FILE, str(empty), "--codec_dir", "--codec=spectral", "hub"):
        assert part in message
    assert "\n" not in message
    (empty / WEIGHTS_FILE).write_bytes(b"not the weights")
    assert pretrained_available(str(empty))
    with pytest.raises(UserError, match="is damaged"):
        load_codec("encodec_24khz", codec_dir=str(empty))


def test_missing_weights_when_download_fails(tmp_path, monkeypatch):
    # as on a machine without network: no download is attempted for real
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as error:
        load_codec("encodec_24khz")
    message = str(error.value)
    for part in (WEIGHTS_FILE, os.path.join(str(tmp_path), "hub", "checkpoints"), "--codec_dir",
                 "downloading it failed", "name resolution"):
        assert part in message


def test_missing_weights_cli_is_one_line(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    (tmp_path / "wavs").mkdir()
    from nanosuno.audio import save_wav
    save_wav(tmp_path / "wavs" / "a.wav", music(1.0), 24000)
    result = subprocess.run([sys.executable, "prepare.py", f"--input_dir={tmp_path / 'wavs'}",
                             f"--data_dir={tmp_path / 'tokens'}", f"--codec_dir={tmp_path}"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and WEIGHTS_FILE in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert codec_module.WEIGHTS_URL in result.stderr
