"""
Throughput benchmarks. They print figures and assert nothing (never part of the test suite).

    python bench.py prepare [--corpus=DIR] [--minutes=N] [--long_minutes=30] [--codec=NAME] [--repeats=1]
    python bench.py train [--compile] [--batch_size=N]
    python bench.py sample [--compile] [--kv_heads]
    python bench.py decode_quality [--ckpt=PATH] [--data_dir=data/tokens] [--steps=300]
    python bench.py learn [--corpus=DIR] [--minutes=30 | --steps=N] [--codec=NAME] [--seeds=1337,7]
                          [--variant=NAME:SETTINGS ...] [--out_dir=DIR]
    python bench.py steer --data_dir=DIR --out_dir=DIR [--seconds=10] [--num_samples=8]
    python bench.py codec --data_dir=DIR --out=OUTDIR FILE...
    python bench.py listen --ckpt=PATH --data_dir=DIR [--corpus=DIR] [--out=OUTDIR] [--seconds=10] [--num_samples=8]
                           [--seeds=1337,7,42]
    python bench.py loops --ckpt=PATH [--out=OUTDIR] [--seconds=8] [--num_samples=4]
    python bench.py all          (prepare, train, sample)

Each measurement runs in a fresh process, so that its peak memory (RSS high-water mark) is its own.

prepare: the whole prepare.py command on a real corpus, next to the codec's raw encode of the same
audio (already decoded and in memory) in the same run; then one long file (the corpus looped to
--long_minutes) to show that peak memory does not grow with a file's length. Targets: prepare
reaches at least 80% of raw encode's audio-seconds per second; a 30-minute file prepares in
under 2 GB. The corpus, ~2 h of Ogg Vorbis (never copy it into the repository):
    cd /tmp && apt-get download wesnoth-1.16-music && dpkg -x wesnoth-1.16-music*.deb /tmp/wesnoth

sample: generation speed (steps/s) in each decode precision, batch 8 against batch 1, the original
design (Hugging Face GPT-2 with its generate(), when transformers is installed) in the same run, and
whole pieces with Encodec decoding. decode_quality: what each decode precision costs in
teacher-forced val cross-entropy on a trained checkpoint (decode_dtype=auto must stay within 0.005
nats of float32).

learn: how much config/small.py's model learns in a fixed budget on a real corpus, per codebook,
next to the simple baselines; recipes (variants of the settings) side by side in one run, each
with the same corpus, split, seeds and probe state (default: the recipe and a single-codebook model).

codec: each file through data_dir's codec and back: log-mel L1 (80 mel bands, n_fft 1024, hop 256,
log(mel + 1e-5)), encode and decode speed; the reconstructions as WAVs. listen: the audio-level
yardstick of a trained model (bench_listen). loops: the seams of a trained model's loops (bench_loops).

steer: how far a model trained on a corpus with style folders steers: per-codebook code statistics
of pieces generated in each style, unconditionally and at several cfg_coef, against each style's
own; and what guidance costs in generation speed.
"""
import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

WESNOTH = "/tmp/wesnoth/usr/share/games/wesnoth/1.16/data/core/music"


def run_command(script, *args):
    """Run one of nanosuno's commands (prepare.py, train.py) as a user would, in this Python; its
    output goes to the terminal. A failure ends the benchmark with its exit code."""
    import subprocess
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *args])
    if result.returncode:
        sys.exit(f"{script} failed (exit code {result.returncode}): see its message above")


def in_fresh_process(fn, *args):
    """fn(*args) in a new process: returns (its result, its peak RSS in MB: that of the largest of it and
    its own child processes, such as the prepare.py command it runs)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_measured, args=(send, fn, *args))
    process.start()
    send.close()  # the child's copy remains: if the child dies, recv() raises instead of waiting forever
    try:
        return receive.recv()
    except EOFError:
        sys.exit(f"the measurement {fn.__name__} failed (see above)")
    finally:
        process.join()


def _measured(send, fn, *args):
    result = fn(*args)
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    send.send((result, peak / 1024))  # KB on Linux


# --- prepare -----------------------------------------------------------------------------------

def bench_prepare(corpus=WESNOTH, minutes=None, long_minutes=30.0, codec_name=None, repeats=1):
    import soundfile as sf
    from nanosuno.audio import find_audio_files
    from nanosuno.codec import pretrained_available
    from nanosuno.common import passive_openmp
    # OpenMP's waiting policy as prepare.py sets it, inherited by the measured processes; bench's other
    # measurements keep the default (see nanosuno/common.py)
    passive_openmp()
    if not os.path.isdir(corpus):
        sys.exit(f"no corpus at {corpus}: cd /tmp && apt-get download wesnoth-1.16-music && "
                 f"dpkg -x wesnoth-1.16-music*.deb /tmp/wesnoth   (or pass --corpus=DIR)")
    if codec_name is None:
        codec_name = "encodec_24khz" if pretrained_available() else "untrained"
        if codec_name == "untrained":
            print("pretrained weights not available: timing the untrained codec (same architecture, "
                  "so the same speed)")
    paths, seconds = [], 0.0
    for path in find_audio_files(corpus):
        if minutes is not None and seconds >= 60 * minutes:
            break
        paths.append(path)
        seconds += sf.info(path).duration
    work = tempfile.mkdtemp(prefix="bench-prepare-")
    try:
        corpus_copy = os.path.join(work, "corpus")  # links: prepare sees exactly the chosen files
        os.makedirs(corpus_copy)
        for path in paths:
            os.symlink(os.path.abspath(path), os.path.join(corpus_copy, os.path.basename(path)))
        print(f"corpus: {len(paths)} files, {seconds / 60:.1f} min of audio from {corpus}; "
              f"codec {codec_name}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        # Raw encode and prepare take turns, `repeats` times each; the best run of each counts: on a
        # machine shared with other jobs the slower runs measure the neighbours. CPU seconds (all
        # threads) are printed too: they move much less with the neighbours' load.
        runs = {"raw": [], "prepare": []}  # (CPU seconds, peak RSS) of each run

        def raw():
            (seconds, elapsed, cpu, distinct), peak = in_fresh_process(raw_encode, paths, codec_name)
            print(f"raw encode: {seconds / elapsed:.1f} audio-s/s ({seconds / 60:.1f} min of audio in "
                  f"{elapsed:.1f} s, {cpu:.1f} CPU-s; audio decoded beforehand), peak RSS {peak:.0f} MB")
            for name, counts in distinct if not runs["raw"] else []:
                print(f"  distinct codes per codebook on 20 s of {name}: {counts}")
            runs["raw"].append((cpu, peak))
            runs["seconds"] = seconds
            return seconds / elapsed

        def prep():
            tokens = os.path.join(work, f"tokens-{len(runs['prepare'])}")  # a fresh cache each time
            (elapsed, cpu), peak = in_fresh_process(run_prepare, corpus_copy, tokens, codec_name)
            seconds = runs["seconds"]
            runs["prepare"].append((cpu, peak))
            print(f"prepare: {seconds / elapsed:.1f} audio-s/s ({seconds / 60:.1f} min in {elapsed:.1f} s, "
                  f"{cpu:.1f} CPU-s; the whole command, codec loading included), peak RSS {peak:.0f} MB")
            return seconds / elapsed

        best_raw, best_prepare = best_of(repeats, raw, prep)
        cpu_ratio = min(cpu for cpu, _ in runs["raw"]) / min(cpu for cpu, _ in runs["prepare"])
        prepare_peak = max(peak for _, peak in runs["prepare"])
        print(f"best of {repeats}: raw encode {best_raw:.1f} audio-s/s, prepare {best_prepare:.1f} audio-s/s "
              f"= {best_prepare / best_raw:.0%} by wall clock, {cpu_ratio:.0%} by CPU time (target: at least 80%)")

        if long_minutes:
            long_dir = os.path.join(work, "long")
            long_seconds = write_long_file(paths, os.path.join(long_dir, "long.wav"), 60 * long_minutes)
            (long_time, _), long_peak = in_fresh_process(run_prepare, long_dir, os.path.join(work, "long-tokens"), codec_name)
            print(f"one {long_seconds / 60:.0f}-minute file (44.1 kHz stereo WAV): {long_seconds / long_time:.1f} "
                  f"audio-s/s, peak RSS {long_peak:.0f} MB (target: under 2048 MB; the corpus run "
                  f"above: {prepare_peak:.0f} MB)")
        print(f"load average now {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def raw_encode(paths, codec_name):
    """Time codec.encode alone on each file's audio, decoded beforehand (untimed)."""
    import torch
    from nanosuno.audio import AudioError, load_audio
    from nanosuno.codec import load_codec
    from nanosuno.hardware import pick_device
    codec = load_codec(codec_name, device=pick_device("auto"))
    seconds, elapsed, cpu, distinct = 0.0, 0.0, 0.0, []
    for path in paths:
        try:
            waveform = load_audio(path, codec.sample_rate)
        except AudioError as e:  # prepare skips it too
            print(f"skipping {e}")
            continue
        start, start_cpu = time.time(), time.process_time()
        codes = codec.encode(waveform)
        if codec.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.time() - start
        cpu += time.process_time() - start_cpu
        seconds += waveform.numel() / codec.sample_rate
        if len(distinct) < 3 and waveform.numel() >= 50 * codec.sample_rate:  # 20 s from 0:30 on
            frames = slice(30 * codec.frame_rate, 50 * codec.frame_rate)
            distinct.append((os.path.basename(path), [len(torch.unique(c[frames])) for c in codes]))
    return seconds, elapsed, cpu, distinct


def run_prepare(input_dir, data_dir, codec_name):
    """Wall-clock and CPU seconds of the whole prepare command (codec loading included)."""
    def cpu_seconds():
        return sum(usage.ru_utime + usage.ru_stime for usage in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                                       resource.RUSAGE_CHILDREN)))
    start, start_cpu = time.time(), cpu_seconds()
    run_command("prepare.py", f"--input_dir={input_dir}", f"--data_dir={data_dir}", f"--codec={codec_name}")
    return time.time() - start, cpu_seconds() - start_cpu


def write_long_file(paths, out_path, seconds):
    """Loop the corpus into one long 44.1 kHz stereo 16-bit WAV; returns its length in seconds."""
    import numpy as np
    import soundfile as sf
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    rate, written = 44100, 0
    with sf.SoundFile(out_path, "w", samplerate=rate, channels=2, subtype="PCM_16") as out:
        while 0 < written < seconds * rate or written == 0 and paths:
            before = written
            for path in paths:
                data, file_rate = sf.read(path, dtype="float32", always_2d=True)
                if file_rate != rate or data.shape[1] > 2:
                    continue
                data = np.repeat(data, 2, axis=1) if data.shape[1] == 1 else data
                data = data[:int(seconds * rate) - written]
                out.write(data)
                written += len(data)
                if written >= seconds * rate:
                    break
            if written == before:  # no file at 44.1 kHz in the corpus
                break
    return written / rate


# --- codec and listen ------------------------------------------------------------------------------

def bench_codec(data_dir, out, files):
    """Each audio file through data_dir's codec and back: its reconstruction written to
    out/<stem>.wav (24 kHz), and one line with the log-mel L1 and the speeds."""
    import torch
    from nanosuno.audio import load_audio, save_wav
    from nanosuno.codec import codec_for
    from nanosuno.data import codec_info, read_codec_weights, read_meta
    from nanosuno.evaluate import log_mel_l1
    if not files:
        sys.exit("bench.py codec: name the audio files to reconstruct")
    meta = read_meta(data_dir)
    codec = codec_for(codec_info(meta, meta["n_codebooks"]), read_codec_weights(data_dir, meta))
    os.makedirs(out, exist_ok=True)
    print(f"codec {codec.name} of {data_dir}; {_cpu_name()}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    for path in files:
        audio = load_audio(path, codec.sample_rate)
        seconds = audio.numel() / codec.sample_rate
        t0 = time.perf_counter()
        codes = codec.encode(audio)
        t1 = time.perf_counter()
        reconstruction = codec.decode(codes)
        t2 = time.perf_counter()
        save_wav(os.path.join(out, os.path.splitext(os.path.basename(path))[0] + ".wav"), reconstruction,
                 codec.sample_rate)
        print(f"{path}: log-mel L1 {log_mel_l1(audio, reconstruction):.3f}, encode {seconds / (t1 - t0):.1f}x "
              f"real time, decode {seconds / (t2 - t1):.1f}x real time")


def bench_listen(ckpt_path, data_dir, corpus, out, seconds=10.0, num_samples=8, excerpt_seconds=60.0, seeds=(1337,)):
    """The audio-level yardstick of a trained model: the Fréchet distance (evaluate.frechet_distance:
    Gaussians of 0.2 s log-mel stretches) from the val music (the corpus's val files, their first
    excerpt_seconds each) to pieces the model generates, next to (a) the val music through the codec
    and back (the floor: what the codec alone loses), (b) pieces of the per-codebook previous-frame
    bigram baseline, decoded, and (c) the val music's token frames shuffled in time, decoded. A model
    that learned something lands between the floor and the bigram.

    A set of 8 pieces is a small sample: with another sampling seed the same model's distance moved
    by up to 150 (296 / 354 / 452 for seeds 1337 / 7 / 42). So every set but the floor is drawn once
    per seed, and the mean and the range over the seeds are what to compare models by. Writes
    out/listen.png (a spectrogram of each, first seed) and the first seed's WAVs."""
    import json
    import numpy as np
    import torch
    from nanosuno.audio import load_audio, save_wav
    from nanosuno.baselines import sample_prev_frame_bigram
    from nanosuno.checkpoint import load_checkpoint, model_from_checkpoint, read_checkpoint
    from nanosuno.codec import codec_for
    from nanosuno.data import open_split, read_meta
    from nanosuno.evaluate import audio_statistics, frechet_distance
    from nanosuno.generate import generate
    from nanosuno.plots import save_spectrograms
    from tqdm import tqdm
    meta = read_meta(data_dir)
    ckpt = read_checkpoint(ckpt_path) if ckpt_path.endswith(".pt") else load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt).eval()
    codec = codec_for(ckpt["codec"], ckpt.get("codec_weights"))
    K, rate, frames = model.config.n_codebooks, codec.frame_rate, round(seconds * codec.frame_rate)
    os.makedirs(out, exist_ok=True)
    print(f"listen: {ckpt_path} (iteration {ckpt['iter_num']}, codec {codec.name}, {K} codebooks); {num_samples} x "
          f"{seconds:g} s per set, sampling seeds {', '.join(map(str, seeds))}; {_cpu_name()}")
    # the val music, and its tokens (the same excerpts)
    val_files, tokens = meta["splits"]["val"]["files"], open_split(data_dir, meta, "val")
    music, val_codes = [], []
    for f in val_files:
        excerpt = min(f["frames"], int(excerpt_seconds * rate))
        music.append(load_audio(os.path.join(corpus, f["path"]))[:excerpt * codec.hop_length])
        val_codes.append(torch.from_numpy(np.asarray(tokens[f["offset"]:f["offset"] + excerpt], dtype=np.int64)).T)
    reference = audio_statistics(music)
    distance = lambda waves: frechet_distance(reference, audio_statistics(waves))
    recon = [codec.decode(codes) for codes in val_codes]
    floor = distance(recon)
    train = open_split(data_dir, meta, "train")
    names = ("generated by the model", "previous-frame bigram baseline", "val, token frames shuffled")
    distances = {name: [] for name in names}
    for seed in tqdm(seeds, desc="sampling seeds", leave=False):
        rng = np.random.default_rng(seed)
        shuffled = [codec.decode(codes[:, torch.from_numpy(rng.permutation(codes.shape[1]))]) for codes in val_codes]
        with torch.no_grad():
            generated = [codec.decode(codes) for codes in generate(model, frames, num_samples=num_samples, seed=seed)]
        bigram_codes = sample_prev_frame_bigram(train, meta["splits"]["train"]["files"], meta["codebook_size"], frames,
                                                num_samples, meta["baselines"]["lambda"]["prev_frame"], seed)
        bigram = [codec.decode(torch.from_numpy(codes[:K])) for codes in bigram_codes]
        for name, waves in zip(names, (generated, bigram, shuffled)):
            distances[name].append(distance(waves))
        if seed == seeds[0]:
            for name, waves in (("generated", generated), ("bigram", bigram)):
                for i, wave in enumerate(waves):
                    save_wav(os.path.join(out, f"{name}_{i:02d}.wav"), wave, codec.sample_rate)
            clip = lambda wave: wave[:frames * codec.hop_length]
            save_spectrograms(os.path.join(out, "listen.png"),
                              [("val music", clip(music[0])), (f"val through the codec ({codec.name})", clip(recon[0])),
                               ("generated by the model", clip(generated[0])),
                               ("previous-frame bigram", clip(bigram[0]))], codec.sample_rate)
    print(f"  {'Fréchet distance to the val music':40}{'mean':>8}{'min':>8}{'max':>8}   per seed")
    print(f"  {'val through the codec (floor)':40}{floor:8.1f}")
    for name, values in distances.items():
        print(f"  {name:40}{np.mean(values):8.1f}{min(values):8.1f}{max(values):8.1f}   "
              + " ".join(f"{v:.1f}" for v in values))
    print(f"wrote {out}/listen.png and {2 * num_samples} WAVs (seed {seeds[0]}); json: "
          + json.dumps({"floor": floor, **distances, "seeds": list(seeds)}))


def bench_loops(ckpt_path, out, loop_seconds=8.0, num_samples=4, seed=1337):
    """The seams of loops a trained model makes (generate_loop, as sample.py --loop_seconds): per loop
    the model's cross-entropy of its first second after its end against the mean inside it, and the
    audio's spectral flux across the seam against its 95th percentile inside (no click: below it).
    Writes out/loop_NN.wav and out/loops.png: each loop played twice, the seam in the middle."""
    import torch
    from nanosuno.audio import save_wav
    from nanosuno.checkpoint import load_checkpoint, model_from_checkpoint, read_checkpoint
    from nanosuno.codec import codec_for, decode_loop
    from nanosuno.evaluate import frame_cross_entropy, seam_flux
    from nanosuno.generate import generate_loop, loop_bridge
    from nanosuno.plots import save_spectrograms
    ckpt = read_checkpoint(ckpt_path) if ckpt_path.endswith(".pt") else load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt).eval()
    codec = codec_for(ckpt["codec"], ckpt.get("codec_weights"))
    frames = round(loop_seconds * codec.frame_rate)
    os.makedirs(out, exist_ok=True)
    print(f"loops: {ckpt_path} (iteration {ckpt['iter_num']}, codec {codec.name}); {num_samples} loops of "
          f"{frames / codec.frame_rate:g} s; {_cpu_name()}")
    rows, seams = [], []
    for i in range(num_samples):
        start = time.perf_counter()
        loop, seam = generate_loop(model, frames, seed=seed + 1000 * i)
        inside = frame_cross_entropy(model, loop, loop_bridge(frames))
        audio = decode_loop(codec, loop)   # as sample.py decodes a loop
        flux, p95 = seam_flux(audio)
        seams.append(dict(seam_nats=seam, inside_nats=inside, seam_flux=flux, inside_flux_p95=p95))
        print(f"  loop {i}: model {seam:.3f} nats at the seam vs {inside:.3f} inside ({seam - inside:+.3f}); spectral "
              f"flux {flux:.0f} at the seam vs {p95:.0f} (95th percentile inside): "
              f"{'no click' if flux <= p95 else 'audible seam'}; {time.perf_counter() - start:.1f} s")
        save_wav(os.path.join(out, f"loop_{i:02d}.wav"), audio, codec.sample_rate)
        rows.append((f"loop {i} played twice (the seam at {frames / codec.frame_rate:g} s)", torch.cat([audio, audio])))
    save_spectrograms(os.path.join(out, "loops.png"), rows, codec.sample_rate)
    print(f"wrote {out}/loops.png and {num_samples} WAVs; json: " + __import__("json").dumps(seams))


# --- train -----------------------------------------------------------------------------------
# The original single-codebook design (Hugging Face GPT-2, same dims, fp32) trained at 237-335
# tokens/s on a 2-core CPU of this class; nanosuno's target is 5x that in fp32, 9x with bf16.
BASELINE_TRAIN_TOKENS_PER_S = (237, 335)


def _time_train_iters(model, optimizer, device, dtype, batch_size, iters, warmup):
    """Seconds per training iteration: train.py's train_step (forward, backward, clip, AdamW step),
    one batch of random codes per step."""
    import torch
    from nanosuno.hardware import autocast, device_type
    from nanosuno.optim import train_step
    config = model.config if not hasattr(model, "_orig_mod") else model._orig_mod.config
    codes = torch.randint(0, config.codebook_size + 1, (batch_size, config.n_codebooks, config.block_size + 1),
                          device=device)
    x, y = codes[:, :, :-1], codes[:, :, 1:]
    scaler = torch.amp.GradScaler(device_type(device), enabled=dtype == torch.float16)
    ctx = autocast(device, dtype)
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, scaler, lambda: (x, y, None), accum_steps=1, grad_clip=1.0, ddp=False, ctx=ctx)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # median


def _sync(device):
    """Wait for a GPU's queued work (CUDA or MPS: Python runs ahead of them)."""
    import torch
    from nanosuno.hardware import device_type
    if device_type(device) == "cuda":
        torch.cuda.synchronize()
    elif device_type(device) == "mps":
        torch.mps.synchronize()


def bench_train(compile_on_cpu=False, batch_size=None):
    """Training tokens/s (tokens = steps x codebooks) and MFU at config/small.py's dims."""
    import torch
    from nanosuno.hardware import cpu_has_bf16, device_type, peak_flops, pick_device
    from nanosuno.model import GPT, GPTConfig
    device = pick_device("auto")
    on_cuda = device_type(device) == "cuda"
    shapes = [("small", dict(n_layer=6, n_head=8, n_embd=256))]
    if on_cuda:
        shapes.append(("768x12", dict(n_layer=12, n_head=12, n_embd=768)))
    dtypes = [torch.float32] + ([torch.bfloat16] if on_cuda or cpu_has_bf16() else [])
    compiles = [False, True] if (compile_on_cpu or on_cuda) else [False]
    batch_size = batch_size or (16 if on_cuda else 2)
    iters, warmup = (20, 5) if on_cuda else (3, 1)
    peaks = {dt: peak_flops(device, dt, seconds=2.0) for dt in dtypes}
    print(f"device {device}; batch {batch_size} x 2048 steps x 8 codebooks; "
          + ", ".join(f"peak {str(dt).removeprefix('torch.')} {p / 1e12:.2f} TFLOP/s" if p else "peak unknown"
                      for dt, p in peaks.items())
          + (" (measured matmul)" if not on_cuda else " (datasheet)"))
    rows = []
    for name, shape in shapes:
        for dtype in dtypes:
            for compiled in compiles:
                torch.manual_seed(0)
                model = GPT(GPTConfig(block_size=2048, n_codebooks=8, codebook_size=1024, **shape)).to(device)
                optimizer = model.configure_optimizers(1e-4, 1e-3, 0.0, (0.9, 0.95))
                runner = torch.compile(model) if compiled else model
                t_compile = time.perf_counter()
                seconds = _time_train_iters(runner, optimizer, device, dtype, batch_size, iters, warmup)
                steps_per_s = batch_size * 2048 / seconds
                tokens_per_s = steps_per_s * 8
                peak = peaks[dtype]
                mfu = model.estimate_mfu(steps_per_s, peak) if peak else float("nan")
                mfu32 = model.estimate_mfu(steps_per_s, peaks[torch.float32]) if peaks[torch.float32] else float("nan")
                rows.append((name, str(dtype).removeprefix("torch."), "yes" if compiled else "no",
                             f"{seconds * 1000:.0f}", f"{steps_per_s:,.0f}", f"{tokens_per_s:,.0f}",
                             f"{mfu * 100:.1f}%", f"{mfu32 * 100:.1f}%",
                             f"{tokens_per_s / BASELINE_TRAIN_TOKENS_PER_S[1]:.1f}-{tokens_per_s / BASELINE_TRAIN_TOKENS_PER_S[0]:.1f}x"))
                print("  done:", rows[-1], f"({time.perf_counter() - t_compile:.0f}s incl. warm-up/compile)", flush=True)
                del model, optimizer, runner
    header = ["model", "dtype", "compile", "ms/iter", "steps/s", "tokens/s", "MFU", "MFU vs fp32 peak", "vs GPT-2 baseline"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(f"tokens = steps x 8 codebooks; target on a 2-core CPU: fp32 >= 5x, bf16 >= 9x the GPT-2 baseline "
          f"({BASELINE_TRAIN_TOKENS_PER_S[0]}-{BASELINE_TRAIN_TOKENS_PER_S[1]} tokens/s)")


# --- learn -----------------------------------------------------------------------------------------

def bench_learn(corpus=WESNOTH, minutes=30.0, steps=None, codec_name=None, data_dir="data/learn", seeds=(1337,),
                variants=None, out_dir=None):
    """How much recipes learn in a fixed budget, side by side: config/small.py's model on a real
    corpus split by file, each variant (a name and its train.py settings) trained for `minutes` of
    this machine (or exactly `steps` iterations) with each seed, then val cross-entropy per codebook
    over the whole val split, next to the simple baselines (fitted on train). Every variant's
    iterations come from a timing probe of that variant, all probed before any trains, so their
    budgets come from the same machine state (a same-run A/B). Batch 4 x 2048 steps, one process,
    the settings' defaults otherwise; the learning-rate schedule is fitted to the budget. Default
    variants: the K = 8 recipe and a K = 1 model (codebook 0 alone). out_dir keeps the checkpoints
    (out_dir/<variant>-seed<N>); by default they are deleted."""
    import json
    import torch
    from nanosuno.baselines import NAMES, best_baseline, bits_per_second
    from nanosuno.checkpoint import load_checkpoint, model_from_checkpoint
    from nanosuno.config import load_config
    from nanosuno.data import read_meta
    from nanosuno.evaluate import split_losses
    if not os.path.isdir(corpus):
        sys.exit(f"no corpus at {corpus}: cd /tmp && apt-get download wesnoth-1.16-music && "
                 f"dpkg -x wesnoth-1.16-music*.deb /tmp/wesnoth   (or pass --corpus=DIR)")
    run_command("prepare.py", f"--input_dir={corpus}", f"--data_dir={data_dir}", f"--codec={codec_name or 'auto'}")
    meta = read_meta(data_dir)
    baselines, best = meta["baselines"], best_baseline(meta["baselines"])
    variants = variants or [("K=8", []), ("K=1", ["--n_codebooks=1"])]
    fixed = ["config/small.py", f"--data_dir={data_dir}", "--batch_size=4", "--gradient_accumulation_steps=1",
             "--eval_iters=1", "--sample_every=0", "--compile=False"]
    print(f"learn: config/small.py dims, batch 4 x 2048 steps, {minutes if not steps else '-'} min / "
          f"{steps or '-'} iterations; codec {meta['codec']}; variants {', '.join(name for name, _ in variants)}; "
          f"seeds {', '.join(map(str, seeds))}; {_cpu_name()}; load average {os.getloadavg()[0]:.1f}")
    budgets = {name: steps or _iterations_in(minutes, load_config(fixed + args), meta, name) for name, args in variants}
    results = []
    for seed in seeds:
        for name, args in variants:
            iters = budgets[name]
            run_dir = os.path.join(out_dir, f"{name}-seed{seed}") if out_dir else tempfile.mkdtemp(prefix="bench-learn-")
            start = time.time()
            run_command("train.py", *fixed, *args, f"--seed={seed}", f"--out_dir={run_dir}", f"--max_iters={iters}",
                        f"--lr_decay_iters={iters}", f"--warmup_iters={max(1, iters // 20)}", f"--eval_interval={iters}",
                        *(["--overwrite=True"] if out_dir else []))
            seconds = time.time() - start
            ckpt = load_checkpoint(run_dir, resume=True)   # the last iteration's weights: the budget's model
            K = ckpt["model_args"]["n_codebooks"]
            with torch.no_grad():
                val = split_losses(model_from_checkpoint(ckpt), data_dir, meta, K)
            results.append(dict(variant=name, seed=seed, val=val, iters=iters, seconds=seconds,
                                s_per_iter=seconds / iters))
            if not out_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
    cells = lambda values: "".join(f"{v:7.3f}" if v is not None else f"{'-':>7}" for v in values)
    mean = lambda values: f"{sum(values) / len(values):8.3f}" if values and None not in values else f"{'-':>8}"
    print(f"{'val CE (nats)':22}" + "".join(f"{'cb' + str(k):>7}" for k in range(8)) + f"{'mean':>8}{'s/iter':>8}{'iters':>7}")
    for r in results:
        print(f"{r['variant'] + ' seed ' + str(r['seed']):22}{cells(r['val'])}{' ' * 7 * (8 - len(r['val']))}"
              f"{mean(r['val'])}{r['s_per_iter']:8.2f}{r['iters']:7d}")
    for name, values in [(name, baselines[name]) for name in NAMES] + [("best baseline", best)]:
        print(f"{name:22}{cells(values)}{mean(values)}")
    for name, _ in variants:   # each variant's mean over its seeds, against the best baselines
        runs = [r for r in results if r["variant"] == name]
        K = len(runs[0]["val"])
        means = [sum(r["val"]) / K for r in runs]
        spread = f" (seeds differ by {max(means) - min(means):.4f})" if len(runs) > 1 else ""
        avg = sum(means) / len(means)
        print(f"{name}: mean val CE {avg:.4f}{spread} vs best baselines {sum(best[:K]) / K:.4f}: "
              f"{avg - sum(best[:K]) / K:+.4f}; codebooks below their baseline: "
              f"{sum(v < b for r in runs for v, b in zip(r['val'], best)) / len(runs):g}/{K}; codebook 0 "
              f"{sum(r['val'][0] for r in runs) / len(runs):.4f}; "
              f"{sum(bits_per_second(r['val'], meta['frame_rate']) for r in runs) / len(runs):,.0f} bit/s")
    print("json: " + json.dumps({"results": results, "best_baseline": best, "codec": meta["codec"]}))


def _iterations_in(minutes, cfg, meta, name):
    """How many iterations of this model fit in `minutes` here: a few timed train steps on real batches."""
    import torch
    from nanosuno.data import Batches
    from nanosuno.hardware import autocast, pick_dtype
    from nanosuno.config import decide_bigram, model_config
    from nanosuno.model import GPT
    from nanosuno.optim import train_step
    torch.manual_seed(0)
    batches = Batches(cfg.data_dir, meta, "train", cfg.n_codebooks, cfg.block_size)
    # the variant's model, every model setting of it (a variant may change the model's shape), as train.py builds it
    cfg, _ = decide_bigram(cfg, batches.tokens, batches.files, meta["codebook_size"])
    model = GPT(model_config(cfg, meta["codebook_size"]))
    optimizer = model.configure_optimizers(cfg.learning_rate, cfg.muon_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                           cfg.bigram_lr)
    ctx, scaler = autocast("cpu", pick_dtype(cfg.dtype, "cpu")), torch.amp.GradScaler("cpu", enabled=False)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        train_step(model, optimizer, scaler, lambda: batches.sample(cfg.batch_size), 1, cfg.grad_clip, False, ctx)
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[1]   # the median of three, after one warm-up
    print(f"  {name}: {seconds:.2f} s per iteration here: {minutes:g} min = {int(minutes * 60 / seconds)} iterations")
    return max(1, int(minutes * 60 / seconds))


def _cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


# --- steer -----------------------------------------------------------------------------------------

def bench_steer(data_dir, out_dir, seconds=10.0, num_samples=8, coefs=(1.0, 3.0, 5.0), seed=1337):
    """A checkpoint trained with styles generates num_samples pieces of `seconds` in every style (one
    batch per cfg_coef, as sample.py does), and num_samples per style without one. Each row: the KL
    (nats, mean over codebooks) from the pieces' per-codebook unigram statistics to each style's own
    (its train files); the first rows put the styles' own statistics side by side for scale. margin:
    KL to the other styles (nearest) minus KL to its own, the larger the further apart."""
    import numpy as np
    import torch
    from nanosuno.baselines import unigram_kl, unigrams
    from nanosuno.checkpoint import load_checkpoint, model_from_checkpoint
    from nanosuno.data import open_split, read_meta
    from nanosuno.evaluate import split_losses
    from nanosuno.generate import generate
    meta, ckpt = read_meta(data_dir), load_checkpoint(out_dir)
    names = ckpt.get("styles") or []
    if len(names) < 2:
        sys.exit(f"{out_dir}'s checkpoint knows {len(names)} style(s): train on a corpus with two or more "
                 f"style folders")
    model = model_from_checkpoint(ckpt).eval()
    K, V, frames = model.config.n_codebooks, model.config.codebook_size, round(seconds * meta["frame_rate"])
    tokens = open_split(data_dir, meta, "train")
    own = {name: unigrams(np.concatenate([tokens[f["offset"]:f["offset"] + f["frames"], :K]
                                          for f in meta["splits"]["train"]["files"] if f.get("style") == name]), V)
           for name in names}
    print(f"steer: {out_dir} (iteration {ckpt['iter_num']}, {model.get_num_params() / 1e6:.2f}M parameters, "
          f"{K} codebooks), styles {', '.join(names)}; {num_samples} x {seconds:g} s per style and row; "
          f"{_cpu_name()}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    with torch.no_grad():
        labelled, unlabelled = (sum(split_losses(model, data_dir, meta, K, style_names)) / K for style_names in (names, None))
    print(f"val CE (whole val split, mean of codebooks): {labelled:.4f} with each file's style, {unlabelled:.4f} "
          f"as \"no style\": the label is worth {unlabelled - labelled:.4f} nats per token")
    print(f"{'':26}" + "".join(f"{'KL to ' + name:>16}" for name in names) + f"{'margin':>9}")

    def row(label, stats, style=None):
        kl = [unigram_kl(stats, own[name]) for name in names]
        margin = "" if style is None else \
            f"{min(k for n, k in zip(names, kl) if n != style) - kl[names.index(style)]:9.3f}"
        print(f"{label:26}" + "".join(f"{k:16.3f}" for k in kl) + margin)

    def stats(pieces):   # (pieces, K, frames) -> per-codebook unigrams
        return unigrams(pieces.transpose(1, 2).reshape(-1, K).numpy(), V)

    for name in names:
        row(f"data: {name}", own[name], name)
    sampling = dict(seed=seed, top_k=min(250, V))   # sample.py's defaults
    row("unconditional", stats(generate(model, frames, num_samples=num_samples * len(names), **sampling)))
    speed = {}
    for cfg_coef in coefs:
        clock = StepClock()
        codes = generate(model, frames, num_samples=num_samples, style_ids=list(range(len(names))),
                         cfg_coef=None if cfg_coef == 1 else cfg_coef, progress=clock, **sampling)
        speed[cfg_coef] = clock.steps_per_second()
        for i, name in enumerate(names):   # the pieces come style by style
            row(f"cfg_coef {cfg_coef:g}: {name}", stats(codes[i * num_samples:(i + 1) * num_samples]), name)
    guided = [c for c in coefs if c != 1]
    if 1 in speed and guided:
        print(f"generation, batch {num_samples * len(names)}: {speed[1]:.0f} steps/s conditional (cfg_coef 1), "
              f"{speed[guided[0]]:.0f} guided (twice the batch): {speed[guided[0]] / speed[1]:.2f}x")
    print(f"load average now {os.getloadavg()[0]:.1f}")


# --- sample ----------------------------------------------------------------------------------------

class StepClock:
    """A progress hook for generate() that times its steps, leaving out the prefill before them."""

    def __init__(self):
        self.steps, self.first, self.last = 0, None, None

    def update(self, n):
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.steps += n

    def steps_per_second(self):
        return (self.steps - 1) / (self.last - self.first)


def random_model(**overrides):
    """config/small.py's model (every model setting of it, or the overrides) with random weights: a
    fresh model's heads are zero, and all-equal logits would make top-k and sampling
    unrepresentatively cheap or dear."""
    import dataclasses
    import torch
    from nanosuno.config import load_config, model_config
    from nanosuno.model import GPT
    small = load_config([os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "small.py")])
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(model_config(small, 1024), **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def decode_loop_rate(decoder, context, steps, batch_size=1):
    """steps/s of a bare loop of Decoder.step calls after `context` cached steps, nothing sampled:
    what the model alone costs."""
    import torch
    K = decoder.config.n_codebooks
    cache, codes = decoder.new_cache(batch_size), torch.zeros(batch_size, K, dtype=torch.long)
    with torch.inference_mode():
        decoder.prefill(torch.zeros(batch_size, K, context, dtype=torch.long), cache)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.step(codes, cache)
    return steps / (time.perf_counter() - start)


def generate_rate(decoder, new_frames, prompt_frames=0, batch_size=1, context_stride=0.25):
    """steps/s of generate()'s steps (default sampling settings, prefill left out), and its codes.
    On a GPU the whole call is timed (Python runs ahead of the GPU): prefill (and on CUDA graph
    capture) too."""
    import torch
    from nanosuno.generate import generate
    device = decoder.device
    prompt = torch.randint(0, 1024, (decoder.config.n_codebooks, prompt_frames)) if prompt_frames else None
    clock = StepClock()
    start = time.perf_counter()
    codes = generate(decoder, new_frames, prompt, num_samples=batch_size, context_stride=context_stride, progress=clock)
    if device.type != "cpu":
        _sync(device.type)
        return clock.steps / (time.perf_counter() - start), codes
    return clock.steps_per_second(), codes


def gpt2_rate(new_tokens, batch_size=1):
    """steps/s of the original design: Hugging Face GPT-2 (one token per step) at config/small.py's
    dims with a vocabulary of 1024, random weights, float32, generate() with its KV cache, sampling
    top-k 250. None when transformers is not installed (it is never a dependency of nanosuno)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    import torch
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=2048, n_embd=256, n_layer=6, n_head=8,
                                                bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.zeros(batch_size, 1, dtype=torch.long)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=True, top_k=250, use_cache=True, pad_token_id=0)
    return (out.shape[1] - 1) / (time.perf_counter() - start)


def weight_matrices_us(decoder, batch_size=1, repeats=200):
    """How many weight matrices a Decoder's step multiplies, and the us they take alone, each once by
    an input of batch_size rows as the step does it: the part of a step that reads the weights."""
    import torch
    from nanosuno.decode import matmul
    dtype = decoder.model.lm_heads.weight.dtype
    matrices = [w for layer in decoder.layers for w in layer.values() if isinstance(w, tuple) or w.dim() == 2]
    matrices.append(decoder.heads)
    # an int8 matrix is (out, in) with its scales; a float one is the parameter transposed, (in, out)
    inputs = [torch.randn(batch_size, w[0].shape[1] if isinstance(w, tuple) else w.shape[0], dtype=dtype)
              for w in matrices]
    with torch.inference_mode():
        for _ in range(10):
            for x, w in zip(inputs, matrices):
                matmul(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            for x, w in zip(inputs, matrices):
                matmul(x, w)
    return len(matrices), (time.perf_counter() - start) / repeats * 1e6


def best_of(repeats, *measures):
    """The fastest of a few runs of each measurement: on a shared machine the slower runs measure the
    neighbours. Runs alternate between the measurements, so that a change of load hits all alike."""
    runs = [[measure() for measure in measures] for _ in range(repeats)]
    return [max(column) for column in zip(*runs)]


def bench_sample(repeats=3):
    """Generation speed at config/small.py's shape, random weights (speed does not depend on them).
    A step is 1/75 s of audio for every sample of the batch. Best of `repeats` runs."""
    import torch
    from nanosuno.codec import load_codec
    from nanosuno.hardware import pick_decode_dtype, pick_device
    from nanosuno.decode import DECODE_DTYPES, Decoder
    device = pick_device("auto")
    if device != "cpu":
        return bench_sample_gpu(device)
    short, full, threads = 750, 2048, torch.get_num_threads()
    auto = pick_decode_dtype("auto", device)
    models = {dtype: Decoder(random_model(), dtype) for dtype in DECODE_DTYPES}  # each its own, the same weights
    print(f"sample: config/small.py shape, random weights; {_cpu_name()}, {threads} threads; load average "
          f"{os.getloadavg()[0]:.1f}; steps/s (75 steps = 1 s of audio), best of {repeats}")
    print("bare = a loop of Decoder.step calls; generate() = the same plus sampling (top_k 250) and bookkeeping")
    print(f"{'decode_dtype':14} {'threads':>7} | {'bare 0-10 s':>11} {'generate()':>10} | {'bare 25-27 s':>12} {'generate()':>10}")
    rates = {}
    for dtype, model in models.items():
        for n_threads in sorted({threads, 1}, reverse=True) if dtype == auto else [threads]:
            torch.set_num_threads(n_threads)
            generate_rate(model, 50)  # warm-up
            bare_short, gen_short = best_of(repeats, lambda: decode_loop_rate(model, 1, short),
                                            lambda: generate_rate(model, short)[0])
            # 150 steps after a 1898-step prompt: a stride of 0.05 (102 steps) keeps all of it
            bare_full, gen_full = best_of(repeats, lambda: decode_loop_rate(model, full - 150, 140),
                                          lambda: generate_rate(model, 143, full - 150, context_stride=0.05)[0])
            name = dtype + (" (auto)" if dtype == auto else "")
            print(f"{name:14} {n_threads:7} | {bare_short:11.0f} {gen_short:10.0f} | {bare_full:12.0f} {gen_full:10.0f}")
            rates[dtype, n_threads] = (gen_short, gen_full, bare_short, bare_full)
    torch.set_num_threads(threads)
    model = models[auto]
    gen_short, gen_full, bare_short, bare_full = rates[auto, threads]
    print(f"default (decode_dtype=auto = {auto}, {threads} threads): {gen_short:.0f} steps/s from scratch "
          f"(target: at least 1500), {gen_full:.0f} at 25-27 s of context (target: at least 1000)")
    n_matrices, matrices_us = weight_matrices_us(model)
    print(f"  a decode step takes {1e6 / bare_short:.0f} us at 0-10 s and {1e6 / bare_full:.0f} at 25-27 s; its "
          f"{n_matrices} weight matrices alone {matrices_us:.0f} (the rest: attention, which grows with the "
          f"context, norms, casts, dispatch); sampling and bookkeeping add {1e6 / gen_short - 1e6 / bare_short:.0f}")

    gen1, gen8 = best_of(repeats, lambda: generate_rate(model, short)[0],
                         lambda: generate_rate(model, short, batch_size=8)[0])
    print(f"  batch 8, 0-10 s: {gen8:.0f} steps/s = {8 * gen8:.0f} frames/s aggregate = {8 * gen8 / gen1:.1f}x "
          f"batch 1's {gen1:.0f} (target: at least 5x)")
    peer = max(gpt2_rate(short) or 0 for _ in range(repeats))
    if peer:
        print(f"  the original design (Hugging Face GPT-2, same dims, vocab 1024, generate() with its cache, "
              f"float32) in the same run: {peer:.0f} steps/s; nanosuno is {gen1 / peer:.1f}x it (target: at least 5x)")
    else:
        print("  the original design: pip install transformers to time Hugging Face GPT-2 here (never a dependency)")
    codec = load_codec("untrained")  # the pretrained codec's architecture: the same decoding speed
    for seconds in (10, 120):
        start = time.perf_counter()
        codes = generate_rate(model, seconds * 75)[1]
        t_generate = time.perf_counter() - start
        codec.decode(codes[0])
        t_decode = time.perf_counter() - start - t_generate
        print(f"  {seconds:3d} s piece{', slides the 27 s window' if seconds * 75 > full else ''}: generate "
              f"{t_generate:.1f} s ({seconds / t_generate:.1f}x real time) + Encodec decode {t_decode:.1f} s "
              f"({seconds / t_decode:.1f}x) = {seconds / (t_generate + t_decode):.1f}x real time (target: at least 10x)")
    print(f"load average now {os.getloadavg()[0]:.1f}")


def bench_kv_heads(repeats=3):
    """What grouped-query attention buys generation: bare steps/s at config/small.py's shape with 8
    (plain), 4, 2 and 1 key/value heads, batch 1 and 8, early (100 steps from 0 s of context) and late
    (from 25 s), at the default decode precision. The KV cache shrinks with the k/v heads; each step
    reads the filled part of it."""
    import torch
    from nanosuno.decode import Decoder
    from nanosuno.hardware import pick_decode_dtype
    dtype = pick_decode_dtype("auto", "cpu")
    print(f"grouped-query attention: config/small.py shape, random weights, decode_dtype {dtype}; {_cpu_name()}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}; bare steps/s, best of {repeats}")
    print(f"{'n_kv_head':>9} {'cache MB/piece':>14} | {'batch 1, 0 s':>12} {'25 s':>6} | {'batch 8, 0 s':>12} "
          f"{'25 s':>6} | {'batch 8 frames/s vs batch 1, 0 s':>32}")
    for n_kv_head in (8, 4, 2, 1):
        decoder = Decoder(random_model(n_kv_head=n_kv_head), dtype)
        cache_mb = sum(kv.numel() * kv.element_size() for kv in decoder.new_cache(1).kv) / 2**20
        decode_loop_rate(decoder, 1, 20)   # warm-up
        rates = best_of(repeats, *[lambda b=b, c=c: decode_loop_rate(decoder, c, 100, b)
                                   for b in (1, 8) for c in (1, 1875)])
        print(f"{n_kv_head:9d} {cache_mb:14.1f} | {rates[0]:12.0f} {rates[1]:6.0f} | {rates[2]:12.0f} {rates[3]:6.0f} | "
              f"{8 * rates[2] / rates[0]:32.1f}")


def _compiled_step(dtype, batch_size, steps):
    """(in a fresh process) gpt-fast's static-shape step on the CPU: Decoder.step_logits with the position as
    a tensor (a cache of fixed length, every step attends over all of it, masked beyond the position: no
    recompiles as the context grows), compiled by torch.compile with fixed shapes. Returns the seconds
    the first call took (the compile, or loading it from Inductor's on-disk cache), the largest logit
    difference from the eager step, and the best of 3 steps/s of eager and compiled at 0-7 s and at 25 s."""
    import torch
    from nanosuno.decode import Decoder
    decoder = Decoder(random_model(), dtype)
    K = decoder.config.n_codebooks
    codes = torch.randint(0, 1024, (batch_size, K))
    eager_cache, static_cache = decoder.new_cache(batch_size), decoder.new_cache(batch_size)   # (the first calls compared)
    position = torch.zeros(1, dtype=torch.long)
    step = torch.compile(decoder.step_logits, dynamic=False, fullgraph=True)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled = step(codes, static_cache.kv, position)
        first_call = time.perf_counter() - start
        difference = (compiled.float() - decoder.step(codes, eager_cache).float()).abs().max().item()

        def static(start, n):
            t0 = time.perf_counter()
            for i in range(n):
                position.fill_(start + i)
                step(codes, static_cache.kv, position)
            return n / (time.perf_counter() - t0)
        rates = best_of(3, lambda: decode_loop_rate(decoder, 1, steps, batch_size), lambda: static(1, steps),
                        lambda: decode_loop_rate(decoder, 1900, 140, batch_size), lambda: static(1900, 140))
    return first_call, difference, rates


def bench_compiled_step():
    """Whether a compiled static-shape decode step (issue 22) beats the eager flat step on this CPU, and
    what its compile costs: the first run on a machine (an empty Inductor cache) and a second run (the
    on-disk FX graph cache filled), each in a fresh process, at the default precision, batch 1 and 8."""
    import torch
    from nanosuno.hardware import pick_decode_dtype
    dtype = pick_decode_dtype("auto", "cpu")
    cache_dir = tempfile.mkdtemp(prefix="bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir   # spawned processes inherit it: a cold cache, then warm
    print(f"compiled decode step: config/small.py shape, random weights, decode_dtype {dtype}; {_cpu_name()}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}; steps/s, best of 3")
    print(f"{'':22}{'first call s':>13}{'max |diff|':>11} | {'eager 0-7 s':>11}{'compiled':>9}{'ratio':>7} | "
          f"{'eager 25 s':>10}{'compiled':>9}{'ratio':>7}")
    try:
        for batch_size in (1, 8):
            for run in ("first run", "second run"):
                (first_call, difference, rates), _ = in_fresh_process(_compiled_step, dtype, batch_size, 500)
                e0, c0, e25, c25 = rates
                print(f"batch {batch_size}, {run:11}{first_call:13.1f}{difference:11.4f} | {e0:11.0f}{c0:9.0f}"
                      f"{c0 / e0:7.2f} | {e25:10.0f}{c25:9.0f}{c25 / e25:7.2f}")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"load average now {os.getloadavg()[0]:.1f}")


def bench_sample_gpu(device):
    """Generation on a GPU (CUDA: each step a captured graph, decode.CUDAGraphStep; MPS: eager),
    bfloat16, batch 1 and 64, at config/small.py's shape and at 768 x 12."""
    import torch
    from nanosuno.decode import Decoder
    from nanosuno.hardware import device_type
    on_cuda = device_type(device) == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else device
    print(f"sample on {name}: random weights, decode_dtype bfloat16; steps/s (75 steps = 1 s of audio) "
          f"of 750-step generate() calls, prefill{' and graph capture' if on_cuda else ''} included")
    for shape, dims in (("small", dict(n_layer=6, n_head=8, n_embd=256)), ("768x12", dict(n_layer=12, n_head=12, n_embd=768))):
        model = Decoder(random_model(**dims).to(device), "bfloat16")
        for batch_size in (1, 64):
            generate_rate(model, 50, batch_size=batch_size)  # warm-up
            rate = generate_rate(model, 750, batch_size=batch_size)[0]
            print(f"  {shape:7} batch {batch_size:2}: {rate:,.0f} steps/s = {rate * batch_size:,.0f} frames/s "
                  f"= {rate * batch_size / 75:,.0f}x real time")


# --- decode quality ----------------------------------------------------------------------------------

def bench_decode_quality(ckpt_path=None, data_dir="data/tokens", steps=None, window=512):
    """What each decode precision costs in quality: teacher-forced val cross-entropy through
    decode_step, per precision, on a trained checkpoint (--ckpt=PATH; without it, config/small.py's
    dims are trained for --steps iterations (default 300) on data_dir first). decode_dtype=auto must
    stay within 0.005 nats of float32."""
    from nanosuno.checkpoint import load_checkpoint, model_from_checkpoint, read_checkpoint
    from nanosuno.data import read_meta
    from nanosuno.evaluate import decode_cross_entropy, stacked_windows
    from nanosuno.hardware import pick_decode_dtype
    from nanosuno.decode import DECODE_DTYPES, Decoder
    meta, out_dir = read_meta(data_dir), None
    if ckpt_path is None:
        out_dir = tempfile.mkdtemp(prefix="bench-decode-quality-")
        steps = steps or 300
        print(f"training config/small.py's dims for {steps} iterations on {data_dir} (or pass --ckpt=PATH)")
        run_command("train.py", "config/small.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                    f"--block_size={window}", "--batch_size=8", "--gradient_accumulation_steps=1", f"--max_iters={steps}",
                    f"--lr_decay_iters={steps}", f"--warmup_iters={max(1, steps // 20)}", f"--eval_interval={steps}",
                    "--eval_iters=5", "--sample_every=0", "--compile=False")
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = read_checkpoint(ckpt_path) if ckpt_path.endswith(".pt") else load_checkpoint(ckpt_path)  # a file or an out_dir
    K = ckpt["model_args"]["n_codebooks"]
    windows = stacked_windows(data_dir, meta, K, min(window, ckpt["model_args"]["block_size"]))
    print(f"decode_quality: {ckpt_path} (iteration {ckpt.get('iter_num', '?')}); {len(windows)} val windows of "
          f"{windows.shape[2]} steps x {K} codebooks from {data_dir}, teacher-forced through Decoder.step; {_cpu_name()}")
    results = {}
    for dtype in DECODE_DTYPES:
        model = Decoder(model_from_checkpoint(ckpt).eval(), dtype)
        results[dtype] = decode_cross_entropy(model, windows)
    reference, reference_logits = results["float32"]
    print(f"{'decode_dtype':14} {'val CE (nats)':>13} {'vs float32':>10} {'max |logit - float32|':>22}  (logit std {reference_logits.std():.2f})")
    for dtype, (ce, logits) in results.items():
        print(f"{dtype:14} {ce:13.5f} {ce - reference:+10.5f} {(logits - reference_logits).abs().max():22.4f}")
    auto = pick_decode_dtype("auto", "cpu")
    difference = results[auto][0] - reference
    print(f"decode_dtype=auto on a CPU is {auto}: {difference:+.5f} nats against float32 "
          f"({'within' if abs(difference) <= 0.005 else 'NOT within'} the 0.005 allowed)")
    if out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)


def seed_list(text):
    """--seeds: comma-separated integers (argparse's one-line error otherwise)."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. 1337,7") from None


def main(argv):
    parser = argparse.ArgumentParser(description="nanosuno throughput benchmarks")
    parser.add_argument("what", choices=["prepare", "train", "sample", "decode_quality", "learn", "steer", "codec",
                                         "listen", "loops", "all"])
    parser.add_argument("files", nargs="*", help="codec: the audio files to reconstruct")
    parser.add_argument("--out", default="bench-out", help="codec, listen: where the WAVs and pictures go")
    parser.add_argument("--corpus", default=WESNOTH, help="prepare: folder of music")
    parser.add_argument("--minutes", type=float, default=None,
                        help="prepare: use only this much of the corpus; learn: training budget (default 30)")
    parser.add_argument("--steps", type=int, default=None,
                        help="learn: train exactly this many iterations instead; decode_quality: iterations to "
                             "train without --ckpt (default 300)")
    parser.add_argument("--data_dir", default=None,
                        help="learn: where the corpus's tokens are cached (default data/learn); steer: the tokens "
                             "the model was trained on (default data/learn); decode_quality: the tokens whose val "
                             "split is scored (default data/tokens)")
    parser.add_argument("--out_dir", default=None, help="steer: the checkpoint's folder (default out); learn: keep each "
                                                        "variant's checkpoint in out_dir/<variant>-seed<N>")
    parser.add_argument("--ckpt", default=None, help="decode_quality: a trained checkpoint (ckpt.pt or its folder)")
    parser.add_argument("--seconds", type=float, default=10.0, help="steer, listen: length of each piece; loops: of each loop")
    parser.add_argument("--num_samples", type=int, default=8, help="steer: pieces per style and row; listen, loops: pieces")
    parser.add_argument("--seed", type=int, default=1337, help="steer: sampling seed")
    parser.add_argument("--seeds", type=seed_list, default="1337",
                        help="learn: training seeds, comma-separated (two for anything kept); "
                             "listen: sampling seeds (each draws every set again)")
    parser.add_argument("--variant", action="append", default=None, metavar="NAME:SETTINGS",
                        help="learn: a recipe to compare, e.g. 'wd:--weight_decay=0.1 --muon_lr=0.03' (repeat the flag "
                             "for more; default: 'K=8:' and 'K=1:--n_codebooks=1')")
    parser.add_argument("--long_minutes", type=float, default=30.0, help="prepare: length of the long file (0: skip)")
    parser.add_argument("--codec", default=None, help="prepare: codec (default: pretrained if available)")
    parser.add_argument("--repeats", type=int, default=1, help="prepare: runs of raw encode and prepare, in turn")
    parser.add_argument("--compile", action="store_true", help="train: also measure torch.compile on CPU (slow to "
                                                               "compile); sample: also a compiled static-shape step")
    parser.add_argument("--kv_heads", action="store_true", help="sample: also generation speed with grouped-query "
                                                                "attention (n_kv_head 8, 4, 2, 1)")
    parser.add_argument("--batch_size", type=int, default=None, help="train: batch size (default 2 on CPU, 16 on CUDA)")
    args = parser.parse_intermixed_args(argv)   # (codec: options, then the files)
    if args.what in ("prepare", "all"):
        bench_prepare(args.corpus, args.minutes, args.long_minutes, args.codec, args.repeats)
    if args.what in ("train", "all"):
        bench_train(args.compile, args.batch_size)
    if args.what in ("sample", "all"):
        bench_sample()
        if args.compile:
            bench_compiled_step()
        if args.kv_heads:
            bench_kv_heads()
    if args.what == "learn":  # not part of "all": it takes an hour by default
        variants = [(v.partition(":")[0], v.partition(":")[2].split()) for v in args.variant] if args.variant else None
        bench_learn(args.corpus, args.minutes or 30.0, args.steps, args.codec, args.data_dir or "data/learn",
                    args.seeds, variants, args.out_dir)
    if args.what == "steer":
        bench_steer(args.data_dir or "data/learn", args.out_dir or "out", args.seconds, args.num_samples, seed=args.seed)
    if args.what == "codec":
        bench_codec(args.data_dir or "data/tokens", args.out, args.files)
    if args.what == "listen":
        bench_listen(args.ckpt or args.out_dir or "out", args.data_dir or "data/tokens", args.corpus, args.out,
                     args.seconds, args.num_samples, seeds=args.seeds)
    if args.what == "loops":
        bench_loops(args.ckpt or args.out_dir or "out", args.out, args.seconds, args.num_samples, args.seed)
    if args.what == "decode_quality":  # not part of "all": it needs a trained checkpoint and tokens
        bench_decode_quality(args.ckpt, args.data_dir or "data/tokens", args.steps)


if __name__ == "__main__":
    from nanosuno.common import require_dependencies, run_cli
    require_dependencies()
    run_cli(main)  # a user error (a missing checkpoint or corpus, ...) is one line
