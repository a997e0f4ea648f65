"""Shared test helpers: tiny synthetic token corpora, so train/model tests need no codec."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's nanosuno, and the top-level scripts (prepare.py, ...) as modules

from nanosuno.common import passive_openmp

passive_openmp()  # before torch is imported: tests share their cores (see nanosuno/common.py)

import numpy as np
import torch
import pytest

from nanosuno.data import new_meta, write_tokens


def write_token_corpus(data_dir, file_frames, val_file_frames=(), n_codebooks=8, codebook_size=1024,
                       codec="untrained", seed=0, codes_of=None):
    """Write train.bin/val.bin/meta.json as prepare.py does, from learnable synthetic codes: each
    file repeats a short random phrase, and codebook k > 0 is a fixed function of codebook 0.
    codes_of(split, i, frames) -> (n_codebooks, frames) replaces them."""
    rng = np.random.default_rng(seed)
    os.makedirs(data_dir, exist_ok=True)
    meta = new_meta({"name": codec, "sample_rate": 24000, "frame_rate": 75, "bandwidth": 6.0,
                     "n_codebooks": n_codebooks, "codebook_size": codebook_size})

    def phrases(split, frames):
        base = np.resize(rng.integers(0, codebook_size, size=12), frames)
        return np.stack([(base * (k + 1) + 7 * k) % codebook_size for k in range(n_codebooks)])
    codes_of = codes_of or (lambda split, i, frames: phrases(split, frames))
    sources = {split: [({"path": f"{split}_{i}.wav"}, codes_of(split, i, frames)) for i, frames in enumerate(lengths)]
               for split, lengths in (("train", file_frames), ("val", val_file_frames))}
    return write_tokens(str(data_dir), meta, sources)


@pytest.fixture
def token_corpus(tmp_path):
    data_dir = tmp_path / "tokens"
    write_token_corpus(data_dir, file_frames=[400, 300, 50], val_file_frames=[200])
    return str(data_dir)

