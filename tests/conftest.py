"""Shared test helpers: tiny synthetic token corpora, so train/model tests need no codec; faults of
the file system (a full disk, a folder that may not be written); a process holding a folder's lock."""
import builtins
import errno
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's nanosuno, and the top-level scripts (prepare.py, ...) as modules

from nanosuno.common import passive_openmp

passive_openmp()  # before torch is imported: tests share their cores (see nanosuno/common.py)

import numpy as np
import torch
import pytest

from nanosuno.data import new_meta, write_tokens


def run_torchrun(args, timeout=300, **kwargs):
    """`python -m torch.distributed.run --standalone *args` with its output captured. On a timeout
    torchrun is stopped with SIGTERM, which it passes on to its workers (they run in sessions of
    their own: killing torchrun, as subprocess.run's timeout does, leaves them running), and
    TimeoutExpired is raised once they are gone."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:   # torchrun itself is stuck: at least it goes
                process.kill()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def write_token_corpus(data_dir, file_frames, val_file_frames=(), n_codebooks=8, codebook_size=1024,
                       codec="untrained", seed=0, codes_of=None, phrase_codes=None, styles=None):
    """Write train.bin/val.bin/meta.json as prepare.py does, from learnable synthetic codes: each
    file repeats a short random phrase (of codes below phrase_codes, default all), and codebook
    k > 0 is a fixed function of codebook 0. codes_of(split, i, frames) -> (n_codebooks, frames)
    replaces them. styles: the style (the folder) of each file, train files then val files; None:
    no folders."""
    rng = np.random.default_rng(seed)
    os.makedirs(data_dir, exist_ok=True)
    meta = new_meta({"name": codec, "sample_rate": 24000, "frame_rate": 75, "bandwidth": 6.0,
                     "n_codebooks": n_codebooks, "codebook_size": codebook_size})

    def phrases(split, frames):
        base = np.resize(rng.integers(0, phrase_codes or codebook_size, size=12), frames)
        return np.stack([(base * (k + 1) + 7 * k) % codebook_size for k in range(n_codebooks)])

    def entry(split, i):
        style = styles[i + (len(file_frames) if split == "val" else 0)] if styles else None
        return {"path": f"{style}/{split}_{i}.wav" if style else f"{split}_{i}.wav", "style": style}
    codes_of = codes_of or (lambda split, i, frames: phrases(split, frames))
    sources = {split: [(entry(split, i), codes_of(split, i, frames)) for i, frames in enumerate(lengths)]
               for split, lengths in (("train", file_frames), ("val", val_file_frames))}
    return write_tokens(str(data_dir), meta, sources)


def fail_writes(monkeypatch, match, error=errno.ENOSPC, room=0):
    """Make writing any file whose path contains `match` fail the way the OS would: a full disk
    (ENOSPC) at the first write, a missing permission (EACCES) or a read-only file system (EROFS)
    at open. (The tests run as root, where permissions do not stop anyone, and a full disk cannot
    be had without mounting one.) Everything nanosuno writes goes through Python's open(). A full
    disk may have `room` bytes left for each file: the writes that fit are made."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and match in str(file) and any(c in mode for c in "wax+"):
            if error != errno.ENOSPC:
                raise OSError(error, os.strerror(error), str(file))
            return NoSpace(real_open(file, mode, *args, **kwargs), room)
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_)


class NoSpace:
    """An open file whose writes fail as on a full disk, once `room` bytes are written."""

    def __init__(self, f, room=0):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[:self.room])   # as the OS does: what fits is written, then the error
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def hold_lock(folder, setting):
    """A separate process holding folder's lock (nanosuno.common.lock_folder) until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nanosuno.common import lock_folder\n"
         "with lock_folder(sys.argv[1], sys.argv[2]):\n    print('locked', flush=True); time.sleep(600)",
         str(folder), setting], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def token_corpus(tmp_path):
    data_dir = tmp_path / "tokens"
    write_token_corpus(data_dir, file_frames=[400, 300, 50], val_file_frames=[200])
    return str(data_dir)

