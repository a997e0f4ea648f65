"""The spectral codec: fitting, encoding, decoding, saving. Synthetic audio only (tones and noise)."""
import math

import pytest
import torch

from nanosuno import spectral
from nanosuno.evaluate import log_mel, log_mel_l1
from nanosuno.spectral import (SpectralCodec, fit_spectral, load_spectral, save_spectral,
                               spectral_from_weights)

SR = 24000


def tones(seconds, seed, segment=0.5):
    """Segments of 1 to 3 harmonic tones (60 Hz .. 1.5 kHz, 1-8 partials each) plus noise, at
    -40..0 dB, faded in and out in each segment."""
    gen = torch.Generator().manual_seed(seed)
    n, seg = int(seconds / segment), int(segment * SR)
    t = torch.arange(seg) / SR
    out = 0
    for voice in range(3):
        f0 = 60 * 25 ** torch.rand(n, 1, generator=gen)
        partials = torch.randint(1, 9, (n, 1), generator=gen)
        on = torch.rand(n, 1, generator=gen) < (1 if voice == 0 else 0.6)
        out = out + on * sum(torch.sin(2 * math.pi * f0 * h * t) / h * (h <= partials) for h in range(1, 9))
    gain = 10 ** (-2 * torch.rand(n, 1, generator=gen))
    noise = torch.randn(n, seg, generator=gen) * 0.1 * torch.rand(n, 1, generator=gen)
    envelope = torch.sin(math.pi * t / segment) ** 0.5
    return (0.1 * gain * envelope * (out + noise)).flatten()


CHORD = (220.0, 330.0, 550.0)   # A3, E4, C#5: a mel band or more apart at 80 bands


def chord(seed, gain=1.0, freqs=CHORD, seconds=2.0):
    """A chord, each note with 4 partials, over a noise floor at -60 dB (a pure tone's spectrum
    falls far below what any recording holds, and the log-mel distance would mostly weigh that)."""
    t = torch.arange(int(seconds * SR)) / SR
    noise = 1e-3 * torch.randn(len(t), generator=torch.Generator().manual_seed(seed))
    return gain * 0.1 * sum(torch.sin(2 * math.pi * f * h * t) / h for f in freqs for h in range(1, 5)) + noise


def training_audio():
    """30 s of tones and, as in a corpus that holds it, the chord (softer, another noise)."""
    return [tones(10, 0), tones(10, 1), chord(5, gain=0.5), tones(10, 2)]


@pytest.fixture(scope="module")
def codec():
    return fit_spectral(iter(training_audio()), seed=0)


def test_fit_is_deterministic_and_keyed_by_its_codebooks(codec):
    again = fit_spectral(iter(training_audio()), seed=0)
    assert torch.equal(again.codebooks, codec.codebooks)
    assert again.cache_key == codec.cache_key and codec.cache_key.startswith("spectral-v1-")
    nudged = codec.codebooks.clone()
    nudged[7, 0, -1] += 1e-6
    assert SpectralCodec(nudged).cache_key != codec.cache_key
    # the late codebooks quantise groups of bands: zero outside them
    assert (codec.codebooks[-1, :, :spectral.BANDS[-1][0]] == 0).all()


def test_fit_keeps_at_most_max_frames_and_needs_enough_audio():
    small = fit_spectral([tones(10, 5), tones(10, 6)], max_frames=1100)   # 1500 frames offered
    assert small.codebooks.shape == (8, 1024, spectral.N_MELS)
    other_seed = fit_spectral([tones(10, 5), tones(10, 6)], seed=1, max_frames=1100)
    assert not torch.equal(other_seed.codebooks, small.codebooks)
    with pytest.raises(ValueError, match="at least 1024 frames"):
        fit_spectral([tones(5, 5)])


def test_info_and_attributes(codec):
    assert codec.info() == {"name": "spectral", "sample_rate": 24000, "frame_rate": 75, "bandwidth": 6.0,
                            "n_codebooks": 8, "codebook_size": 1024}
    assert codec.info(4)["n_codebooks"] == 4
    assert (codec.hop_length, codec.n_codebooks, codec.codebook_size) == (320, 8, 1024)


@pytest.mark.parametrize("samples", [0, 1, 319, 320, 321, 24000 + 17])
def test_encode_decode_lengths(codec, samples):
    codes = codec.encode(tones(2, 7)[:samples] if samples else torch.zeros(0))
    frames = -(-samples // 320)
    assert codes.shape == (8, frames) and codes.dtype == torch.int64
    assert codes.numel() == 0 or 0 <= codes.min() <= codes.max() < 1024
    audio = codec.decode(codes)
    assert audio.shape == (frames * 320,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()


def test_encode_blocks_equals_encode(codec):
    audio = tones(21, 8)   # 1575 frames: more than two encoding chunks of 750
    gen = torch.Generator().manual_seed(0)
    cuts = sorted(torch.randint(0, len(audio), (12,), generator=gen).tolist()) + [5000, 5000, 5001]
    cuts = sorted(cuts)
    blocks = [audio[a:b] for a, b in zip([0] + cuts, cuts + [len(audio)])]   # some empty, one 1 sample
    assert torch.equal(codec.encode_blocks(iter(blocks)), codec.encode(audio))


def test_batch_and_long_decode(codec):
    codes = torch.stack([codec.encode(tones(3, 9)), codec.encode(tones(3, 10))])   # (2, 8, 225)
    batch = codec.decode(codes[:, :5])
    assert batch.shape == (2, 225 * 320)
    for b in range(2):
        assert torch.allclose(batch[b], codec.decode(codes[b, :5]), atol=1e-4)
    # longer than one Griffin-Lim window: decoded in windows, still follows the original
    audio = tones(12, 11)
    out = codec.decode(codec.encode(audio))
    assert out.shape == (900 * 320,) and torch.isfinite(out).all()
    assert log_mel_l1(audio, out) < 0.6 * log_mel_l1(audio, tones(12, 12))


def test_fewer_codebooks_degrade_gracefully(codec):
    audio = tones(6, 13)   # not in the training audio
    codes = codec.encode(audio)
    l1 = {k: log_mel_l1(audio, codec.decode(codes[:k])) for k in (1, 2, 4, 8)}
    assert l1[8] < l1[4] < l1[2] < l1[1]
    assert l1[1] < 0.8 * log_mel_l1(audio, tones(6, 14))   # codebook 0 alone is already that sound


def test_chord_partials_survive_a_round_trip(codec):
    audio = chord(6)   # the chord of the training audio, louder, with another noise floor
    out = codec.decode(codec.encode(audio))
    # measured: 0.35 for the reconstruction; 0.25 decoding the exact (unquantised) log-mel, which
    # is as close as this representation gets; 1.36 against the chord a fifth higher
    distance = log_mel_l1(audio, out)
    assert distance < 0.45 and distance < 0.4 * log_mel_l1(audio, chord(7, freqs=[f * 1.5 for f in CHORD]))
    # the reconstruction's spectrum peaks at the notes: a local maximum within 2 bins (of 5.9 Hz)
    # of each fundamental, standing well above the spectrum 27 Hz (a mel band) to either side
    # (measured: 7x to 22x; the original 29x to 107x)
    spectrum = torch.stft(out[SR // 2:-SR // 2], 4096, 1024, window=torch.hann_window(4096),
                          return_complex=True).abs().mean(1)
    bin_hz = SR / 4096
    for f in CHORD:
        k = round(f / bin_hz)
        peak = int(spectrum[k - 2:k + 3].argmax()) + k - 2
        assert spectrum[peak] == spectrum[peak - 3:peak + 4].max()
        for side in (f - 27, f + 27):
            assert spectrum[peak] > 4 * spectrum[round(side / bin_hz)]


def test_bad_inputs_are_value_errors(codec):
    codes = codec.encode(tones(1, 15))
    for bad in (codes[0], codes[None, None], torch.zeros(9, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="decode expects"):
            codec.decode(bad)
    for value in (-1, 1024):
        with pytest.raises(ValueError, match=r"\[0, 1024\)"):
            codec.decode(torch.full((8, 3), value))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(codes.float())
    with pytest.raises(ValueError, match="1-D"):
        codec.encode(torch.zeros(2, 100))


def test_weights_round_trip(codec, tmp_path):
    path = tmp_path / "spectral.pt"
    save_spectral(codec, path)
    loaded = load_spectral(path)
    rebuilt = spectral_from_weights(codec.weights())
    audio = tones(2, 16)
    codes = codec.encode(audio)
    for other in (loaded, rebuilt):
        assert other.cache_key == codec.cache_key
        assert torch.equal(other.encode(audio), codes)
        assert torch.equal(other.decode(codes), codec.decode(codes))
    assert path.stat().st_size < 3_000_000   # 8 x 1024 x 80 float32 and little else


def one_line_value_error(call):
    with pytest.raises(ValueError) as info:
        call()
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    return str(info.value)


def test_damaged_files_are_one_clear_error(codec, tmp_path):
    good = tmp_path / "good.pt"
    save_spectral(codec, good)
    data = good.read_bytes()
    cases = {"truncated.pt": data[:len(data) // 2], "garbage.pt": b"not a codec at all" * 100, "empty.pt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert name in one_line_value_error(lambda: load_spectral(tmp_path / name))
    assert "missing.pt" in one_line_value_error(lambda: load_spectral(tmp_path / "missing.pt"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert "expected keys" in one_line_value_error(lambda: load_spectral(tmp_path / "other.pt"))


def test_bad_weights_are_one_clear_error(codec):
    good = codec.weights()
    nan = good["codebooks"].clone()
    nan[3, 5, 7] = float("nan")
    cases = {"NaN": {**good, "codebooks": nan},
             "must be float32": {**good, "codebooks": good["codebooks"][:, :512]},
             "float32": {**good, "codebooks": good["codebooks"].double()},
             "version": {**good, "version": torch.tensor(99)},
             "expected keys": {"codebooks": good["codebooks"]}}
    for message, state in cases.items():
        assert message in one_line_value_error(lambda: spectral_from_weights(state))
    assert "expected keys" in one_line_value_error(lambda: spectral_from_weights([1, 2]))


def test_log_mel_l1():
    a, b = tones(2, 17), tones(2, 18)
    assert log_mel_l1(a, a) == 0.0
    assert log_mel_l1(a, b) == log_mel_l1(b, a) > 1.0
    assert log_mel_l1(a, torch.cat([a, torch.zeros(1000)])) < 1e-3   # trimmed to the shorter
    assert log_mel(a).shape == (80, len(a) // 256 + 1)
