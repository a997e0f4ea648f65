"""
The spectral codec: a codec fitted to the user's own corpus, nothing downloaded.

Same token shape as Encodec at 6 kbps (24 kHz mono, a frame every 320 samples = 75 frames/s,
8 codebooks of 1024 codes), so the model cannot tell which codec made its tokens.

Encoding: each frame's magnitude spectrum (Hann window of 1280 samples, centred on the frame's
first sample) is summed into N_MELS triangular mel bands and its log taken: the ear hears bands
of about equal width on the mel scale, and 80 numbers per frame quantise much better with 80 bits
than 641 linear bins. That vector is quantised by residual vector quantisation: codebook 0 gets
the whole vector (loudness and coarse spectral shape, what the model predicts first), each next
codebook quantises what the ones before left over. The late codebooks each see only a group of
bands of the residual (zero elsewhere), which quantises finer than a whole-vector stage would;
since every codeword has the full width, encoding and decoding are plain residual VQ, and decoding
with the first K codebooks only loses detail, never a band.

Decoding: the sum of the codewords is a log-mel spectrum; it is spread back over the linear bins
by interpolating each band's level between band centres (then corrected so that the bands sum to
their targets), and the phase is rebuilt by fast
Griffin-Lim (momentum 0.99) in windows of WINDOW frames, each starting from the phase the
previous window ended with, and cross-faded over their overlap.

The codebooks are fitted by k-means (seeded, fixed iteration counts: deterministic) on at most
max_frames frames drawn uniformly from the training files (random keys, the smallest kept), so
memory stays bounded whatever the corpus size.
"""
import hashlib

import torch
import torchaudio

VERSION = 1
SAMPLE_RATE, HOP, N_FFT = 24000, 320, 1280   # 4 windows overlap each sample
N_MELS = 80
N_CODEBOOKS, CODEBOOK_SIZE = 8, 1024
EPS = 1e-5              # floor of the mel magnitudes before the log (as in the log-mel metric)
CHUNK = 750             # frames encoded at once (10 s): always the same shape, so encode_blocks
                        # gives the same numbers as encode however the audio is split
WINDOW, OVERLAP = 750, 25   # frames per Griffin-Lim window, and frames shared with the next one
GL_ITERS, GL_MOMENTUM = 32, 0.99
MEL_CORRECTIONS = 4
KMEANS_ITERS = 15
MAX_FRAMES = 60_000     # frames kept for fitting: 13 minutes of audio, 19 MB of features
# the bands each codebook quantises: two whole-vector stages, then six groups of bands
BANDS = [(0, N_MELS)] * 2 + [(round(i * N_MELS / 6), round((i + 1) * N_MELS / 6)) for i in range(6)]


def mel_filters(n_mels=N_MELS):
    """(641, n_mels) triangular mel filters (HTK scale, 0..12 kHz, unnormalised)."""
    return torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE)


def mel_to_linear(fb):
    """(n_mels, 641) weights that interpolate a per-band level (in log) linearly between band
    centres onto the linear bins; below the first and above the last centre the level is held."""
    freqs = torch.linspace(0, SAMPLE_RATE / 2, fb.shape[0])
    centres = (fb * freqs[:, None]).sum(0) / fb.sum(0)
    pos = torch.searchsorted(centres, freqs).clamp(1, len(centres) - 1)
    lo, hi = centres[pos - 1], centres[pos]
    t = ((freqs - lo) / (hi - lo)).clamp(0, 1)
    interp = torch.zeros(fb.shape[1], fb.shape[0])
    bins = torch.arange(fb.shape[0])
    interp[pos - 1, bins] = 1 - t
    interp[pos, bins] += t
    return interp


class SpectralCodec:
    """A fitted spectral codec: codebooks (8, 1024, N_MELS), the sum of one codeword from each is
    the log-mel spectrum of a frame. It computes on the CPU (`device` is recorded, as Codec's)."""

    name = "spectral"
    sample_rate, hop_length, frame_rate, bandwidth = SAMPLE_RATE, HOP, SAMPLE_RATE // HOP, 6.0
    n_codebooks, codebook_size = N_CODEBOOKS, CODEBOOK_SIZE
    context = N_FFT // 2 // HOP   # frames of audio before a piece that its first frames' windows reach
                                  # (sample.py reads that much before a prompt's end, as for Encodec)

    def __init__(self, codebooks, device="cpu"):
        self.device = torch.device(device)
        self.codebooks = codebooks.float().contiguous()
        self.norms = self.codebooks.pow(2).sum(-1)          # |c|^2 for the nearest-codeword search
        # the bands a codebook is not zero in: the search needs only those (3x faster encoding)
        used = [book.abs().sum(0).nonzero().flatten() for book in self.codebooks]
        self.spans = [(int(u[0]), int(u[-1]) + 1) if len(u) else (0, 0) for u in used]
        self.fb = mel_filters(codebooks.shape[-1])
        self.window = torch.hann_window(N_FFT)
        # per band: the level of a flat spectrum that gives magnitude 1 in the band, as log
        self.band_log_width = self.fb.sum(0).log()
        self.interp = mel_to_linear(self.fb)
        digest = hashlib.sha256(self.codebooks.numpy().tobytes()).hexdigest()[:16]
        self.cache_key = f"spectral-v{VERSION}-{digest}"

    def info(self, n_codebooks=None):
        return {"name": self.name, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "bandwidth": self.bandwidth, "n_codebooks": n_codebooks or self.n_codebooks,
                "codebook_size": self.codebook_size}

    def weights(self):
        return {"version": torch.tensor(VERSION), "codebooks": self.codebooks.clone()}

    # --- encoding

    def features(self, frames):
        """(n, N_FFT) frames of audio -> (n, n_mels) log-mel magnitudes."""
        spec = torch.fft.rfft(frames * self.window).abs()
        return (spec @ self.fb + EPS).log()

    def quantise(self, x):
        """(n, n_mels) log-mel -> (8, n) codes, residual by residual."""
        codes = []
        for book, norms, (lo, hi) in zip(self.codebooks, self.norms, self.spans):
            idx = (norms - 2 * x[:, lo:hi] @ book[:, lo:hi].T).argmin(1)
            codes.append(idx)
            x = x - book[idx]
        return torch.stack(codes)

    def encode(self, waveform):
        """1-D float waveform at 24 kHz -> codes, int64 (8, ceil(samples / 320))."""
        return self.encode_blocks([waveform])

    def encode_blocks(self, blocks, quantise=True):
        """Like encode, for a waveform given as consecutive 1-D blocks (any lengths). Frame i's
        window covers samples i*320 - 640 .. i*320 + 640 (zeros outside the waveform)."""
        out = []
        for frames, n in self._frame_chunks(blocks):
            x = self.features(frames)
            out.append((self.quantise(x) if quantise else x.T)[:, :n])
        return torch.cat(out, 1) if out else torch.zeros(N_CODEBOOKS if quantise else len(self.fb.T), 0,
                                                          dtype=torch.long if quantise else torch.float32)

    def _frame_chunks(self, blocks):
        """Yield (windows, n): the windows of CHUNK frames of the waveform in blocks, (CHUNK, N_FFT)
        (always that shape), of which the first n are frames of the waveform."""
        need = (CHUNK - 1) * HOP + N_FFT
        pending, total = torch.zeros(N_FFT // 2), 0   # the waveform from frame `done`'s window on
        for block in blocks:
            block = torch.as_tensor(block, dtype=torch.float32)
            if block.dim() != 1:
                raise ValueError(f"encode expects a 1-D mono waveform, got shape {tuple(block.shape)}")
            pending, total = torch.cat([pending, block]), total + len(block)
            while len(pending) >= need:
                yield pending[:need].unfold(0, N_FFT, HOP), CHUNK
                pending = pending[CHUNK * HOP:]
        left = -(-total // HOP) - (total - len(pending) + N_FFT // 2) // HOP   # frames not yet done
        while left > 0:
            buffer = torch.nn.functional.pad(pending[:need], (0, max(0, need - len(pending))))
            yield buffer.unfold(0, N_FFT, HOP), min(left, CHUNK)
            pending, left = pending[CHUNK * HOP:], left - CHUNK

    # --- decoding

    def decode(self, codes):
        """Codes (K, frames) or (B, K, frames), K <= 8 (the first K codebooks) -> float32
        waveform (frames * 320,) or (B, frames * 320)."""
        codes = torch.as_tensor(codes)
        single = codes.dim() == 2
        codes = codes[None] if single else codes
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= N_CODEBOOKS:
            raise ValueError(f"decode expects (K, frames) or (B, K, frames) with 1 <= K <= {N_CODEBOOKS}, "
                             f"got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        codes = codes.long()
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < CODEBOOK_SIZE:
            raise ValueError(f"codes must lie in [0, {CODEBOOK_SIZE}), got {int(codes.min())}..{int(codes.max())}")
        logmel = sum(book[c] for book, c in zip(self.codebooks, codes.unbind(1)))  # (B, frames, n_mels)
        waveform = self.reconstruct(logmel)
        return waveform[0] if single else waveform

    def magnitudes(self, logmel):
        """(B, frames, n_mels) log-mel -> (B, frames, 641) linear magnitudes."""
        mel = (logmel.exp() - EPS).clamp(min=0)
        level = (mel.clamp(min=1e-3 * EPS).log() - self.band_log_width)
        lin = (level @ self.interp).exp()
        # the interpolated spectrum's band sums differ from the targets (neighbouring bands leak into
        # each other): a few multiplicative corrections bring them back (held-out log-mel L1 from
        # exact mels: 0.197 without, 0.144 with 3, 0.139 with 10)
        for _ in range(MEL_CORRECTIONS):
            lin = lin * ((mel / (lin @ self.fb + 1e-3 * EPS)) @ self.interp)
        return lin

    def reconstruct(self, logmel):
        """(B, frames, n_mels) log-mel -> (B, frames * 320) waveform, in windows of WINDOW frames."""
        B, T, _ = logmel.shape
        out = torch.zeros(B, T * HOP)
        phase, fade = None, OVERLAP * HOP
        for start in range(0, T - OVERLAP if T > OVERLAP else min(T, 1), WINDOW - OVERLAP):
            mag = self.magnitudes(logmel[:, start:start + WINDOW])
            audio, angles = self.griffin_lim(mag, phase)
            if start == 0:
                out[:, :audio.shape[1]] = audio
            else:   # cross-fade the overlap (both windows started from the same phase there)
                s, ramp = start * HOP, torch.linspace(0, 1, fade + 2)[1:-1]
                out[:, s:s + fade] = out[:, s:s + fade] * (1 - ramp) + audio[:, :fade] * ramp
                out[:, s + fade:s + audio.shape[1]] = audio[:, fade:]
            phase = angles[:, -OVERLAP:]
        return out

    def stft(self, x):
        """(B, n * 320) -> (B, n, 641): frame i's window is centred on sample i * 320."""
        n = x.shape[1] // HOP
        padded = torch.nn.functional.pad(x, (N_FFT // 2, N_FFT // 2))
        return torch.fft.rfft(padded.unfold(1, N_FFT, HOP)[:, :n] * self.window)

    def istft(self, spec):
        """(B, n, 641) -> (B, n * 320): least-squares overlap-add of the windowed frames (the
        inverse of stft for a consistent spectrogram). torch.istft took 4x longer."""
        B, n, _ = spec.shape
        frames = (torch.fft.irfft(spec, N_FFT) * self.window).view(B, n, N_FFT // HOP, HOP)
        out = torch.zeros(B, n + N_FFT // HOP - 1, HOP)
        for q in range(N_FFT // HOP):
            out[:, q:q + n] += frames[:, :, q]
        start = N_FFT // 2
        return out.view(B, -1)[:, start:start + n * HOP] / self.envelope(n)

    def envelope(self, n):
        """The sum of the squared windows over each sample of n frames (never below 0.1)."""
        w2 = self.window.pow(2).view(N_FFT // HOP, HOP)
        env = torch.zeros(n + N_FFT // HOP - 1, HOP)
        for q in range(N_FFT // HOP):
            env[q:q + n] += w2[q]
        return env.view(-1)[N_FFT // 2:N_FFT // 2 + n * HOP].clamp(min=0.1)

    def griffin_lim(self, mag, phase=None):
        """(B, n, 641) magnitudes -> (B, n * 320) audio and the final unit phases (B, n, 641), by fast
        Griffin-Lim. `phase` (B, m, 641): known phases of the first m frames; the others start at 1."""
        angles = torch.ones(mag.shape, dtype=torch.complex64)
        if phase is not None:
            angles[:, :phase.shape[1]] = phase
        prev = torch.zeros_like(angles)
        for _ in range(GL_ITERS):
            rebuilt = self.stft(self.istft(mag * angles))
            angles = rebuilt - prev * (GL_MOMENTUM / (1 + GL_MOMENTUM))
            angles = angles / (angles.abs() + 1e-16)
            prev = rebuilt
        return self.istft(mag * angles), angles


# --- fitting

def kmeans(x, k, gen, iters=KMEANS_ITERS):
    """Centres (k, dim) of x (n, dim) after `iters` Lloyd steps from k distinct random rows; an
    empty cluster keeps its centre. Assignments in slices bound the memory to 64 MB."""
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def nearest(x, centres, rows=16384):
    norms = centres.pow(2).sum(1)
    return torch.cat([(norms - 2 * part @ centres.T).argmin(1) for part in x.split(rows)])


def fit_codebooks(x, bands=BANDS, seed=0, iters=KMEANS_ITERS):
    """Residual k-means on log-mel frames x (n, n_mels): codebook i is fitted on bands[i] = (lo, hi)
    of the residual the codebooks before it leave, and is zero outside those bands."""
    gen = torch.Generator().manual_seed(seed)
    books, residual = [], x.clone()
    for lo, hi in bands:
        book = torch.zeros(CODEBOOK_SIZE, x.shape[1])
        book[:, lo:hi] = kmeans(residual[:, lo:hi].contiguous(), CODEBOOK_SIZE, gen, iters)
        residual -= book[nearest(residual, book)]
        books.append(book)
    return torch.stack(books)


def fit_spectral(waveforms, seed=0, max_frames=MAX_FRAMES):
    """A SpectralCodec fitted on waveforms (an iterable of 1-D 24 kHz tensors, one per training
    file, e.g. a generator reading them one by one). Every frame of every file gets a random key
    (seeded), and the max_frames frames with the smallest keys are kept: a uniform sample of the
    whole corpus in bounded memory."""
    gen = torch.Generator().manual_seed(seed)
    probe = SpectralCodec(torch.zeros(N_CODEBOOKS, CODEBOOK_SIZE, N_MELS))   # just for its features
    kept, keys = torch.zeros(0, N_MELS), torch.zeros(0)
    for waveform in waveforms:
        x = probe.encode_blocks([waveform], quantise=False).T
        kept, keys = torch.cat([kept, x]), torch.cat([keys, torch.rand(len(x), generator=gen)])
        if len(keys) > max_frames:
            keys, order = keys.topk(max_frames, largest=False, sorted=True)
            kept = kept[order]
    if len(kept) < CODEBOOK_SIZE:
        raise ValueError(f"the spectral codec needs at least {CODEBOOK_SIZE} frames "
                         f"({CODEBOOK_SIZE / 75:.0f} s of audio) to fit, got {len(kept)}")
    return SpectralCodec(fit_codebooks(kept, BANDS, seed))


def spectral_from_weights(state, device="cpu"):
    """The codec whose weights() are `state`; ValueError (one line) when state is not that."""
    if not isinstance(state, dict) or set(state) != {"version", "codebooks"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not spectral codec weights: expected keys ['codebooks', 'version'], got {keys}")
    version, books = state["version"], state["codebooks"]
    if not isinstance(version, torch.Tensor) or version.numel() != 1 or int(version) != VERSION:
        raise ValueError(f"spectral codec weights of an unknown format version {version!r} (this nanosuno "
                         f"reads version {VERSION}): fit the codec again")
    shape = (N_CODEBOOKS, CODEBOOK_SIZE, N_MELS)
    if not isinstance(books, torch.Tensor) or books.dtype != torch.float32 or tuple(books.shape) != shape:
        got = f"{books.dtype} {tuple(books.shape)}" if isinstance(books, torch.Tensor) else type(books).__name__
        raise ValueError(f"spectral codec codebooks must be float32 {shape}, got {got}")
    if not torch.isfinite(books).all():
        raise ValueError("spectral codec codebooks hold NaN or infinite values: the file is damaged")
    return SpectralCodec(books.detach().cpu(), device)


def save_spectral(codec, path):
    """Write the codec's weights to path (torch.save of tensors only, no pickled objects)."""
    torch.save(codec.weights(), path)


def load_spectral(path, device="cpu"):
    """The codec save_spectral wrote to path; ValueError (one line) for a missing, truncated or
    foreign file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # zip errors, unpickling errors, OSError...: all mean "not this file"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable spectral codec file ({reason[:200]})") from None
    try:
        return spectral_from_weights(state, device)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
