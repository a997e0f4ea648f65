"""
Turn a folder of music into the token files that train.py reads:

    python prepare.py [config.py] [--input_dir=data/wavs] [--data_dir=data/tokens] [--codec=untrained]

Every audio file under input_dir (wav, flac, ogg, mp3; any sample rate, any channels) is mixed to
mono, resampled to 24 kHz and encoded by the codec (None = the pretrained encodec_24khz) into 8
codebooks x 75 frames per second. Files go to train or val by a hash of their path
(data.assign_splits) and end up in data_dir as train.bin, val.bin and meta.json (see data.py):
a new set replaces the old one only once it is complete, so a failed run leaves the old set usable.
One run at a time writes into a data_dir (a lock; a second run is told the first one's pid).
A file's style is the name of its first-level folder under input_dir (data/wavs/jazz/a.flac: jazz;
files directly in input_dir have none), unless --styles=none; train.py learns to generate each.

Each file's codes are cached in data_dir/cache/, keyed by the file (path, size, modification time)
and the codec, so a re-run encodes only new or changed files and an interrupted run resumes where
it stopped. A file that cannot be used (unreadable, truncated, NaN/inf samples, not a regular file)
is reported and skipped, never opened when it could block (a named pipe); the rest is still
prepared. With the default input_dir and no audio in it, a synthetic demo corpus is written there
first.
"""
from nanosuno.common import passive_openmp

passive_openmp()  # before torch is imported: the loader thread needs CPU time (see nanosuno/common.py)

import hashlib
import math
import os
import queue
import threading
import time

import numpy as np
from tqdm import tqdm

from nanosuno import demo
from nanosuno.audio import AUDIO_EXTENSIONS, AudioError, audio_seconds, find_audio_files, iter_audio_blocks
from nanosuno.codec import load_codec
from nanosuno.common import UserError, atomic_write, lock_folder, remove_stale_temporaries, run_cli, writing
from nanosuno.config import Config, load_config
from nanosuno.data import SPLITS, assign_splits, new_meta, write_tokens
from nanosuno.hardware import pick_device

SILENT_PEAK = 1e-4  # a file whose loudest sample is below this (-80 dBFS) is noted as silent


def main(argv):
    cfg = load_config(argv)
    skipped = []  # (path, reason) of everything left out
    paths = find_corpus(cfg.input_dir, skipped)
    with lock_folder(cfg.data_dir, "data_dir"):  # one run at a time writes into data_dir
        prepare_tokens(cfg, paths, skipped)


def prepare_tokens(cfg, paths, skipped):
    """Encode the files not cached yet, write the token files and report."""
    codec = load_codec(cfg.codec or "encodec_24khz", cfg.codec_dir, device=pick_device(cfg.device))
    cache_dir = os.path.join(cfg.data_dir, "cache")
    with writing(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    cache = {path: cache_path(cache_dir, path, codec) for path in paths}
    todo = [path for path in paths if not os.path.exists(cache[path])]
    print(f"preparing {len(paths)} audio file(s) from {cfg.input_dir} with codec {codec.name} "
          f"into {cfg.data_dir}: {len(todo)} to encode, {len(paths) - len(todo)} cached")

    start, silent = time.time(), []
    seconds_encoded = encode_files(todo, codec, cache, skipped, silent)
    elapsed = time.time() - start

    kept = [path for path in paths if os.path.exists(cache[path])]
    if not kept:
        raise UserError(f"nothing could be prepared from {cfg.input_dir}: all {len(paths)} audio files "
                        f"were skipped (reasons above)")
    names = {path: os.path.relpath(path, cfg.input_dir).replace(os.sep, "/") for path in kept}
    split_of = assign_splits(list(names.values()), cfg.val_fraction)
    styles = {name: style_of(name, cfg.styles) for name in names.values()}
    meta = write_tokens(cfg.data_dir, new_meta(codec.info()), token_sources(kept, names, split_of, styles, cache))

    splits = meta["splits"]
    seconds = sum(s["frames"] for s in splits.values()) / codec.frame_rate
    print(f"prepared {len(kept)} file(s), {seconds / 3600:.2f} h of audio: "
          + ", ".join(f"{split} {splits[split]['frames']:,} frames from {len(splits[split]['files'])} "
                      f"file(s)" for split in SPLITS) + f" -> {cfg.data_dir}; styles: "
          + (", ".join(f"{s['name']} ({s['frames']:,} frames)" for s in meta["styles"]) or "none"))
    if todo:
        print(f"encoded {seconds_encoded / 60:.1f} min of audio in {elapsed:.1f} s: "
              f"{seconds_encoded / max(elapsed, 1e-9):.1f} audio-seconds per second")
    if silent:
        print(f"silent, kept: {', '.join(os.path.relpath(p, cfg.input_dir) for p in silent)}")
    if skipped:
        print(f"skipped {len(skipped)}: " + "; ".join(f"{os.path.relpath(p, cfg.input_dir)}: {why}"
                                                      for p, why in skipped))
    if splits["val"]["frames"] == 0:
        print("note: the val split is empty (one file, or val_fraction=0): train.py has nothing to "
              "evaluate on")


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


def cache_path(cache_dir, path, codec):
    """Where a file's codes are cached: named by the file's identity and what the codes depend on."""
    stat = os.stat(path)
    identity = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{codec.cache_key}"
    return os.path.join(cache_dir, hashlib.sha256(identity.encode()).hexdigest()[:32] + ".npy")


def encode_files(paths, codec, cache, skipped, silent):
    """Encode each file into its cache file; returns the seconds of audio encoded. A loader thread
    reads and resamples the next blocks (of this file or the next) while the codec encodes."""
    if not paths:
        return 0.0
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
    total = sum(audio_seconds(path) for path in paths)
    bar = tqdm(total=math.ceil(total), unit=" audio-s", unit_scale=False, smoothing=0.1,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]")
    seconds_encoded = 0.0
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
                bar.update(block.numel() / codec.sample_rate)
                yield block

        try:
            codes = codec.encode_blocks(file_blocks())
            if samples < codec.hop_length:
                raise AudioError(path, f"shorter than one codec frame ({samples} samples at "
                                       f"{codec.sample_rate} Hz, {codec.hop_length} needed)")
        except AudioError as e:
            skipped.append((path, e.reason))
            bar.write(f"skipping {path}: {e.reason}")
            continue
        if peak < SILENT_PEAK:
            silent.append(path)
            bar.write(f"note: {path} is silent (peak {peak:.1e}); kept")
        save_codes(cache[path], codes)
        seconds_encoded += samples / codec.sample_rate
    bar.close()
    return seconds_encoded


def save_codes(path, codes):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
            np.save(f, codes.numpy().astype(np.uint16))
    atomic_write(path, write)


def token_sources(kept, names, split_of, styles, cache):
    """For data.write_tokens: per split, each kept file's entry and cached codes, read one at a time."""
    def source(split):
        for path in kept:
            if split_of[names[path]] == split:
                entry = {"path": names[path], "style": styles[names[path]]}
                yield entry, np.load(cache[path], allow_pickle=False)
    return {split: source(split) for split in SPLITS}


if __name__ == "__main__":
    run_cli(main)
