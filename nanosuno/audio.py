"""
Audio files in and out, through soundfile (libsndfile: wav, flac, ogg, mp3). torchaudio's own
load/save need torchcodec, which nanosuno does not use; torchaudio only resamples.

Files are read in blocks and resampled block by block, so a 30-minute recording never sits in
memory at its original rate: each block is resampled together with a little audio on both sides
(the resampling filter's reach), and block edges fall on multiples of the rate ratio, so the
result equals resampling the whole file at once. (MP3 files are the exception: libsndfile needs
to decode them in one piece, see _read_blocks.) The resampler's memory is bounded for any rate,
see resampling_ratio.
"""
import io
import math
import os
import re
from fractions import Fraction

import numpy as np
import soundfile as sf
import torch
import torchaudio

from nanosuno.common import UserError, atomic_write_bytes, not_a_file

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
MAX_KERNEL = 1 << 22   # numbers in torchaudio's resampling kernel (16 MB; 44.1 kHz needs 14,000)
MAX_BLOCK = 1 << 22    # input samples resampled at once (10 s at 384 kHz; a 2 MHz file's 10 s would be 80 MB)


class AudioError(UserError):
    """An audio file that cannot be used: `path` and the `reason` why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def find_audio_files(directory, skipped=None):
    """Audio files under directory (following links), sorted the same way on every machine.
    Folders that cannot be read and broken links are appended to `skipped` as (path, reason);
    hidden files and folders (.name) are left out."""
    found, seen = [], set()

    def walk(folder):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            if skipped is not None:
                skipped.append((folder, f"cannot read folder: {e.strerror or e}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                walk(entry.path)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                if skipped is not None:
                    skipped.append((entry.path, "broken link"))
            elif entry.name.lower().endswith(AUDIO_EXTENSIONS):
                kind = not_a_file(entry.stat().st_mode)   # never open a pipe: reading it can block forever
                if kind and skipped is not None:
                    skipped.append((entry.path, f"not a regular file ({kind})"))
                elif not kind:
                    found.append(entry.path)

    walk(directory)
    return found


def open_audio(path):
    """The file as an open soundfile.SoundFile, or AudioError. Only regular files are opened (a
    named pipe would block), and the OS's reason comes first (libsndfile says "System error" for a
    file it may not read)."""
    try:
        kind = not_a_file(os.stat(path).st_mode)
        if kind:
            raise AudioError(path, f"not a regular file ({kind})")
        if os.path.getsize(path) == 0:
            raise AudioError(path, "empty file (0 bytes)")
        os.close(os.open(path, os.O_RDONLY))
        return sf.SoundFile(path)
    except OSError as e:
        raise AudioError(path, f"cannot read file ({e.strerror})")
    except RuntimeError as e:  # soundfile.LibsndfileError
        raise AudioError(path, f"not a readable audio file ({_reason(e)})")


def audio_seconds(path):
    """Duration from the file's header (0 if it cannot be read): cheap, for progress bars."""
    try:
        with open_audio(path) as f:
            return f.frames / f.samplerate
    except AudioError:
        return 0.0


def iter_audio_blocks(path, sample_rate=24000, block_seconds=10.0, start_seconds=0.0):
    """Yield the file from start_seconds on as consecutive mono float32 tensors at sample_rate
    (channel mean), about block_seconds each. Raises AudioError when the file cannot be read, or
    holds NaN or infinite samples (they would turn into garbage codes)."""
    f = open_audio(path)
    with f:
        rate, declared = f.samplerate, f.frames
        if cut := _cut_short(f.extra_info):
            raise AudioError(path, f"truncated ({cut})")
        start = min(declared, round(start_seconds * rate))
        # resample in whole periods of the rate ratio: `step` input samples give `step_out` outputs
        step, step_out = resampling_ratio(rate, sample_rate)
        # > the filter's reach on each side (6 zero crossings: 7 samples, more when downsampling)
        context = step * math.ceil(max(64, _reach(step, step_out) + 1) / step)
        block = step * max(1, round(min(block_seconds * rate, MAX_BLOCK) / step))
        pending = torch.zeros(context)  # input not yet resampled, after `context` samples of left context
        read = 0
        for data in _read_blocks(f, block, path, start):
            if not np.isfinite(data).all():
                raise AudioError(path, "contains NaN/inf samples")
            read += len(data)
            mono = torch.from_numpy(data.mean(axis=1, dtype=np.float32))
            if rate == sample_rate:
                if len(mono):
                    yield mono
                continue
            pending = torch.cat([pending, mono])
            ready = (pending.numel() - 2 * context) // step * step  # samples that have their right context
            if len(data) == 0:
                ready = pending.numel() - context  # the end: the right context is silence
            if ready > 0:
                # always the same input length (zeros after the right context change no output we
                # keep): every new length would cost memory for good, see codec._encode_batch
                chunk = pending[:context + ready + context]
                chunk = torch.nn.functional.pad(chunk, (0, 2 * context + block - len(chunk)))
                resampled = torchaudio.functional.resample(chunk, step, step_out)
                first = context // step * step_out
                yield resampled[first:first + math.ceil(ready * step_out / step)]
                pending = pending[ready:]
    # headers can be a little off (an Ogg file of the Wesnoth soundtrack promises 0.13 s more than
    # it holds): only a clear shortfall means the file was cut off
    if declared - start - read > max(rate, 0.02 * declared):
        raise AudioError(path, f"truncated (header says {declared / rate:.1f} s, "
                         f"only {(start + read) / rate:.1f} s could be read)")


def resampling_ratio(rate, sample_rate):
    """(step, step_out): resampling from `rate` to `sample_rate` turns `step` input samples into
    `step_out` output samples. torchaudio's kernel for the reduced ratio holds step_out x (step + 2 x
    the filter's reach) numbers: 14,000 for 44.1 kHz (147/80), but 2.3 billion (9 GB) for a rate
    coprime to 24 kHz such as 96001 Hz, which would be ours to allocate. Where the exact ratio's
    kernel is larger than MAX_KERNEL (no common rate's is), the closest ratio whose kernel fits is
    used instead: the audio then plays faster or slower by the difference, 10 ppm for 96001 Hz (as
    if it were 96000 Hz) and under 0.014% for any rate, far less than anyone hears (0.25 cents)."""
    exact = Fraction(rate, sample_rate)
    if _kernel_size(exact) > MAX_KERNEL:
        # the best approximations with denominators up to `lo` fit (up to sample_rate / rate: their
        # numerators are >= 1), find the largest limit that still does
        lo, hi = math.ceil(sample_rate / rate), exact.denominator
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _kernel_size(exact.limit_denominator(mid)) <= MAX_KERNEL else (lo, mid - 1)
        exact = exact.limit_denominator(lo)
    return exact.numerator, exact.denominator


def _reach(step, step_out):
    """How many input samples on each side torchaudio's resampling filter reads (its `width`)."""
    return math.ceil(6 * step / (min(step, step_out) * 0.99))


def _kernel_size(ratio):
    return ratio.denominator * (ratio.numerator + 2 * _reach(ratio.numerator, ratio.denominator))


def _read_blocks(f, block, path, start=0):
    """(frames, channels) float32 arrays of at most `block` frames from frame `start` on, then one
    empty array."""
    try:
        if f.format == "MP3":
            # libsndfile 1.2.2 decodes MP3 wrongly after a read that stops mid-file (or a seek), so
            # an MP3 is read in one piece, as 16-bit (10 MB per stereo minute), and cut up afterwards
            whole = f.read(dtype="int16", always_2d=True)
            for first in range(start, len(whole), block):
                yield whole[first:first + block].astype(np.float32) / 32768
        else:
            f.seek(start)
            while len(data := f.read(block, dtype="float32", always_2d=True)):
                yield data
    except RuntimeError as e:
        raise AudioError(path, f"damaged or truncated ({_reason(e)})")
    yield np.zeros((0, f.channels), dtype=np.float32)


def load_audio(path, sample_rate=24000, start_seconds=0.0):
    """The file (from start_seconds on) as one mono float32 tensor (samples,) at sample_rate."""
    blocks = list(iter_audio_blocks(path, sample_rate, start_seconds=start_seconds))
    return torch.cat(blocks) if blocks else torch.zeros(0)


def save_wav(path, waveform, sample_rate, subtype="PCM_16"):
    """Write (samples,) or (channels, samples) audio as WAV, 16-bit ("PCM_16", clipped to [-1, 1])
    or float ("FLOAT"); made in memory (libsndfile would report a full disk as "System error"),
    then written to a temporary name and renamed."""
    audio = np.asarray(torch.as_tensor(waveform, dtype=torch.float32).cpu())
    audio = audio.T if audio.ndim == 2 else audio  # soundfile wants (samples, channels)
    if subtype.startswith("PCM"):
        audio = np.clip(audio, -1.0, 1.0)
    wav = io.BytesIO()
    sf.write(wav, audio, sample_rate, subtype=subtype, format="WAV")
    atomic_write_bytes(path, wav.getbuffer())


def _cut_short(log):
    """Why libsndfile's log says the file was cut short, or None. libsndfile itself reads what is
    there without complaint; a cut-off recording would otherwise be trained on as if whole."""
    data = re.search(r"^data : (\d+) \(should be (\d+)\)", log, re.M)  # WAV
    if data and int(data[2]) < int(data[1]) < 0xFFFFFF00:  # (streamed WAVs hold a placeholder size)
        return f"its header announces {int(data[1])} bytes of audio, the file holds {int(data[2])}"
    if "Last page lacks an end-of-stream bit" in log:  # Ogg
        return "the Ogg stream stops without its end marker"
    return None


def _reason(error):
    """libsndfile's own words, without the repeated file name."""
    text = str(getattr(error, "error_string", "") or error)
    if "possibly a pipe" in text:  # what libsndfile says of a regular file it cannot make sense of
        return "format not recognised"
    return text.removeprefix("Error : ").rstrip(".")
