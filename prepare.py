"""
Turn a folder of music into the token files that train.py reads:

    python prepare.py [config.py] [--input_dir=data/wavs] [--data_dir=data/tokens] [--codec=untrained]
    torchrun --standalone --nproc_per_node=4 prepare.py ...   # 4 processes: one per GPU, or a share of the cores

Every audio file under input_dir (wav, flac, ogg, mp3; any sample rate, any channels) is mixed to
mono, resampled to 24 kHz and encoded by the codec (None = the pretrained encodec_24khz) into 8
codebooks x 75 frames per second. --codec=spectral (and auto, without the pretrained weights) first
fits a codec on the train split's files (seeded: the same corpus gives the same codec), stored
beside the tokens as data_dir/codec.pt; a re-run whose train files and seed are unchanged uses that
codec again instead of fitting it anew. Files go to train or val by a hash of their path
(data.assign_splits) and end up in data_dir as train.bin, val.bin and meta.json (see data.py):
a new set replaces the old one only once it is complete, so a failed run leaves the old set usable.
One run at a time writes into a data_dir (a lock; a second run is told the first one's pid).
A file's style is the name of its first-level folder under input_dir (data/wavs/jazz/a.flac: jazz;
files directly in input_dir have none), unless --styles=none; train.py learns to generate each.

Each file's codes are cached in data_dir/cache/, keyed by the file's content (size and bytes) and
the codec, so a re-run encodes only new or changed files, an interrupted run resumes where it
stopped, and a moved or renamed corpus is not encoded again. A file that cannot be used
(unreadable, truncated, NaN/inf samples, not a regular file) is reported and skipped, never opened
when it could block (a named pipe); the rest is still prepared. With the default input_dir and no
audio in it, a synthetic demo corpus is written there first.

Several processes are torchrun's (on one machine or several): they share out the files to encode,
each into the cache; then one process (rank 0) writes train.bin, val.bin and meta.json from the
cache, so the result is byte for byte that of one process (the codec's codes do not depend on the
thread count). On a CPU one process already uses every core: see docs/speed.md before adding more.
"""
from nanosuno.common import passive_openmp, require_dependencies

passive_openmp()  # before torch is imported: the loader thread needs CPU time (see nanosuno/common.py)
require_dependencies()  # one line, not a traceback, when torch and torchaudio do not load together

import errno
import hashlib
import io
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanosuno import demo
from nanosuno.audio import AUDIO_EXTENSIONS, AudioError, audio_seconds, find_audio_files, iter_audio_blocks, load_audio
from nanosuno.codec import codec_from_weights, load_codec
from nanosuno.common import (UserError, atomic_write_bytes, lock_folder, refuse_folders, remove_stale_temporaries,
                             run_cli, writing)
from nanosuno.config import Config, load_config
from nanosuno.data import SPLITS, assign_splits, new_meta, read_codec_weights, read_meta, write_tokens
from nanosuno.hardware import pick_device
from nanosuno.spectral import MAX_FRAMES, VERSION as SPECTRAL_VERSION, SpectralCodec, fit_spectral, spectral_from_weights

SILENT_PEAK = 1e-4  # a file whose loudest sample is below this (-80 dBFS) is noted as silent


def main(argv):
    cfg = load_config(argv)
    if "RANK" not in os.environ:  # not started by torchrun
        return prepare(cfg)
    rank = int(os.environ["RANK"])
    # an equal share of this machine's cores for each of its processes
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores // int(os.environ["LOCAL_WORLD_SIZE"])))
    # gloo, even between GPUs: only the plan, the codec's weights and the reports travel between processes
    dist.init_process_group("gloo")
    try:
        if rank == 0:
            prepare(cfg)
        else:  # if rank 0 fails before sending the plan, torchrun stops this process
            encode_share(cfg)
    finally:
        dist.destroy_process_group()


def prepare(cfg):
    """What one process does, or rank 0 under torchrun: find the files, and with data_dir locked
    (one run at a time writes into it) prepare the tokens."""
    skipped = []  # (path, reason) of everything left out
    paths = find_corpus(cfg.input_dir, skipped)
    with lock_folder(cfg.data_dir, "data_dir"):
        refuse_folders(*(os.path.join(cfg.data_dir, name) for name in ("train.bin", "val.bin", "meta.json")))
        prepare_tokens(cfg, paths, skipped)


def prepare_tokens(cfg, paths, skipped):
    """Encode the files not cached yet (here, or across torchrun's processes), write the token files
    and report."""
    found = len(paths)
    device = process_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    fitted_on = fit_key(cfg, paths)
    codec = load_codec(cfg.codec or "encodec_24khz", cfg.codec_dir, device=device,
                       fit=lambda: stored_codec(cfg.data_dir, fitted_on) or fit_codec(cfg, paths))
    cache_dir = os.path.join(cfg.data_dir, "cache")
    with writing(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    cache, stamps = cache_files(cache_dir, paths, codec, skipped)
    paths = [path for path in paths if path in cache]
    todo = [path for path in paths if not cached_codes_ok(cache[path], codec)]
    processes = int(os.environ.get("WORLD_SIZE", 1))
    print(f"preparing {len(paths)} audio file(s) from {cfg.input_dir} with codec {codec.name} "
          f"into {cfg.data_dir}: {len(todo)} to encode, {len(paths) - len(todo)} cached"
          + (f", {processes} processes" if processes > 1 else ""))

    start = time.time()
    progress = encode(todo, codec, cache, stamps, processes)
    elapsed = time.time() - start
    skipped += progress.skipped

    reported = {path for path, _ in skipped}  # (a copy of a file may be cached, the file itself skipped)
    kept = [path for path in paths if os.path.exists(cache[path]) and path not in reported]
    if not kept:
        raise UserError(f"nothing could be prepared from {cfg.input_dir}: all {found} audio files "
                        f"were skipped (reasons above)")
    names = corpus_names(kept, cfg.input_dir)
    split_of = assign_splits(list(names.values()), cfg.val_fraction)
    styles = {name: style_of(name, cfg.styles) for name in names.values()}
    meta = write_tokens(cfg.data_dir, new_meta(codec.info()), token_sources(kept, names, split_of, styles, cache, codec),
                        fitted=codec if codec.name == "spectral" else None, fitted_on=fitted_on)

    splits = meta["splits"]
    seconds = sum(s["frames"] for s in splits.values()) / codec.frame_rate
    print(f"prepared {len(kept)} file(s), {seconds / 3600:.2f} h of audio: "
          + ", ".join(f"{split} {splits[split]['frames']:,} frames from {len(splits[split]['files'])} "
                      f"file(s)" for split in SPLITS) + f" -> {cfg.data_dir}; styles: "
          + (", ".join(f"{s['name']} ({s['frames']:,} frames)" for s in meta["styles"]) or "none"))
    if todo:
        print(f"encoded {progress.seconds_encoded / 60:.1f} min of audio in {elapsed:.1f} s: "
              f"{progress.seconds_encoded / max(elapsed, 1e-9):.1f} audio-seconds per second")
    if progress.silent:
        print(f"silent, kept: {', '.join(os.path.relpath(p, cfg.input_dir) for p in progress.silent)}")
    if skipped:
        print(f"skipped {len(skipped)}: " + "; ".join(f"{os.path.relpath(p, cfg.input_dir)}: {why}"
                                                      for p, why in skipped))
    if splits["val"]["frames"] == 0:
        print("note: the val split is empty (one file, or val_fraction=0): train.py has nothing to "
              "evaluate on")


def corpus_names(paths, input_dir):
    """{path: its name, the path under input_dir with "/"}: what splits and styles are decided by."""
    return {path: os.path.relpath(path, input_dir).replace(os.sep, "/") for path in paths}


def train_files(cfg, paths):
    """The files of the train split, decided as for the tokens (by name), before the unusable files
    are known: the files the spectral codec is fitted on."""
    names = corpus_names(paths, cfg.input_dir)
    split_of = assign_splits(list(names.values()), cfg.val_fraction)
    return [path for path in paths if split_of[names[path]] == "train"]


def fit_key(cfg, paths):
    """What the spectral codec fitted on this corpus depends on, hashed: the codec's version, the
    frames it samples, the seed, and each train file (its path and file_stamp, which changes with
    every write). Stored in meta.json with the codec; an equal key means fitting again would give
    the same codec."""
    digest = hashlib.blake2b(f"spectral-v{SPECTRAL_VERSION}\0{MAX_FRAMES}\0{cfg.seed}\0".encode(), digest_size=16)
    for path in train_files(cfg, paths):
        try:
            stamp = file_stamp(path)
        except OSError:   # reported when encoding skips it
            stamp = None
        digest.update(f"{os.path.realpath(path)}\0{stamp}\0".encode())
    return digest.hexdigest()


def stored_codec(data_dir, fitted_on):
    """The spectral codec in data_dir (codec.pt) if it was fitted on the same train files with the
    same seed (key fitted_on), else None (no tokens there yet, another codec, another corpus, or a
    damaged file: then it is fitted again)."""
    try:
        meta = read_meta(data_dir)
        if (meta.get("codec_file") or {}).get("fitted_on") != fitted_on:
            return None
        codec = spectral_from_weights(read_codec_weights(data_dir, meta))
    except (UserError, ValueError):
        return None
    print(f"using the spectral codec in {os.path.join(data_dir, meta['codec_file']['path'])}: fitted on the "
          f"same train files with the same seed")
    return codec


def fit_codec(cfg, paths):
    """The spectral codec fitted (seeded by cfg.seed) on the train split of the files found. A file
    that cannot be read is left out here, and reported when encoding skips it."""
    train = train_files(cfg, paths)
    frames = 0

    def waveforms():   # one file in memory at a time
        nonlocal frames
        for path in train:
            try:
                waveform = load_audio(path, SpectralCodec.sample_rate)
            except AudioError:
                continue
            frames += -(-waveform.numel() // SpectralCodec.hop_length)
            yield waveform
    start = time.time()
    try:
        codec = fit_spectral(waveforms(), seed=cfg.seed)
    except ValueError as e:   # too little audio
        raise UserError(f"cannot fit the spectral codec on the train split of {cfg.input_dir} ({len(train)} "
                        f"file(s), {frames / SpectralCodec.frame_rate:.1f} s): {e}; add audio, or use another codec")
    print(f"fitted the spectral codec on the train split ({len(train)} file(s), {frames:,} frames, "
          f"{min(frames, MAX_FRAMES):,} sampled) in {time.time() - start:.1f} s")
    return codec


def encode(todo, codec, cache, stamps, processes):
    """Encode the files in todo into their cache files: here, or across torchrun's `processes`, each
    a share of about equal length. Returns the Progress, which holds what the encoding found (files
    skipped, silent files, seconds encoded)."""
    seconds = {path: audio_seconds(path) for path in todo}
    shares = deal(todo, seconds, processes)
    total = sum(seconds.values())
    # under torchrun this process sees only its own share: the bar shows it scaled up to the whole
    own = sum(seconds[path] for path in shares[0])
    progress = Progress(total, scale=total / own if own else 1.0, show=bool(todo))
    try:
        if "RANK" in os.environ:
            encode_across_ranks(shares, codec, cache, stamps, progress)
        else:
            encode_files(shares[0], codec, cache, stamps, progress)
    finally:  # the bar ends before an error's line, not after it
        progress.close()
    return progress


def find_corpus(input_dir, skipped):
    """The audio files to prepare. The default input_dir, missing or without audio, gets the demo
    corpus; any other folder must exist and hold audio."""
    paths = find_audio_files(input_dir, skipped) if os.path.isdir(input_dir) else []
    if not paths and input_dir == Config.input_dir:
        print(f"{input_dir} holds no audio: writing a synthetic demo corpus there "
              f"({demo.DEMO_FILES} pieces of {demo.DEMO_SECONDS:.0f} s); put your own music in "
              f"{input_dir} to train on it instead")
        demo.make_demo_corpus(input_dir)
        skipped.clear()
        paths = find_audio_files(input_dir, skipped)
    if not os.path.isdir(input_dir):
        raise UserError(f"input_dir {input_dir} does not exist or is not a folder")
    if not paths:
        problems = "".join(f"; {p}: {why}" for p, why in skipped)
        raise UserError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {input_dir}{problems}")
    return paths


def style_of(name, styles):
    """The style of a file named by its path under input_dir ("jazz/a.flac"): its first folder, or
    None for a file directly in input_dir or with styles='none'."""
    folder, sep, _ = name.partition("/")
    return folder if sep and styles == "folders" else None


def process_device(setting, index):
    """The device of encoding process `index`: with CUDA, one GPU per process (round robin over those
    visible); otherwise the one pick_device picks."""
    device = pick_device(setting)
    return f"cuda:{index % torch.cuda.device_count()}" if device == "cuda" else device


def cache_files(cache_dir, paths, codec, skipped):
    """{path: its cache file} and {path: its file_stamp when it was hashed} for the files that can be
    read; the others are added to skipped."""
    def one(path):
        try:
            return cache_path(cache_dir, path, codec)
        except OSError as e:
            return e
    # hashlib releases the GIL while it hashes: threads read and hash files side by side
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = dict(zip(paths, pool.map(one, paths)))
    skipped += [(path, f"cannot read file ({e.strerror})") for path, e in found.items() if isinstance(e, OSError)]
    hashed = {path: result for path, result in found.items() if not isinstance(result, OSError)}
    return {path: cached for path, (cached, _) in hashed.items()}, {path: stamp for path, (_, stamp) in hashed.items()}


def cache_path(cache_dir, path, codec):
    """Where a file's codes are cached, and the file's stamp (file_stamp) for which that holds. The
    cache file is named by a hash of the file's size and bytes and what the codes depend on (the
    codec), not by its name, so a moved, renamed, copied or re-mounted corpus finds its codes.
    (Copies that are new together are each encoded: one failing for a reason of its own, such as its
    permissions, then does not take the others with it.) The whole file is hashed: blake2b reads
    ~760 MB/s per core (an hour of CD-quality FLAC in ~0.5 s), far less than encoding that hour
    takes; hashing only parts of a file would miss an edit elsewhere that keeps its size (a click
    removed from a WAV). A file written to while it is hashed raises OSError."""
    stamp = file_stamp(path)
    digest = hashlib.blake2b(f"{codec.cache_key}\0{stamp[1]}\0".encode(), digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if file_stamp(path) != stamp:
        raise OSError(errno.EAGAIN, "it changed while it was read", path)
    return os.path.join(cache_dir, digest.hexdigest() + ".npy"), stamp


def file_stamp(path):
    """What changes whenever a file is written to or replaced: its identity, size, modification and
    status change times (ctime is set by the system on every write and rename: it cannot be put back)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load_cached_codes(path, codec):
    """A cache file's codes, (n_codebooks, frames) uint16, checked: an .npy of that type and shape with
    every code below codebook_size. Raises ValueError saying what is wrong (OSError if unreadable)."""
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:   # truncated, empty, not an .npy, or pickled objects
        raise ValueError(f"not a token array ({e})")
    if codes.dtype != np.uint16 or codes.ndim != 2 or codes.shape[0] != codec.n_codebooks or codes.shape[1] < 1:
        raise ValueError(f"{codes.dtype} {codes.shape}, not uint16 ({codec.n_codebooks}, frames)")
    if codes.max() >= codec.codebook_size:
        raise ValueError(f"code {codes.max()} outside the codebook (0..{codec.codebook_size - 1})")
    return codes


def cached_codes_ok(path, codec):
    """True when the cache file exists and holds valid codes; a damaged one (a disk error, an edit, a
    crash of an older version) is removed with one line, and its audio is encoded again."""
    if not os.path.exists(path):
        return False
    try:
        load_cached_codes(path, codec)
        return True
    except (ValueError, OSError) as e:
        print(f"cache entry {path} is damaged ({e}): encoding its audio again")
        with writing(path):
            if os.path.isdir(path) and not os.path.islink(path):
                raise UserError(f"{path} is a folder, where prepare.py keeps a file's codes: remove it")
            os.remove(path)
        return False


def deal(paths, seconds, processes):
    """`processes` lists of paths with about equal audio-seconds each: longest file first, each to
    the list with the least so far. The same in every run."""
    shares, loads = [[] for _ in range(processes)], [0.0] * processes
    for path in sorted(paths, key=lambda p: -seconds[p]):
        i = loads.index(min(loads))
        shares[i].append(path)
        loads[i] += seconds[path]
    return shares


class Progress:
    """The progress bar over the audio-seconds to encode, and what the encoding reports (see
    encode_files; under torchrun, every rank's): files skipped, silent files, seconds encoded. This
    process's own reads count `scale` times (under torchrun: rank 0's share stands for the whole)."""

    def __init__(self, total, scale=1.0, show=True):
        self.bar = tqdm(total=math.ceil(total), unit=" audio-s", unit_scale=False, smoothing=0.1, disable=not show,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]")
        self.scale, self.skipped, self.silent, self.seconds_encoded = scale, [], [], 0.0

    def __call__(self, event, value):
        if event == "read":
            self.bar.update(min(value * self.scale, self.bar.total - self.bar.n))
        elif event == "skipped":
            self.skipped.append(value)
            self.bar.write(f"skipping {value[0]}: {value[1]}")
        elif event == "silent":
            self.silent.append(value[0])
            self.bar.write(f"note: {value[0]} is silent (peak {value[1]:.1e}); kept")
        elif event == "encoded":
            self.seconds_encoded += value

    def close(self):
        self.bar.close()


def encode_files(paths, codec, cache, stamps, report):
    """Encode each file into its cache file, telling report(event, value) what happens: ("read",
    audio-seconds) as blocks are read, ("skipped", (path, reason)), ("silent", (path, peak)) and
    ("encoded", seconds of the file). A loader thread reads and resamples the next blocks (of this
    file or the next) while the codec encodes."""
    if not paths:
        return
    blocks = queue.Queue(maxsize=4)  # (path, tensor | None at the end | the exception that ended it)

    def load():
        for path in paths:
            try:
                for block in iter_audio_blocks(path, codec.sample_rate):
                    blocks.put((path, block))
                blocks.put((path, None))
            except Exception as e:  # AudioError: skip the file; anything else: raised by the encoder side
                blocks.put((path, e))

    threading.Thread(target=load, daemon=True).start()
    for path in paths:
        samples, peak = 0, 0.0

        def file_blocks():
            nonlocal samples, peak
            while True:
                _, block = blocks.get()
                if block is None:
                    return
                if isinstance(block, Exception):
                    raise block
                samples += block.numel()
                peak = max(peak, float(block.abs().max()) if block.numel() else 0.0)
                report("read", block.numel() / codec.sample_rate)
                yield block

        try:
            codes = codec.encode_blocks(file_blocks())
            if samples < codec.hop_length:
                raise AudioError(path, f"shorter than one codec frame ({samples} samples at "
                                       f"{codec.sample_rate} Hz, {codec.hop_length} needed)")
            # The cache is keyed by a hash of the file's bytes taken before encoding: a file written
            # to since (or while it was read) would leave codes of other audio under that key for
            # good. Its stamp must be the one it had when it was hashed: its status change time
            # changes with every write or rename, even one undone later.
            if file_stamp(path) != stamps[path]:
                raise AudioError(path, "changed while it was being prepared: left out of this run; run "
                                       "prepare.py again once it is written")
        except AudioError as e:
            report("skipped", (path, e.reason))
            continue
        except OSError as e:  # gone by the time its stamp was taken again
            report("skipped", (path, f"changed while it was being prepared ({e.strerror}): left out of this run"))
            continue
        if peak < SILENT_PEAK:
            report("silent", (path, peak))
        save_codes(cache[path], codes)
        report("encoded", samples / codec.sample_rate)


def encode_across_ranks(shares, codec, cache, stamps, progress):
    """Under torchrun, on rank 0: send every rank the plan and the codec's weights, encode share 0
    here, then collect the other ranks' reports (see encode_share)."""
    weights = codec.weights()
    dist.broadcast_object_list([(codec.name, weights, shares, cache, stamps)], src=0)
    encode_files(shares[0], codec, cache, stamps, progress)
    reports = [None] * dist.get_world_size()
    dist.gather_object([], reports, dst=0)
    for events in reports[1:]:
        for event, value in events:
            progress(event, value)
    progress.bar.update(progress.bar.total - progress.bar.n)  # everyone has read everything


def encode_share(cfg):
    """Under torchrun, on every rank but 0: receive the plan from rank 0, encode this rank's share,
    send back what happened (all but the reads: rank 0's bar stands for everyone's)."""
    plan = [None]
    dist.broadcast_object_list(plan, src=0)
    codec_name, weights, shares, cache, stamps = plan[0]
    rank = dist.get_rank()
    codec = codec_from_weights(codec_name, weights, process_device(cfg.device, int(os.environ["LOCAL_RANK"])))
    events = []
    encode_files(shares[rank], codec, cache, stamps, lambda event, value: event != "read" and events.append((event, value)))
    dist.gather_object(events, None, dst=0)


def save_codes(path, codes):
    """Write a file's codes as .npy: made in memory (1.2 kB per second of audio) and written with
    Python's file I/O, as numpy's own writes report a full disk as "36000 requested and 0 written",
    without the errno that makes it one line."""
    npy = io.BytesIO()
    np.save(npy, codes.numpy().astype(np.uint16))
    atomic_write_bytes(path, npy.getbuffer())


def token_sources(kept, names, split_of, styles, cache, codec):
    """For data.write_tokens: per split, each kept file's entry and cached codes, read one at a time."""
    def source(split):
        for path in kept:
            if split_of[names[path]] == split:
                entry = {"path": names[path], "style": styles[names[path]]}
                try:   # checked again as it is read: only valid codes go into train.bin and val.bin
                    codes = load_cached_codes(cache[path], codec)
                except (ValueError, OSError) as e:
                    raise UserError(f"cache entry {cache[path]} of {path} became unusable while this run "
                                    f"prepared ({e}): run prepare.py again")
                yield entry, codes
    return {split: source(split) for split in SPLITS}


if __name__ == "__main__":
    run_cli(main)
