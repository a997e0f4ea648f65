"""Pictures people would rather look at than read: loss curves and spectrograms (matplotlib, no display needed)."""
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanosuno.common import atomic_write_bytes  # noqa: E402


def save_loss_plot(log_path, png_path):
    """Loss curves from train.py's log.jsonl: training loss, evaluated train/val loss, and val loss
    per codebook, each next to its best simple baseline (dashed: what counting token statistics
    scores on val; a model above its dashed line has learned less than counting)."""
    records = read_log(log_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "train_loss" in r]
    fig, (ax, ax_cb) = plt.subplots(1, 2, figsize=(12, 4.5))
    if steps:
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)")
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        points = [(r["iter"], r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points), style, ms=3, label=key.replace("_loss", " (eval)"))
    baselines = [r for r in evals if "baseline_loss" in r]
    if baselines:  # the yardstick: what simple token statistics score on val
        ax.axhline(baselines[-1]["baseline_loss"], color="gray", ls="--", lw=1, label="best simple baseline (val)")
    ax.set(xlabel="iteration", ylabel="cross-entropy (nats)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    key = "val_codebook_losses" if any("val_codebook_losses" in r for r in evals) else "train_codebook_losses"
    per_codebook = [(r["iter"], r[key]) for r in evals if key in r]
    if per_codebook:
        iters, values = zip(*per_codebook)
        for k in range(len(values[0])):
            line, = ax_cb.plot(iters, [v[k] for v in values], "o-", ms=3, label=f"codebook {k}")
            if baselines:  # each codebook's best simple baseline, dashed, in its colour
                ax_cb.axhline(baselines[-1]["baseline_codebook_losses"][k], color=line.get_color(), ls="--", lw=1)
        ax_cb.legend(fontsize=8, ncol=2)
    ax_cb.set(xlabel="iteration", ylabel="cross-entropy (nats)", title=key.replace("_", " ").replace("losses", "loss"))
    ax_cb.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, png_path, dpi=100)


def read_log(log_path):
    """The records of train.py's log.jsonl. A last line that does not parse was cut off by a crash
    in the middle of writing it, and is left out."""
    with open(log_path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:   # damage inside the log is not a crash's: say so
                raise
    return records


def save_spectrogram(path, waveform, sample_rate, title=""):
    """Log-magnitude spectrogram of a mono waveform as a PNG: time in seconds, frequency in kHz,
    loudness in dB below the loudest bin (floored at -80 dB so that silence stays readable)."""
    save_spectrograms(path, [(title, waveform)], sample_rate)


def save_spectrograms(path, rows, sample_rate):
    """Spectrograms of (title, mono waveform) rows, one above the other on a common time axis, as
    one PNG (see save_spectrogram)."""
    import torch
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 3.5 * len(rows)), squeeze=False)
    for ax, (title, waveform) in zip(axes[:, 0], rows):
        waveform = torch.as_tensor(waveform, dtype=torch.float32).flatten().cpu()
        n_fft, hop = 1024, 256
        spec = torch.stft(waveform, n_fft, hop, window=torch.hann_window(n_fft), pad_mode="constant",
                          return_complex=True).abs()
        db = 20 * torch.log10(spec.clamp_min(1e-6))
        db = (db - db.max()).clamp_min(-80)
        extent = (0, len(waveform) / sample_rate, 0, sample_rate / 2000)
        image = ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", extent=extent)
        ax.set(xlabel="seconds", ylabel="kHz", title=title)
        fig.colorbar(image, ax=ax, label="dB")
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def save_png(fig, path, dpi):
    """Write a figure as PNG (made in memory, then atomic_write_bytes) and close it."""
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, image.getbuffer())
