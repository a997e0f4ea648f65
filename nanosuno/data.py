"""
Tokens on disk and training batches.

prepare.py writes, into data_dir:
  train.bin, val.bin  uint16, frame-major [frames, 8]: a time crop is one contiguous slice; all
                      files of a split are concatenated.
  meta.json           format_version, codec, sample_rate, frame_rate, bandwidth, n_codebooks,
                      codebook_size, dtype, and per split its frames and source files:
                      {"splits": {"train": {"frames": N, "files": [{"path", "offset", "frames"}]}}}
JSON, never pickle. The per-file offsets keep training windows inside one recording.
"""
import json
import os

import numpy as np

from nanosuno.config import UserError

META_VERSION = 1
TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: an interrupted run never leaves a truncated
    file where a good one stood."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_meta(data_dir, meta):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
    atomic_write(os.path.join(data_dir, "meta.json"), write)


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"no {path}: run prepare.py first (python prepare.py --data_dir={data_dir})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): run prepare.py again")
    if meta.get("format_version") != META_VERSION:
        raise UserError(f"{path} has format version {meta.get('format_version')}, this nanosuno reads "
                        f"version {META_VERSION}: run prepare.py again")
    return meta


def open_split(data_dir, meta, split):
    """Memory-map a split as [frames, n_codebooks] uint16 (None when the split is empty)."""
    frames = meta["splits"][split]["frames"]
    if frames == 0:
        return None
    path = os.path.join(data_dir, f"{split}.bin")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(frames, meta["n_codebooks"]))
