"""
Generate music with a trained model and write it as audio.

    python sample.py                                    # out/ckpt.pt -> out/samples/
    python sample.py config/small.py --seconds=120 --num_samples=4
    python sample.py --prompt=intro.wav --seconds=20    # continue a recording
    python sample.py --style=jazz,rock --cfg_coef=3     # one piece per style (a model trained with styles)
    python sample.py --loop_seconds=8 --bpm=120         # seamless loops of 16 beats

Each run writes a folder of its own in sample_dir (default out_dir/samples): 001/, 002/, ... with
sample_000.wav, ... (24 kHz mono), a spectrogram PNG per sample and index.html to listen to them in
a browser; sample_dir/index.html lists the runs. A run's folder appears only once it is complete
(it is written under a temporary name), so a page always describes exactly the files beside it,
and no run overwrites another's samples. The model's shape and codec come
from the checkpoint; `seconds` is the length of the new music (the prompt comes on top of it).
Only the end of a long prompt is read (what the model's context continues); a request that cannot
fit in memory is refused before anything is allocated; one run at a time writes into a sample_dir.
"""
import math
import os
import time

from nanosuno.common import require_dependencies

require_dependencies()  # one line, not a traceback, when torch and torchaudio do not load together

import torch
from tqdm import tqdm

from nanosuno.audio import load_audio, open_audio, save_wav
from nanosuno.checkpoint import check_codec, check_codec_setting, checkpoint_path, load_checkpoint, model_from_checkpoint
from nanosuno.codec import codec_for, decode_loop, untrained_warning
from nanosuno.common import UserError, atomic_folder, lock_folder, run_cli
from nanosuno.config import load_config
from nanosuno.decode import Decoder, cache_dtype
from nanosuno.evaluate import frame_cross_entropy, seam_flux
from nanosuno.generate import check_sampling, generate, generate_loop, loop_bridge, loop_fits, prompt_frames_used
from nanosuno.hardware import device_type, pick_decode_dtype, pick_device
from nanosuno.pages import write_runs_page, write_sample_page
from nanosuno.plots import save_spectrogram

# memory per audio sample of a decoded piece while its WAV and spectrogram are made (check_memory):
# peak RSS grew by 119-124 bytes per sample writing 60 s and 240 s pieces on a CPU
AUDIO_BYTES_PER_SAMPLE = 128


class StepsBar(tqdm):
    """tqdm over model steps that also shows the x real-time factor (audio seconds made per second).
    generate() sets its total."""

    def __init__(self, audio_seconds_per_step):
        self.audio_seconds_per_step = audio_seconds_per_step
        super().__init__(unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps "
                         "[{elapsed}<{remaining}, {rate_fmt}, {realtime:.1f}x real time]")

    @property
    def format_dict(self):
        d = super().format_dict
        rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else 0.0)
        d["realtime"] = rate * self.audio_seconds_per_step
        return d


def load_prompt(cfg, codec, model):
    """The end of the prompt file that generate() continues (prompt_frames_used), as codes (K,
    frames) with the checkpoint's codec, and a note on what is used. Only that end is read and
    encoded, with a second of audio before it that warms up the causal codec (whose codes are
    dropped), however long the file is."""
    try:
        with open_audio(cfg.prompt) as f:
            frames = math.ceil(f.frames / f.samplerate * codec.frame_rate)   # the whole prompt's
        used = prompt_frames_used(model, frames, cfg.context_stride)
        start = max(0, frames - used - codec.context)
        waveform = load_audio(cfg.prompt, codec.sample_rate, start_seconds=start / codec.frame_rate)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read prompt {cfg.prompt} ({type(e).__name__}: {e}); give a WAV, FLAC, OGG or MP3 file")
    if waveform.numel() < codec.hop_length:
        raise UserError(f"prompt {cfg.prompt} is shorter than one codec frame; give at least a fraction of a second")
    prompt = codec.encode(waveform)[:model.config.n_codebooks, -used:]
    note = f"{cfg.prompt} ({frames / codec.frame_rate:.1f} s)"
    if used < frames:
        note += f", last {used / codec.frame_rate:.1f} s used"
        print(f"prompt {cfg.prompt} is longer than the model's context: continuing its last {used / codec.frame_rate:.1f} s")
    return prompt, note


def available_memory(device=None):
    """Bytes a new allocation can have: on a CUDA device, the GPU's free memory; otherwise Linux's
    MemAvailable (free memory plus what the OS can reclaim), else the physical memory."""
    if device is not None and device_type(device) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, codec_info, new_frames, pieces, prompt, device, guided=False):
    """Refuse a request that cannot fit in memory, before anything is allocated, with the limit in
    the message. Estimated (bench-free, from the shapes), per piece: its KV cache, one prefill's
    activations (the attention is fused: no steps x steps scores), one step's logits and sampling
    buffers (twice, when guided: two streams per piece) and its codes (three int64 copies); plus, one
    piece at a time, the decoded audio, WAV and spectrogram. On a CUDA device the model's part and
    two copies of the codes are on the GPU and checked against its free memory, the rest against
    the host's; elsewhere all of it against the host's."""
    cfg, rate = model.config, codec_info["frame_rate"]
    # a stream's cache, 24 floats of n_embd per step for a prefill's activations (its peak RSS grew by
    # 272 MB in float32 and 155 MB in int8 for 4 streams of 2048 steps at config/small.py's shape,
    # against 302 MB counted here), and one step's logits and sampling buffers
    stream = (cfg.block_size * (2 * cfg.n_layer * cfg.n_embd * cache_dtype(model).itemsize + 4 * 24 * cfg.n_embd)
              + 3 * 4 * cfg.n_codebooks * cfg.codebook_size)
    model_bytes = (2 if guided else 1) * stream                      # per piece
    codes_bytes = 8 * cfg.n_codebooks                                 # per piece and frame, one copy
    audio_bytes = AUDIO_BYTES_PER_SAMPLE * codec_info["sample_rate"] / rate   # per frame, one piece at a time
    frames = new_frames + (cfg.block_size if prompt else 0) + cfg.n_codebooks
    if device_type(device) == "cuda":
        pools = [(f"GPU memory (KV cache, codes), more than the {{}} free on {device}", available_memory(device),
                  model_bytes, 2 * codes_bytes, 0),
                 ("memory (codes, decoded audio), more than the {} available", available_memory(),
                  0, codes_bytes, audio_bytes)]
    else:
        pools = [("memory (KV cache, codes, decoded audio), more than the {} available", available_memory(),
                  model_bytes, 3 * codes_bytes, audio_bytes)]
    gib = lambda n: f"{n / 2 ** 30:,.1f} GiB"
    for what, have, fixed, per_frame, once_per_frame in pools:
        need = pieces * (fixed + per_frame * frames) + once_per_frame * frames
        if need <= have:
            continue
        # what would fit: this many pieces, shorter (the prompt and drain frames stay); or this long, fewer
        fit_frames = (have - pieces * fixed) / (pieces * per_frame + once_per_frame) - (frames - new_frames)
        fit_pieces = (have - once_per_frame * frames) // (fixed + per_frame * frames)
        fit_seconds = math.floor((fit_frames - 1) / rate * 10) / 10   # rounded down: asking for it fits
        if fit_seconds > 0:
            limit = f"at most about {fit_seconds:,.1f} s per piece with {pieces} piece(s)"
        elif fit_pieces >= 1:
            limit = f"at most about {fit_pieces:,.0f} pieces at a time"
        else:
            limit = "not even one piece of a frame fits: use a smaller model or another device"
        raise UserError(f"{new_frames / rate:,.0f} s x {pieces} piece(s) need about {gib(need)} of "
                        f"{what.format(gib(have))}: {limit}")


def pick_styles(cfg, ckpt):
    """The style names asked for (None: unconditional), each one the checkpoint knows."""
    if cfg.style is None:
        return None
    known = ckpt.get("styles") or []
    if not known:
        raise UserError(f"{checkpoint_path(cfg.out_dir)} was trained without styles (its corpus had no style "
                        f"folders, or styles=none): leave style unset")
    names = [name.strip() for name in cfg.style.split(",")]
    for name in names:
        if name not in known:
            raise UserError(f"unknown style '{name}': {checkpoint_path(cfg.out_dir)} knows {', '.join(known)}")
    return names


def loop_frames(cfg, frame_rate, block_size, n_codebooks):
    """The frames of each loop: loop_seconds rounded to whole frames (with bpm, first to whole
    beats), checked against what the model's context can loop."""
    if "seconds" in getattr(cfg, "given", ()):
        raise UserError("loop_seconds sets each loop's length: leave seconds out")
    seconds = cfg.loop_seconds
    if cfg.bpm:
        seconds = max(1, round(seconds * cfg.bpm / 60)) * 60 / cfg.bpm
    frames = max(2, round(seconds * frame_rate))
    if not loop_fits(frames, block_size, n_codebooks):
        most = max((n for n in range(2, block_size) if loop_fits(n, block_size, n_codebooks)), default=0)
        raise UserError(f"loop_seconds={cfg.loop_seconds:g} is longer than this model can loop: at most "
                        f"{most / frame_rate:.2f} s (its context of {block_size / frame_rate:.1f} s must hold the "
                        f"loop and the start it leads back to)")
    return frames


def make_loops(cfg, decoder, codec, frames, prompt, style_ids, cfg_coef, labels):
    """One loop (generate_loop) per sample, each with its seam measures printed and in its label:
    the model's cross-entropy of the loop's first second after its end against the mean inside it,
    and the audio's spectral flux across the seam against its 95th percentile inside. Returns the
    codes, the labels, the model steps taken and each loop's audio (decode_loop: measured, then written)."""
    codes, new_labels, steps, waveforms = [], [], 0, []
    for i, label in enumerate(labels):
        style_id = style_ids[i // cfg.num_samples] if style_ids else None
        loop, seam = generate_loop(decoder, frames, prompt, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed + 1000 * i,
                                   cfg.context_stride, style_id, cfg_coef)
        inside = frame_cross_entropy(decoder.model, loop, loop_bridge(frames), style_id)
        waveforms.append(decode_loop(codec, loop))
        flux, p95 = seam_flux(waveforms[-1])
        measures = (f"seam: model {seam:.2f} nats vs {inside:.2f} inside; spectral flux {flux:.0f} vs 95th "
                    f"percentile {p95:.0f} inside ({'no click' if flux <= p95 else 'audible seam'})")
        print(f"loop {i}: {frames / codec.frame_rate:.3f} s ({frames} frames), {measures}")
        codes.append(loop)
        new_labels.append(f"{label}; a loop of {frames / codec.frame_rate:.3g} s; {measures}")
        steps += frames + loop_bridge(frames)   # the lead-in and body, then the bridges (one batch)
    return torch.stack(codes), new_labels, steps, waveforms


def write_samples(sample_dir, codes, codec, seed, labels, waveforms=None):
    """Decode each piece (or take its audio from waveforms, already decoded: loops) and write its WAV
    and spectrogram (titled with its label: style and guidance); returns the names written."""
    names = []
    for i in range(codes.shape[0]):   # one at a time: a long piece's decoder activations are large
        name = f"sample_{i:03d}"
        waveform = waveforms[i] if waveforms is not None else codec.decode(codes[i])
        save_wav(os.path.join(sample_dir, f"{name}.wav"), waveform, codec.sample_rate)
        save_spectrogram(os.path.join(sample_dir, f"{name}.png"), waveform, codec.sample_rate,
                         f"{name}: {waveform.numel() / codec.sample_rate:.1f} s, seed {seed}, {labels[i]}")
        names.append(name)
    return names


def new_run_dir(sample_dir):
    """sample_dir/NNN for this run: one past the highest run number there (001 for the first)."""
    runs = [int(entry.name) for entry in os.scandir(sample_dir) if entry.name.isdigit()]   # (a file's name too)
    return os.path.join(sample_dir, f"{max(runs, default=0) + 1:03d}")


def write_reference(folder, ckpt, codec):
    """reference.wav and .png: the val excerpt the checkpoint carries, through the codec (what the
    codec makes of real music: the samples cannot sound better). Its name, or None without one."""
    codes = ckpt.get("reference_codes")
    if codes is None or codes.numel() == 0:
        return None
    waveform = codec.decode(codes.cpu())
    save_wav(os.path.join(folder, "reference.wav"), waveform, codec.sample_rate)
    save_spectrogram(os.path.join(folder, "reference.png"), waveform, codec.sample_rate,
                     f"your music through the codec ({codec.name}): a val excerpt, {waveform.numel() / codec.sample_rate:.1f} s")
    return "reference"


def main(argv):
    cfg = load_config(argv)
    device = pick_device(cfg.device)
    decode_dtype = pick_decode_dtype(cfg.decode_dtype, device)
    ckpt = load_checkpoint(cfg.out_dir, device)
    check_codec_setting(cfg.codec, ckpt["codec"]["name"], f"{checkpoint_path(cfg.out_dir)} was trained on")
    model = model_from_checkpoint(ckpt, device).eval()
    decoder = Decoder(model, decode_dtype)   # casts the model to the decode precision
    K, block_size = model.config.n_codebooks, model.config.block_size
    try:   # generate() checks these too; here they fail before the codec loads and anything is written
        check_sampling(model.config.codebook_size, cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples,
                       cfg.context_stride, cfg.cfg_coef)
    except ValueError as e:   # (the config checked each setting's range: here, top_k against the codebook)
        raise UserError(str(e)) from None
    style_names = pick_styles(cfg, ckpt)    # or None: unconditional
    style_ids = [ckpt["styles"].index(name) for name in style_names] if style_names else None
    # cfg_coef 1 is plain conditional sampling: the same codes without the unconditional stream
    # (tests/test_sample.py holds the two equal), so it runs at half the cost
    cfg_coef = cfg.cfg_coef if style_names and cfg.cfg_coef != 1 else None
    labels = [f"style {name}, cfg_coef {cfg.cfg_coef:g}" for name in style_names for _ in range(cfg.num_samples)] \
        if style_names else ["no style (unconditional)"] * cfg.num_samples
    if cfg.bpm and not cfg.loop_seconds:
        raise UserError("bpm snaps a loop's length to whole beats: give loop_seconds too")
    new_frames = loop_frames(cfg, ckpt["codec"]["frame_rate"], block_size, K) if cfg.loop_seconds else \
        max(1, round(cfg.seconds * ckpt["codec"]["frame_rate"]))
    check_memory(model, ckpt["codec"], new_frames, len(labels), cfg.prompt, device, guided=cfg_coef is not None)
    codec = codec_for(ckpt["codec"], ckpt.get("codec_weights"), cfg.codec_dir, device)
    check_codec(ckpt["codec"], codec.info(K), "this codec")
    warning = untrained_warning(codec.name)
    if warning:
        print(f"*** {warning} ***")

    prompt, prompt_note = load_prompt(cfg, codec, model) if cfg.prompt else (None, "none")

    sample_dir = cfg.sample_dir or os.path.join(cfg.out_dir, "samples")
    with lock_folder(sample_dir, "sample_dir"):  # one run at a time writes into sample_dir
        t0 = time.perf_counter()
        if cfg.loop_seconds:
            codes, labels, steps, waveforms = make_loops(cfg, decoder, codec, new_frames, prompt, style_ids, cfg_coef,
                                                         labels)
        else:
            with StepsBar(len(labels) / codec.frame_rate) as bar:  # all samples in one batch
                codes = generate(decoder, new_frames, prompt, cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples,
                                 cfg.seed, cfg.context_stride, progress=bar, style_ids=style_ids, cfg_coef=cfg_coef)
            steps, waveforms = bar.total, None   # (decoded as they are written)
            codes = codes if cfg.keep_prompt else codes[:, :, -new_frames:]
        t1 = time.perf_counter()
        run_dir = new_run_dir(sample_dir)
        with atomic_folder(run_dir) as folder:   # the run's folder appears complete, or not at all
            names = write_samples(folder, codes, codec, cfg.seed, labels, waveforms)
            t2 = time.perf_counter()
            settings = {"checkpoint": f"{checkpoint_path(cfg.out_dir)} (iteration {ckpt.get('iter_num', '?')})",
                        "codec": f"{codec.name} ({codec.bandwidth} kbps, {K} codebooks)",
                        "seconds": f"a loop of {new_frames / codec.frame_rate:g} s ({new_frames} frames)"
                                   + (f", {cfg.bpm:g} bpm" if cfg.bpm else "") if cfg.loop_seconds else cfg.seconds,
                        "prompt": prompt_note, "keep_prompt": cfg.keep_prompt, "temperature": cfg.temperature,
                        "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed, "num_samples": cfg.num_samples,
                        "style": ", ".join(style_names) if style_names else "none (unconditional)",
                        "cfg_coef": cfg.cfg_coef if style_names else "-",
                        "context": f"{block_size / codec.frame_rate:.1f} s, stride {cfg.context_stride}",
                        "device": f"{device}, {decode_dtype}", "written": time.strftime("%Y-%m-%d %H:%M:%S")}
            reference = write_reference(folder, ckpt, codec)
            write_sample_page(os.path.join(folder, "index.html"), names, labels, settings, warning,
                              loop=bool(cfg.loop_seconds), reference=reference)
        write_runs_page(sample_dir)

    new_seconds = len(labels) * new_frames / codec.frame_rate
    print(f"wrote {len(names)} x {codes.shape[-1] / codec.frame_rate:.1f} s to "
          f"{run_dir}/ ({', '.join(n + '.wav' for n in names[:3])}{', ...' if len(names) > 3 else ''}, spectrograms, "
          f"index.html) in {t2 - t0:.1f} s: generation {steps / (t1 - t0):.0f} steps/s, decoding {t2 - t1:.1f} s, "
          f"{new_seconds / (t2 - t0):.1f}x real time")
    if warning:
        print(f"*** {warning} ***")


if __name__ == "__main__":
    run_cli(main)
