"""
Tokens on disk and training batches.

prepare.py writes, into data_dir:
  train.bin, val.bin  uint16, frame-major [frames, 8]: a time crop is one contiguous slice; all
                      files of a split are concatenated.
  meta.json           format_version, codec, sample_rate, frame_rate, bandwidth, n_codebooks,
                      codebook_size, dtype, and per split its frames and source files:
                      {"splits": {"train": {"frames": N, "files": [{"path", "offset", "frames"}]}}};
                      and "baselines": per codebook the val cross-entropy of simple token
                      statistics fitted on train (nanosuno/baselines.py), or None without val.
JSON, never pickle. The per-file offsets keep training windows inside one recording.
"""
import hashlib
import json
import os

import numpy as np
import torch

from nanosuno.baselines import baseline_losses
from nanosuno.common import UserError, atomic_write
from nanosuno.pattern import delay_interleave

META_VERSION = 1
TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")


def new_meta(codec_info):
    """meta.json for tokens of the codec that Codec.info() describes, before the splits are added."""
    info = dict(codec_info)
    return {"format_version": META_VERSION, "codec": info.pop("name"), **info, "dtype": "uint16", "splits": {}}


def codec_info(meta, n_codebooks):
    """The codec of meta's tokens, as Codec.info(n_codebooks) describes it."""
    info = {k: meta[k] for k in ("sample_rate", "frame_rate", "bandwidth", "codebook_size")}
    return {"name": meta["codec"], **info, "n_codebooks": n_codebooks}


def add_baselines(data_dir, meta):
    """meta["baselines"]: the simple baselines' val cross-entropy per codebook (see baselines.py),
    the yardstick train.py shows every evaluation against; None when the val split is empty."""
    splits = meta["splits"]
    if not splits["train"]["frames"] or not splits["val"]["frames"]:
        meta["baselines"] = None
        return meta
    meta["baselines"] = baseline_losses(open_split(data_dir, meta, "train"), splits["train"]["files"],
                                        open_split(data_dir, meta, "val"), splits["val"]["files"],
                                        meta["codebook_size"])
    return meta


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


class Batches:
    """Random training windows from one split, straight from the memmap.

    A window is block_size + 1 consecutive frames of one source file (never two), interleaved with
    the delay pattern and cut to block_size + 1 steps, so every window starts with the delay
    warm-up exactly as generation does. A file shorter than a window is used whole and padded with
    the special token, whose targets the loss ignores: nothing real-looking is invented.
    Files are drawn in proportion to their number of window positions, so every position of the
    corpus is equally likely. Randomness comes from a torch.Generator whose state goes into the
    checkpoint (exact resume)."""

    def __init__(self, data_dir, meta, split, n_codebooks, block_size, seed=0):
        self.tokens = open_split(data_dir, meta, split)
        self.files = meta["splits"][split]["files"]
        self.n_codebooks, self.special = n_codebooks, meta["codebook_size"]
        self.steps = block_size + 1
        self.starts = torch.tensor([max(1, f["frames"] - self.steps + 1) for f in self.files], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def __bool__(self):
        return self.tokens is not None

    def sample(self, batch_size, device="cpu"):
        """-> inputs, targets: (B, K, block_size) int64 codes in the delayed layout."""
        g = self.generator
        which = torch.multinomial(self.starts, batch_size, replacement=True, generator=g).tolist()
        crops = np.full((batch_size, self.steps, self.n_codebooks), self.special, dtype=np.int64)
        for b, i in enumerate(which):
            f = self.files[i]
            start = f["offset"] + int(torch.randint(int(self.starts[i]), (1,), generator=g))
            n = min(self.steps, f["frames"])
            crops[b, :n] = self.tokens[start:start + n, :self.n_codebooks]
        codes = torch.from_numpy(crops).transpose(1, 2)                  # (B, K, steps) frames
        window = delay_interleave(codes, self.special)[:, :, :self.steps]  # (B, K, steps) delayed
        if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
        return window[:, :, :-1], window[:, :, 1:]


def assign_splits(names, val_fraction):
    """{name: "train" or "val"} for files named by their path relative to the corpus. A file goes
    to val when a hash of its name falls below val_fraction: the same on every machine, and a file
    keeps its split when others are added. With two or more files and val_fraction > 0 neither
    split is left empty: the lowest-hashing file is then val, the highest-hashing one train."""
    score = {name: int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / 16 ** 12 for name in names}
    val = {name for name in names if score[name] < val_fraction}
    if val_fraction > 0 and len(names) >= 2:
        if not val:
            val = {min(names, key=score.get)}
        if len(val) == len(names):
            val.remove(max(names, key=score.get))
    return {name: "val" if name in val else "train" for name in names}


def write_split(path, code_arrays):
    """Write (n_codebooks, frames) code arrays one after the other as a frame-major uint16 file,
    through a temporary name; returns the number of frames. Holds one array at a time."""
    frames = 0

    def write(tmp):
        nonlocal frames
        with open(tmp, "wb") as f:
            for codes in code_arrays:
                f.write(np.ascontiguousarray(codes.T, dtype=TOKEN_DTYPE).tobytes())
                frames += codes.shape[1]
    atomic_write(path, write)
    return frames
