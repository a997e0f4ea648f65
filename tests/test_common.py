"""nanosuno/common.py: the one-run-per-folder lock, temporary files, sets of files replaced
together, one line for a full disk and for a broken torch install; and the tests' own torchrun helper."""
import errno
import importlib.metadata
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, fail_writes, hold_lock, run_torchrun, write_token_corpus
from nanosuno.common import UserError, atomic_write_set, lock_folder, refuse_folders, run_cli, temp_path, writing


def test_a_lock_is_refused_while_another_process_holds_it_and_freed_when_that_dies(tmp_path):
    holder = hold_lock(tmp_path / "out", "out_dir")
    try:
        with pytest.raises(UserError, match=f"out_dir {tmp_path / 'out'} is in use by another run "
                                            fr"\(pid {holder.pid}\): wait for it to end, or use another out_dir"):
            with lock_folder(tmp_path / "out", "out_dir"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)   # as a crash would: the OS releases the lock
        holder.wait()
    with lock_folder(tmp_path / "out", "out_dir"):
        assert open(tmp_path / "out" / ".lock").read() == f"{os.getpid()}\n"


def test_taking_a_lock_removes_temporaries_that_killed_runs_left(tmp_path):
    left = ["ckpt.pt.tmp-4194000-0badcafe", "loss.png.tmp-17-00"]
    kept = ["ckpt.pt", "notes.tmp.txt", "x.tmp-abc"]
    for name in left + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "a.wav.tmp-4194000-00").write_text("x")   # another folder: another lock
    with lock_folder(tmp_path, "out_dir"):
        assert sorted(os.listdir(tmp_path)) == sorted([".lock", "samples"] + kept)
    assert os.listdir(tmp_path / "samples") == ["a.wav.tmp-4194000-00"]


def test_temporary_names_are_unique_to_a_process_and_a_call(tmp_path):
    names = {temp_path(tmp_path / "ckpt.pt") for _ in range(100)}
    assert len(names) == 100 and all(f".tmp-{os.getpid()}-" in name for name in names)


def write_text(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


def test_a_set_is_replaced_only_when_all_of_it_is_written(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "meta.json"
    atomic_write_set([(a, write_text("old a")), (b, write_text("old b"))])
    fail_writes(monkeypatch, "meta.json")
    with pytest.raises(UserError, match=f"^no space left on {tmp_path}$"):
        atomic_write_set([(a, write_text("new a")), (b, write_text("new b"))])
    monkeypatch.undo()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "meta.json"]   # no temporaries left behind


@pytest.mark.parametrize("error, expected", [
    (errno.EACCES, "cannot write {}: permission denied"),
    (errno.EROFS, "cannot write {}: read-only file system"),
])
def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, error, expected):
    fail_writes(monkeypatch, str(tmp_path), error)
    with pytest.raises(UserError, match=f"^{expected.format(tmp_path / 'out' / '.lock')}$"):
        with lock_folder(tmp_path / "out", "out_dir"):
            pass
    with pytest.raises(UserError, match=f"^{expected.format(tmp_path / 'a.bin')}$"):
        atomic_write_set([(tmp_path / "a.bin", write_text("a"))])


def test_a_path_in_the_way_is_one_line_naming_it(tmp_path):
    notes, folder = tmp_path / "notes.txt", tmp_path / "ckpt.pt"
    notes.write_text("x")
    folder.mkdir()
    with pytest.raises(UserError, match=f"^out_dir {notes / 'run'} cannot be created: {notes} is a file, not a folder$"):
        with lock_folder(notes / "run", "out_dir"):
            pass
    with pytest.raises(UserError, match=f"^cannot write {notes / 'a' / 'b'}: {notes} is a file, not a folder$"):
        with writing(notes / "a" / "b"), open(notes / "a" / "b", "w"):
            pass
    with pytest.raises(UserError, match=f"^cannot create the folder {notes}: a file of that name is in the way$"):
        with writing(notes):
            os.makedirs(notes, exist_ok=True)
    with pytest.raises(UserError, match=f"^cannot write {folder}: it is a folder; move it out of the way$"):
        atomic_write_set([(folder, write_text("x"))])
    with pytest.raises(UserError, match=f"^{folder} is a folder, where a file is to be written: move it out of the way$"):
        refuse_folders(notes, folder)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "notes.txt"] and os.listdir(folder) == []


def in_the_way(tmp_path):
    """A token corpus, an audio folder and a file, for commands to meet paths in their way."""
    write_token_corpus(tmp_path / "tokens", file_frames=[100], val_file_frames=[100])
    os.makedirs(tmp_path / "wavs")
    sf.write(tmp_path / "wavs" / "a.wav", np.sin(np.arange(24000) / 10), 24000)
    (tmp_path / "notes.txt").write_text("x")


@pytest.mark.parametrize("script, args, make, expected", [
    ("train.py", ["--out_dir={t}/notes.txt/run"], None,
     "out_dir {t}/notes.txt/run cannot be created: {t}/notes.txt is a file, not a folder"),
    ("train.py", ["--out_dir={t}/out"], "out/log.jsonl",
     "{t}/out/log.jsonl is a folder, where a file is to be written: move it out of the way"),
    ("train.py", ["--out_dir={t}/out", "--init_from=resume"], "out/ckpt.pt",
     "{t}/out/ckpt.pt is a folder, where a file is to be written: move it out of the way"),
    ("prepare.py", ["--data_dir={t}/notes.txt/tokens"], None,
     "data_dir {t}/notes.txt/tokens cannot be created: {t}/notes.txt is a file, not a folder"),
    ("prepare.py", ["--data_dir={t}/new"], "new/train.bin",
     "{t}/new/train.bin is a folder, where a file is to be written: move it out of the way"),
    ("prepare.py", ["--data_dir={t}/new"], "new/cache=file",
     "cannot create the folder {t}/new/cache: a file of that name is in the way"),
])
def test_a_command_meeting_a_path_in_its_way_is_one_line(tmp_path, script, args, make, expected):
    in_the_way(tmp_path)
    if make:   # a folder where the command writes a file, or (=file) a file where it makes a folder
        path = tmp_path / make.removesuffix("=file")
        os.makedirs(path.parent, exist_ok=True)
        path.write_text("x") if make.endswith("=file") else path.mkdir()
    args = [a.format(t=tmp_path) for a in args]
    common = ([f"--data_dir={tmp_path / 'tokens'}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
               "--batch_size=2", "--max_iters=2", "--compile=False", "--device=cpu"] if script == "train.py" else
              [f"--input_dir={tmp_path / 'wavs'}", "--codec=untrained"])
    result = subprocess.run([sys.executable, script, *common, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stderr.splitlines()[-1:]) == (2, ["error: " + expected.format(t=tmp_path)]), \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_run_cli_makes_a_full_disk_one_line_and_keeps_bugs_as_tracebacks(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/log.jsonl")
    with pytest.raises(SystemExit) as e:
        run_cli(full)
    assert e.value.code == 2 and capsys.readouterr().err == "error: no space left on /data/out\n"

    def bug(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")
    with pytest.raises(FileNotFoundError):   # a real bug: traceback, exit code 1
        run_cli(bug)


def process_alive(pid):
    """True while process `pid` exists and is not a zombie (an orphan's zombie may never be reaped
    in a container, yet it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_torchrun_that_times_out_leaves_no_worker_running(tmp_path):
    """The tests' torchrun helper (conftest.run_torchrun) stops the workers with torchrun when it times out."""
    (tmp_path / "worker.py").write_text(
        "import os, time\n"
        f"open(os.path.join({str(tmp_path)!r}, 'pid' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_torchrun(["--nproc_per_node=2", str(tmp_path / "worker.py")], timeout=20)
    assert (tmp_path / "pid0").exists() and (tmp_path / "pid1").exists(), "the workers did not start within 20 s"
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in pids)


@pytest.mark.parametrize("script", ["prepare.py", "train.py", "sample.py", "bench.py"])
def test_a_torchaudio_that_does_not_load_is_one_line_naming_versions_and_the_fix(tmp_path, script):
    # a torchaudio built for another torch fails at import with an OSError from its .so
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = [script, "sample"] if script == "bench.py" else [script]
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: torch, torchaudio and encodec do not load together")
    assert f"torch {importlib.metadata.version('torch')}" in lines[0]
    assert "undefined symbol" in lines[0] and "make install" in lines[0]
