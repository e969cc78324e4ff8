"""``python -m tl_lightning ARGS`` as a real child process that skips the ~6 s of imports.

A fresh interpreter spends about 6 s of CPU importing torch, torchvision, lightning and timm before it reads its
arguments, and the fault tests start dozens of runs (stops, resumes, uninterrupted references). ``launch`` forks
each run from one server process per pytest worker that has done those imports once (multiprocessing's
``forkserver``, preloaded with ``tl_lightning.cli``). Each run is still its own process: its own pid, arguments,
working directory, environment, ``sys.path``, stdout and stderr, exit status, and real signals. Only the import is
shared: the tests of start-up itself (console noise), the other DDP ranks (which DDP starts with the same command
line), SLURM jobs and sweep trials still start ``python -m tl_lightning`` from scratch.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import weakref
from pathlib import Path

from .cli import REPO

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["tl_lightning.cli"])
# entries a pytest worker adds to sys.path that ``python -m tl_lightning`` run from ``cwd`` would not have
_PYTEST_PATHS = {"", str(REPO), str(REPO / "tests")}


def _exit_code(err: SystemExit) -> int:
    if err.code is None or isinstance(err.code, int):
        return err.code or 0
    print(err.code, file=sys.stderr)
    return 1


def _run(args: list[str], cwd: str, env: dict, out_path: str, err_path: str, base_path: list[str],
         new_session: bool) -> None:
    """In the forked child: become ``python -m tl_lightning ARGS`` started in ``cwd`` with ``env``, then exit."""
    if new_session:
        os.setsid()
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [cwd, *extra, *base_path]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch

    if env.get("OMP_NUM_THREADS"):  # read at import by a fresh interpreter; the server imported torch earlier
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    import __main__
    from importlib.util import find_spec

    from tl_lightning.cli import main

    # what ``python -m tl_lightning`` sets, and what DDP reads to start the other ranks with the same command line
    __main__.__spec__ = find_spec("tl_lightning.__main__")
    sys.argv = [__main__.__spec__.origin, *args]
    code = 0
    try:
        main()
    except SystemExit as err:
        code = _exit_code(err)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what interpreter shutdown does (W&B finishes its run there)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Launched:
    """The part of ``subprocess.Popen`` the tests use (``pid``, ``poll``, ``wait``, ``send_signal``, ``kill``,
    ``communicate``, ``returncode``), for a run started by ``launch``; output is read when the run has ended."""

    def __init__(self, args, cwd, env, new_session=False):
        self._dir, self._output = tempfile.mkdtemp(prefix="tl-launch-"), None
        # removed once the output is read, or when this object goes (a run whose output no test reads)
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        self._out, self._err = os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr")
        base = [p for p in sys.path if p not in _PYTEST_PATHS]
        self._process = _CONTEXT.Process(target=_run, args=([str(a) for a in args], str(cwd), dict(env), self._out,
                                                             self._err, base, new_session))
        self._process.start()
        self.pid = self._process.pid
        self.args = ["python", "-m", "tl_lightning", *map(str, args)]

    @property
    def returncode(self):
        return self._process.exitcode

    def poll(self):
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def output(self) -> tuple[str, str]:
        """The run's stdout and stderr (read once the run has ended; its temporary folder is then removed)."""
        if self._output is None:
            self._output = tuple(Path(p).read_text(errors="replace") for p in (self._out, self._err))
            self._remove_dir()
        return self._output

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self.output()


def launch(*args, cwd=REPO, env: dict | None = None, unset=(), new_session: bool = False) -> Launched:
    """Start ``python -m tl_lightning ARGS`` (forked from the preloaded server) and return at once: in ``cwd``, with
    this process's environment plus ``env`` less ``unset``, in a session of its own if ``new_session``."""
    full_env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k not in unset}
    return Launched(args, cwd, full_env, new_session)


def run_launched(*args, cwd=REPO, timeout: float = 600, env: dict | None = None, unset=()) -> \
        subprocess.CompletedProcess:
    """``launch`` and wait: a ``CompletedProcess`` with the exit status and the captured stdout and stderr."""
    proc = launch(*args, cwd=cwd, env=env, unset=unset)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
