"""
Small helpers every command shares: user errors, the command-line runner, safe writes (atomic,
one line on a full disk), the one-run-per-folder lock, and OpenMP's waiting policy.
"""
import contextlib
import errno
import fcntl
import importlib.metadata
import os
import re
import secrets
import shutil
import stat
import sys


def require_dependencies():
    """Import torch, torchaudio and encodec (which imports torchaudio) once, before a command does:
    when they cannot be loaded together (a torchaudio built for another torch, installed by hand or
    left in an old venv), end with one line naming the versions found and the fix, exit code 2,
    instead of a long traceback from deep inside an import."""
    try:
        import torch, torchaudio, encodec  # noqa: F401
    except Exception as e:  # an OSError (undefined symbol), an ImportError, a RuntimeError...
        found = []
        for package in ("torch", "torchaudio", "encodec"):
            try:
                found.append(f"{package} {importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                found.append(f"{package} not installed")
        reason = " ".join(str(e).split())[:200]
        print(f"error: torch, torchaudio and encodec do not load together ({', '.join(found)}; "
              f"{type(e).__name__}: {reason}): run `make install` (a fresh .venv with the pinned versions "
              f"of requirements.lock), or `rm -rf .venv && make install` for an old one", file=sys.stderr)
        sys.exit(2)


class UserError(Exception):
    """A mistake the user can fix: printed as one clear line, never a traceback."""


def run_cli(main):
    """Run a command's main(argv); a UserError ends it with one line on stderr and exit 2. So does a
    full disk or read-only file system met anywhere; any other exception is a bug and keeps its
    traceback (exit 1)."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        error = write_error(e, e.filename) if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def write_error(e, path):
    """The one line for an OSError met while writing `path`, or None when it is not the user's to fix."""
    where = os.path.dirname(os.path.abspath(path)) if path else "the device"
    if e.errno == errno.ENOSPC:
        return UserError(f"no space left on {where}")
    if e.errno == errno.EDQUOT:
        return UserError(f"disk quota exceeded on {where}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: permission denied")
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {path}: read-only file system")
    if e.errno == errno.ENOTDIR and (blocker := file_in_the_way(path)):
        return UserError(f"cannot write {path}: {blocker} is a file, not a folder")
    if e.errno == errno.EISDIR:
        return UserError(f"cannot write {path}: it is a folder; move it out of the way")
    if e.errno == errno.EEXIST and os.path.lexists(path) and not os.path.isdir(path):  # making a folder
        return UserError(f"cannot create the folder {path}: a file of that name is in the way")
    if e.errno == errno.EFBIG:
        return UserError(f"cannot write {path}: file too large for its file system (or for `ulimit -f`)")
    return None


def file_in_the_way(path):
    """The nearest of path's parent folders that exists and is not a folder (it blocks creating
    path: out_dir=notes.txt/run), or None."""
    parent = os.path.dirname(os.path.normpath(path))
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent if parent and not os.path.isdir(parent) else None


def refuse_folders(*paths):
    """Refuse, before any work, a folder where a command writes a file: it would fail only once it
    writes there, at the end of a long run."""
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, where a file is to be written: move it out of the way")


@contextlib.contextmanager
def writing(path):
    """Around code that writes `path`: a full disk or a missing permission becomes one line."""
    try:
        yield
    except OSError as e:
        error = write_error(e, path)
        if error is None:
            raise
        raise error from e


class KeepWriteError:
    """A file object for a library that hides a failed write's OSError (a full disk) behind an error
    of its own: torch.save raises RuntimeError("unexpected pos ..."). The first OSError is kept in
    `error`, for the caller to raise instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def temp_path(path):
    """A temporary name next to path, unique to this process and call (name.tmp-PID-random), so
    that two writers never share one; remove_stale_temporaries() recognises it."""
    return f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


TEMPORARY = re.compile(r"\.tmp-\d+-[0-9a-f]+$")


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: an interrupted run never leaves a truncated
    file where a good one stood."""
    atomic_write_set([(path, write)])


def atomic_write_bytes(path, data):
    """atomic_write of bytes made in memory, written with Python's own file I/O (so that a full
    disk is an OSError that says so, not a library's "System error")."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_set(outputs):
    """Write files that belong together: each (path, write) pair's write(tmp) fills a temporary
    file next to path, and only once all of them are complete are they renamed onto their paths,
    in the order given. A failed or interrupted run leaves the old files as they were. A crash
    between two renames leaves a mix of old and new: put last the file that describes the others,
    and let it say which files it describes (meta.json does, see data.py)."""
    temps = []
    try:
        for path, write in outputs:
            temps.append(temp_path(str(path)))
            with writing(path):
                write(temps[-1])
        for (path, _), tmp in zip(outputs, temps):
            with writing(path):
                os.replace(tmp, path)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path):
    """A new folder that appears at `path` complete or not at all: the `with` block fills the
    temporary folder it is given, which is renamed to path once the block ends without an error, and
    removed otherwise (a killed run's is removed by the next remove_stale_temporaries)."""
    tmp = temp_path(path)
    with writing(tmp):
        os.mkdir(tmp)
    try:
        yield tmp
        with writing(path):
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def lock_folder(folder, setting):
    """Hold folder's lock (folder/.lock, created with the folder if needed) for the duration of the
    `with`, so that two runs never write the same files; `setting` names the folder's setting for
    the message. The lock is an exclusive flock: the OS releases it when its process ends, however
    it ends, so a killed run leaves no stale lock. The holder's pid is written into the file for
    the second run's message. Taking the lock also removes the temporary files that killed runs
    left in the folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{setting} {folder} is not a folder")
    if blocker := file_in_the_way(folder):
        raise UserError(f"{setting} {folder} cannot be created: {blocker} is a file, not a folder")
    path = os.path.join(folder, ".lock")
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        f = open(path, "a+")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(f"{setting} {folder} is in use by another run (pid {holder}): wait for it to "
                            f"end, or use another {setting}")
        with writing(path):
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
        remove_stale_temporaries(folder)
        yield


def remove_stale_temporaries(folder):
    """Remove the temporary files and folders (name.tmp-PID-...) that killed runs left in folder (not
    in its other subfolders). Call it holding the folder's lock: every writer there holds that lock,
    so each temporary found is older than the lock, left by a run that has ended."""
    for entry in os.scandir(folder):
        if TEMPORARY.search(entry.name):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    os.remove(entry.path)


def not_a_file(mode):
    """What a non-regular file is ("a named pipe", ...), from its os.stat mode; None for a file."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return None if stat.S_ISREG(mode) else next((name for test, name in kinds if test(mode)), "not a file")


def passive_openmp():
    """Make torch's OpenMP threads sleep when idle instead of busy-waiting.

    By default OpenMP threads spin for a while after each op, so that the next op starts without
    a wake-up delay. That is right for generation (sample.py, bench.py sample): a decode step is
    hundreds of tiny ops, and sleeping threads make a 2-thread step ~3x slower on a quiet machine.
    It is wrong when something else needs the cores: prepare.py's loader thread, or the test suite
    on shared CI runners and parallel jobs, where the spinning threads slow everything down
    several-fold. So prepare.py and tests/conftest.py call this and the others keep the default.
    OpenMP reads the setting once, when torch loads it: call this before torch is imported. An
    OMP_WAIT_POLICY already set by the user wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
