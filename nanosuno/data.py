"""
Tokens on disk and training batches.

prepare.py writes, into data_dir:
  train.bin, val.bin  uint16, frame-major [frames, 8]: a time crop is one contiguous slice; all
                      files of a split are concatenated.
  meta.json           format_version, codec, sample_rate, frame_rate, bandwidth, n_codebooks,
                      codebook_size, dtype, and per split its frames, the .bin's size and content
                      fingerprint, and its source files:
                      {"splits": {"train": {"frames": N, "bytes": B, "fingerprint": "...",
                                            "files": [{"path", "style", "offset", "frames"}]}}};
                      "styles": [{"name", "frames"}] sorted by name (a file's style is its
                      first-level folder under input_dir, or None); and "baselines": per codebook
                      the val cross-entropy of simple token statistics fitted on train
                      (nanosuno/baselines.py), or None without val.
JSON, never pickle. The per-file offsets keep training windows inside one recording.

Style ids: style i of the sorted "styles" list has id i; id len(styles) means "no style" (a file
without one, or a label dropped for classifier-free guidance).

Everything read from disk is checked once, on load: read_meta checks meta.json's structure and
numbers, open_split checks that the .bin is the one meta.json describes (a crash of prepare.py
between its renames, or another run's files, would otherwise train on the wrong windows). A
problem ends in one line naming it and "run prepare.py again".
"""
import hashlib
import json
import os
import stat

import numpy as np
import torch

from nanosuno.baselines import NAMES, baseline_losses
from nanosuno.codec import check_codec_info
from nanosuno.common import UserError, atomic_write_set
from nanosuno.hardware import device_type
from nanosuno.pattern import delay_interleave
from nanosuno.spectral import load_spectral, save_spectral

META_VERSION = 4          # 2: each split records its .bin's size and fingerprint; 3: styles; 4: the
                          # fingerprint hashes all of the .bin (it sampled 17 blocks)
TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")
CODEC_FILE = "codec.pt"   # the fitted spectral codec, beside the tokens it made


def new_meta(codec_info):
    """meta.json for tokens of the codec that Codec.info() describes, before the splits are added."""
    info = dict(codec_info)
    return {"format_version": META_VERSION, "codec": info.pop("name"), **info, "dtype": "uint16", "splits": {}}


def codec_info(meta, n_codebooks):
    """The codec of meta's tokens, as Codec.info(n_codebooks) describes it."""
    info = {k: meta[k] for k in ("sample_rate", "frame_rate", "bandwidth", "codebook_size")}
    return {"name": meta["codec"], **info, "n_codebooks": n_codebooks}


def read_codec_weights(data_dir, meta):
    """The weights of the codec fitted on data_dir's corpus (codec.pt, checked), or None when meta's
    codec is not one that is fitted (Encodec's weights are had by name)."""
    if "codec_file" not in meta:
        return None
    path = os.path.join(data_dir, meta["codec_file"]["path"])
    try:
        codec = load_spectral(path)
    except ValueError as e:
        raise UserError(f"{e}: run prepare.py again")
    if codec.cache_key != meta["codec_file"]["key"]:   # a codec.pt of another run (a crash between renames)
        raise UserError(f"{path} is not the codec that made the tokens in {data_dir} ({codec.cache_key}, "
                        f"meta.json says {meta['codec_file']['key']}): run prepare.py again")
    return codec.weights()


def add_baselines(meta, tokens):
    """meta["baselines"]: the simple baselines' val cross-entropy per codebook (see baselines.py),
    the yardstick train.py shows every evaluation against; None when the val split is empty.
    tokens: {split: its [frames, n_codebooks] codes} (write_tokens maps the new files)."""
    splits = meta["splits"]
    if not splits["train"]["frames"] or not splits["val"]["frames"]:
        meta["baselines"] = None
        return meta
    meta["baselines"] = baseline_losses(tokens["train"], splits["train"]["files"], tokens["val"],
                                        splits["val"]["files"], meta["codebook_size"])
    return meta


def styles_of(splits):
    """meta.json's "styles": every style of the splits' files, sorted by name, with its frames (both
    splits together)."""
    frames = {}
    for split in splits.values():
        for f in split["files"]:
            if f["style"] is not None:
                frames[f["style"]] = frames.get(f["style"], 0) + f["frames"]
    return [{"name": name, "frames": frames[name]} for name in sorted(frames)]


def style_names(meta):
    """The corpus's style names; a style's id is its index here (see the module doc)."""
    return [s["name"] for s in meta["styles"]]


def read_meta(data_dir):
    """meta.json of data_dir, checked (check_meta)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"no {path}: run prepare.py first (python prepare.py --data_dir={data_dir})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): run prepare.py again")
    if not isinstance(meta, dict) or meta.get("format_version") != META_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(f"{path} has format version {version}, this nanosuno reads "
                        f"version {META_VERSION}: run prepare.py again")
    problem = check_meta(meta)
    if problem:
        raise UserError(f"{path} is inconsistent: {problem}; run prepare.py again")
    return meta


def check_meta(meta):
    """What is wrong with a meta.json's contents (types, ranges, the splits' frame counts and file
    offsets adding up), or None."""
    def integer(value, low):
        return type(value) is int and value >= low   # (a bool is not a count)
    for key, low in (("sample_rate", 1), ("frame_rate", 1), ("n_codebooks", 1), ("codebook_size", 1)):
        if not integer(meta.get(key), low):
            return f"{key} is {meta.get(key)!r}, not an integer >= {low}"
    problem = check_codec_info(codec_info(meta, meta["n_codebooks"]))
    if problem:
        return problem
    file = meta.get("codec_file")
    if (meta["codec"] == "spectral") != (file is not None) or file is not None and not (
            isinstance(file, dict) and file.get("path") == CODEC_FILE and isinstance(file.get("key"), str)):
        return f"codec_file {file!r} is not the fitted spectral codec's file (it is there for that codec only)"
    if meta["codebook_size"] > np.iinfo(TOKEN_DTYPE).max + 1:
        return f"codebook_size {meta['codebook_size']} does not fit the token type {meta.get('dtype')}"
    if not isinstance(meta.get("codec"), str) or meta.get("dtype") != "uint16":
        return f"codec {meta.get('codec')!r} or dtype {meta.get('dtype')!r} is not a name of this nanosuno"
    if not isinstance(meta.get("bandwidth"), (int, float)) or not isinstance(meta.get("splits"), dict):
        return "bandwidth or splits missing"
    if set(meta["splits"]) - set(SPLITS):
        return f"splits {sorted(meta['splits'])} are not {', '.join(SPLITS)}"
    frame_bytes = meta["n_codebooks"] * np.dtype(TOKEN_DTYPE).itemsize
    for split in SPLITS:
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not integer(info.get("frames"), 0) or not isinstance(info.get("files"), list):
            return f"split {split} lacks its frames or files"
        if info.get("bytes") != info["frames"] * frame_bytes or not isinstance(info.get("fingerprint"), str):
            return (f"split {split}: {info['frames']} frames of {frame_bytes} bytes are not the "
                    f"{info.get('bytes')!r} bytes it records, or its fingerprint is missing")
        offset = 0
        for i, f in enumerate(info["files"]):
            if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not integer(f.get("frames"), 1):
                return f"split {split}, file {i}: no path or no frames"
            if f.get("offset") != offset:
                return f"split {split}, file {f['path']}: offset {f.get('offset')!r}, expected {offset}"
            if "style" not in f or not (f["style"] is None or isinstance(f["style"], str) and f["style"]):
                return f"split {split}, file {f['path']}: style {f.get('style', '(none)')!r} is not a name or null"
            offset += f["frames"]
        if offset != info["frames"]:
            return f"split {split}: its files hold {offset} frames, not {info['frames']}"
    if meta.get("styles") != styles_of(meta["splits"]):
        return f"styles {meta.get('styles')!r} are not its files' styles with their frames"
    baselines = meta.get("baselines")
    if baselines is not None and not (isinstance(baselines, dict) and all(
            isinstance(baselines.get(name), list) and len(baselines[name]) == meta["n_codebooks"]
            and all(v is None or isinstance(v, (int, float)) for v in baselines[name]) for name in NAMES)):
        return f"baselines are not {', '.join(NAMES)}, each a loss per codebook"
    return None


def scan(f):
    """(fingerprint, largest code) of an open token file: a hash of all its bytes, and the largest
    value in it (-1 when empty). One pass in 4 MiB blocks, ~1 s per GB: cheap next to training on it,
    and nothing in it goes unchecked (a damaged block anywhere changes the hash; a code outside the
    codebook would index past the embedding table)."""
    digest, largest = hashlib.blake2b(digest_size=16), -1
    f.seek(0)
    while block := f.read(1 << 22):
        digest.update(block)
        codes = np.frombuffer(block[:len(block) - len(block) % 2], dtype=TOKEN_DTYPE)
        largest = max(largest, int(codes.max())) if codes.size else largest
    return digest.hexdigest(), largest


def open_split(data_dir, meta, split):
    """Memory-map a split as [frames, n_codebooks] uint16 (None when the split is empty), after
    checking that the .bin is the one meta.json describes (size and fingerprint of all its bytes)
    and that every code in it lies in the codebook."""
    info = meta["splits"][split]
    if info["frames"] == 0:
        return None
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path) or not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{path} is missing or not a file: run prepare.py again")
    with open(path, "rb") as f:
        size, (found, largest) = os.fstat(f.fileno()).st_size, scan(f)
        if size != info["bytes"] or found != info["fingerprint"]:
            raise UserError(f"{path} ({size} bytes) is not the file that meta.json describes ({info['bytes']} "
                            f"bytes{', other contents' if size == info['bytes'] else ''}): a prepare.py run was "
                            f"interrupted or another one wrote it; run prepare.py again")
        if largest >= meta["codebook_size"]:
            raise UserError(f"{path} holds code {largest}, outside the codebook of {meta['codebook_size']} codes: "
                            f"run prepare.py again")
        return np.memmap(f, dtype=TOKEN_DTYPE, mode="r", shape=(info["frames"], meta["n_codebooks"]))


class Batches:
    """Random training windows from one split, straight from the memmap.

    A window is block_size + 1 consecutive frames of one source file (never two), interleaved with
    the delay pattern and cut to block_size + 1 steps, so every window starts with the delay
    warm-up exactly as generation does. A file shorter than a window is used whole and padded with
    the special token, whose targets the loss ignores: nothing real-looking is invented.
    Files are drawn in proportion to their number of window positions, so every position of the
    corpus is equally likely. Each window comes with its file's style id. Randomness comes from a
    torch.Generator whose state goes into the checkpoint (exact resume)."""

    def __init__(self, data_dir, meta, split, n_codebooks, block_size, seed=0):
        self.tokens = open_split(data_dir, meta, split)
        self.files = meta["splits"][split]["files"]
        names = style_names(meta)
        self.n_styles = len(names)
        ids = {name: i for i, name in enumerate(names)}
        self.style_ids = torch.tensor([ids.get(f["style"], self.n_styles) for f in self.files], dtype=torch.long)
        self.n_codebooks, self.special = n_codebooks, meta["codebook_size"]
        self.steps = block_size + 1
        self.starts = torch.tensor([max(1, f["frames"] - self.steps + 1) for f in self.files], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def __bool__(self):
        return self.tokens is not None

    def sample(self, batch_size, device="cpu", style_dropout=0.0):
        """-> inputs, targets: (B, K, block_size) int64 codes in the delayed layout, and style_ids: (B,)
        the style id of each window, replaced by "no style" with probability style_dropout (a corpus
        without styles draws nothing for it: its batches are exactly those of a run without it)."""
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
        style_ids = self.style_ids[which]
        if self.n_styles and style_dropout:
            style_ids = style_ids.masked_fill(torch.rand(batch_size, generator=g) < style_dropout, self.n_styles)
        if device_type(device) == "cuda":  # pinned memory lets the copy overlap with compute
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
        return window[:, :, :-1], window[:, :, 1:], style_ids.to(device)


def windows(data_dir, meta, n_codebooks, length, split="val"):
    """Every file of a split cut into consecutive windows of `length` frames (a file's last one
    shorter), each laid out as in training (delayed, warm-up included): yields (file entry, (K, n))."""
    tokens, special = open_split(data_dir, meta, split), meta["codebook_size"]
    for f in meta["splits"][split]["files"]:
        for start in range(0, f["frames"] - 1, length):
            n = min(length, f["frames"] - start)
            crop = np.asarray(tokens[f["offset"] + start:f["offset"] + start + n, :n_codebooks], dtype=np.int64)
            yield f, delay_interleave(torch.from_numpy(crop).T, special)[:, :n]


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


def write_tokens(data_dir, meta, sources, fitted=None, fitted_on=None):
    """Write train.bin, val.bin and meta.json as one set: all three under temporary names first,
    then renamed, meta.json last (atomic_write_set), so that a failed run leaves the old set valid
    and a crash between renames is caught by open_split (or read_codec_weights). sources: {split:
    iterable of (file entry, codes (n_codebooks, frames))}; each entry ({"path": ..., "style": ...})
    gets its offset and frames. Holds one file's codes at a time. fitted: the spectral codec that
    made the codes, written to codec.pt in the same set, with fitted_on (prepare.fit_key: what it was
    fitted on) in meta.json. Returns meta with its splits, styles and
    baselines filled in."""
    written = {}   # split: its temporary file
    outputs = []
    if fitted is not None:
        meta["codec_file"] = {"path": CODEC_FILE, "key": fitted.cache_key, "fitted_on": fitted_on}

        def write_codec(tmp):
            with open(tmp, "wb") as f:   # a file object: a full disk is an OSError, as for the others
                save_spectral(fitted, f)
        outputs.append((os.path.join(data_dir, CODEC_FILE), write_codec))

    def split_writer(split):
        def write(tmp):
            files, written[split] = [], tmp

            def code_arrays():
                offset = 0
                for entry, codes in sources[split]:
                    files.append({**entry, "offset": offset, "frames": codes.shape[1]})
                    offset += codes.shape[1]
                    yield codes
            meta["splits"][split] = {**_write_split(tmp, code_arrays()), "files": files}
        return write

    def write_meta(tmp):
        meta["styles"] = styles_of(meta["splits"])
        add_baselines(meta, {split: np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(info["frames"], meta["n_codebooks"]))
                             for split, path in written.items() if (info := meta["splits"][split])["frames"]})
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
    outputs += [(os.path.join(data_dir, f"{split}.bin"), split_writer(split)) for split in SPLITS]
    atomic_write_set(outputs + [(os.path.join(data_dir, "meta.json"), write_meta)])
    return meta


def _write_split(path, code_arrays):
    """Write (n_codebooks, frames) code arrays one after the other as a frame-major uint16 file;
    returns its meta.json entry but the files: frames, bytes, fingerprint."""
    frames = 0
    with open(path, "w+b") as f:
        for codes in code_arrays:
            f.write(np.ascontiguousarray(codes.T, dtype=TOKEN_DTYPE).tobytes())
            frames += codes.shape[1]
        f.flush()
        return {"frames": frames, "bytes": f.tell(), "fingerprint": scan(f)[0]}
