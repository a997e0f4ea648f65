"""
Small helpers every command shares: user errors, the command-line runner, atomic writes, and
OpenMP's waiting policy.
"""
import os
import sys


class UserError(Exception):
    """A mistake the user can fix: printed as one clear line, never a traceback."""


def run_cli(main):
    """Run a command's main(argv); a UserError ends it with one line on stderr and exit 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
