"""
How well a model predicts held-out tokens: the one home of evaluation, used by train.py (during
training), bench.py (learn, steer, decode_quality) and the tests.

    estimate_losses   mean loss over a few random windows per split: cheap, for train.py's evaluations
    split_losses      cross-entropy per codebook over a WHOLE split, in consecutive windows:
                      deterministic, so two models (or two runs) compare exactly
    decode_cross_entropy  the same teacher-forced loss through the one-step decode path (what each
                      decode precision costs)

Every loss is per codebook, over real targets only (the delay pattern's special token never counts).
And on audio, where tokens cannot be compared (a codec's own quality, generated music):

    log_mel, log_mel_l1   the distance between a recording and its reconstruction
    audio_statistics, frechet_distance   how far one set of recordings is from another, as a Fréchet
                      distance between Gaussians fitted to short stretches of their log-mel spectra
    frame_cross_entropy, seam_flux   how natural a loop's seam is, to the model and in its audio
"""
import torch
import torch.nn.functional as F
import torchaudio

from nanosuno.data import windows
from nanosuno.model import codebook_losses
from nanosuno.pattern import delay_interleave


@torch.no_grad()
def estimate_losses(model, splits, eval_iters, batch_size, seed, device, ctx):
    """{split: (mean loss, [loss per codebook])} over eval_iters random batches of each split's
    Batches. The batches come from a fixed seed, so successive evaluations compare like with like,
    and the batch generator's state is put back, so training's randomness is untouched."""
    model.eval()
    out = {}
    for name, batches in splits.items():
        saved = batches.generator.get_state()
        batches.generator.manual_seed(seed)
        per_codebook = torch.zeros(model.config.n_codebooks)
        for _ in range(eval_iters):
            x, y, style_ids = batches.sample(batch_size, device)   # labels kept: the conditional loss
            with ctx:
                logits, _ = model(x, style_ids=style_ids)
            per_codebook += codebook_losses(logits, y, model.config.codebook_size).float().cpu()
        batches.generator.set_state(saved)
        per_codebook /= eval_iters
        out[name] = (per_codebook.nanmean().item(), per_codebook.tolist())
    model.train()
    return out


@torch.no_grad()
def split_losses(model, data_dir, meta, n_codebooks, style_names=None, split="val"):
    """Cross-entropy per codebook over the WHOLE split: every file cut into consecutive windows of
    block_size + 1 frames (the last one shorter), each laid out as in training. style_names: the model's
    styles, to give each window its file's style (None: "no style")."""
    special, K = meta["codebook_size"], n_codebooks
    total, count = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    model.eval()
    for f, window in windows(data_dir, meta, K, model.config.block_size + 1, split):
        window = window[None]                                             # (1, K, n)
        style_id = torch.tensor([style_names.index(f["style"])]) if style_names and f.get("style") in style_names else None
        logits, _ = model(window[:, :, :-1], style_ids=style_id)
        targets = window[:, :, 1:]
        real = (targets != special).sum(-1).flatten().double()        # (K,) real targets per codebook
        losses = codebook_losses(logits, targets, special).double()
        total += torch.nan_to_num(losses) * real
        count += real
    return (total / count).tolist()


def stacked_windows(data_dir, meta, n_codebooks, steps, split="val"):
    """data.windows of exactly `steps` steps, stacked: (windows, K, steps). A file's remainder is left out."""
    return torch.stack([w for _, w in windows(data_dir, meta, n_codebooks, steps, split) if w.shape[1] == steps])


@torch.inference_mode()
def decode_cross_entropy(decoder, windows, batch_size=16):
    """Teacher-forced cross-entropy of windows (N, K, T) fed one step at a time through
    decoder.step (a decode.Decoder), from an empty cache: the mean over codebooks of each codebook's mean over its
    real targets, in nats. Also returns the first window's logits (K, T - 1, V), for comparing
    precisions logit by logit."""
    N, K, T = windows.shape
    special = decoder.config.codebook_size
    total, count, first = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), []
    for i in range(0, N, batch_size):
        batch = windows[i:i + batch_size]
        cache = decoder.new_cache(len(batch), T)
        for t in range(T - 1):
            logits = decoder.step(batch[:, :, t], cache).float()      # predicts step t + 1
            target = batch[:, :, t + 1]
            losses = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=special, reduction="none")
            total += losses.sum(0).double()
            count += (target != special).sum(0).double()
            if i == 0:
                first.append(logits[0])
    return (total / count).mean().item(), torch.stack(first, 1)


@torch.no_grad()
def frame_cross_entropy(model, codes, first, style_id=None):
    """The model's mean cross-entropy (nats per token) of frames first.. of `codes` (K, N), each given
    the frames before it, over every codebook: one forward over the delayed layout (N + K - 1 must fit
    in block_size). A loop's seam is scored by putting the loop's end before its beginning."""
    K, N = codes.shape
    special = model.config.codebook_size
    delayed = delay_interleave(codes.long().to(model.lm_heads.weight.device), special)[None]   # (1, K, N + K - 1)
    targets = delayed[:, :, 1:].clone()
    frame_of = torch.arange(1, N + K - 1)[None, :] - torch.arange(K)[:, None]   # the frame each target is
    targets[0, frame_of.to(targets.device) < first] = special                   # only frames first.. count
    logits, _ = model(delayed[:, :, :-1], style_ids=None if style_id is None else torch.tensor([style_id]))
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=special, reduction="sum")
    return losses.item() / (targets != special).sum().item()


def spectral_flux(waveform, n_fft=1024, hop=256):
    """Per STFT frame, how much louder the spectrum got since the frame before (the half-wave
    rectified difference of log magnitudes, summed over bins): a click or a cut stands out in it."""
    spec = torch.stft(torch.as_tensor(waveform, dtype=torch.float32), n_fft, hop, window=torch.hann_window(n_fft),
                      center=False, return_complex=True).abs()
    level = torch.log1p(spec / spec.max().clamp_min(1e-9) * 1e4)
    return (level[:, 1:] - level[:, :-1]).clamp_min(0).sum(0)


def seam_flux(loop, hop=256, n_fft=1024):
    """(the spectral flux across the seam of `loop` played twice, its 95th percentile inside the
    loop): a seam without a click stays below the percentile."""
    flux = spectral_flux(torch.cat([loop, loop]), n_fft, hop)
    # flux[i] compares STFT frames i and i + 1; the ones whose windows hold the seam:
    seam = len(loop)
    around = [i for i in range(len(flux)) if i * hop < seam < (i + 1) * hop + n_fft]
    inside = torch.tensor([f for i, f in enumerate(flux.tolist()) if i not in around and (i + 1) * hop + n_fft <= seam])
    return flux[around].max().item(), torch.quantile(inside, 0.95).item()


# --- on audio ------------------------------------------------------------------------------------

def log_mel(waveform, sample_rate=24000):
    """log(mel + 1e-5) of a magnitude (power=1.0) mel spectrogram: 80 bands, n_fft 1024, hop 256.
    (..., samples) -> (..., 80, frames)."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=1024, hop_length=256,
                                               n_mels=80, power=1.0)
    return (mel(torch.as_tensor(waveform, dtype=torch.float32)) + 1e-5).log()


def log_mel_l1(a, b):
    """Mean |log_mel(a) - log_mel(b)| over bands and frames, both trimmed to the shorter."""
    la, lb = log_mel(a), log_mel(b)
    n = min(la.shape[-1], lb.shape[-1])
    return (la[..., :n] - lb[..., :n]).abs().mean().item()


# A feature is a stretch of 0.2 s: 4 log-mel frames 64 ms apart, each in 40 bands (pairs of the 80
# averaged). One frame alone would make the distance blind to time: music played backwards, or its
# frames shuffled, has the same frame statistics as the music.
FEATURE_FRAMES, FEATURE_GAP = 4, 6


def audio_features(waveform, sample_rate=24000):
    """(features, 160): every stretch of FEATURE_FRAMES log-mel frames FEATURE_GAP hops apart."""
    mel = log_mel(waveform, sample_rate)                       # (80, frames)
    mel = mel.reshape(40, 2, -1).mean(1)                       # (40, frames)
    span = (FEATURE_FRAMES - 1) * FEATURE_GAP
    n = mel.shape[1] - span
    if n <= 0:
        return torch.zeros(0, 40 * FEATURE_FRAMES)
    return torch.cat([mel[:, k * FEATURE_GAP:k * FEATURE_GAP + n] for k in range(FEATURE_FRAMES)]).T


def audio_statistics(waveforms, sample_rate=24000):
    """(mean, covariance) in float64 of the audio_features of every waveform of a set."""
    features = torch.cat([audio_features(w, sample_rate) for w in waveforms]).double()
    if len(features) < 2:
        raise ValueError("audio_statistics needs at least 0.2 s of audio")
    return features.mean(0), torch.cov(features.T)


def frechet_distance(a, b):
    """The Fréchet distance between Gaussians (mean, covariance) a and b:
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), the trace of the square root computed
    from the eigenvalues of the symmetric C_a^(1/2) C_b C_a^(1/2) (no complex matrix square root)."""
    (mu_a, cov_a), (mu_b, cov_b) = a, b
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()
