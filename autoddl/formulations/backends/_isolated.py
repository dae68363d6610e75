"""Native solvers in a worker process: a crash there is an ERROR result, not a dead planner.

OR-Tools' solvers (MPSolver's CBC, SCIP and HiGHS, CP-SAT) are C++ libraries called in one long
native call; a segmentation fault or an abort inside one (one was seen in CBC's ``Solve``) would
take the whole ``autoddl`` command down with it. :class:`IsolatedBackend` runs such a backend's
``solve`` in a worker process instead: the MILP (numpy arrays) goes there pickled, the normalized
:class:`~autoddl.formulations.milp.SolveResult` comes back pickled. When the worker dies (any
signal, any exit) the result has status ERROR, ``extra["crashed"] = True`` and a message naming
the signal ("killed by SIGSEGV (Segmentation fault)"); the next solve starts a new worker. What the
caller does with a crash is :func:`autoddl.formulations.backends.solve_or_fall_back`'s policy.

**Process model.** The worker is a fresh interpreter (spawned, never a fork of the planner,
which holds torch's threads and, while it screens, a pool of forked processes) running
:func:`_main`, talking pickle over its stdin and stdout pipes. Not ``multiprocessing``'s spawn or
forkserver children: those re-import the planner's ``__main__`` in the child, which re-runs a
user's script that lacks a ``__main__`` guard and costs a script that imports torch 1.5 s. One
worker serves every solve of the planning process and imports OR-Tools once: starting it took
0.4-1.0 s here (interpreter, numpy, OR-Tools), paid only when an OR-Tools solve is first needed
and again after a crash. Each solve then costs pickling the model and the result both ways;
measured here (2-core box, warm worker, ``ortools-cbc``, medians of 20-50 solves): 2.4 ms more
than in-process on a 29-column model (14.6 against 12.2 ms), 2.8 ms on a 21,838-column GPT
sharding MILP (806 against 804 ms; pickling its model and result alone takes 1.9 ms). The worker
sends native output to /dev/null (its fd 1: solver banners, CBC's cut statistics) and ignores
SIGINT; Ctrl-C or SIGTERM in the planner kills it. It exits when the planner's end of the pipe
closes, so a planner leaving by ``os._exit`` leaves no process behind.

A solve with a time limit that the worker overruns by far (``2 x limit + 30 s``) is killed and
reported like a crash. Exceptions the backend raises in the worker (a :class:`UserError` for a
model CP-SAT cannot take) are raised again in the planner.

**Fault injection** (tests): with ``AUTODDL_FAULT_SOLVER=segv`` (or ``abort``, ``kill``) in the
planner's environment, the worker kills itself with that signal before solving. The variable is
read in the planner at every solve and sent with the model, so it also takes effect on a worker
started before it was set.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from autoddl.formulations.backends._common import Backend, finish, trivial_result
from autoddl.formulations.milp import MILP, SolveResult, SolveStatus

#: environment variable that makes the worker kill itself before solving (tests)
FAULT_ENV = "AUTODDL_FAULT_SOLVER"
_FAULTS = {"segv": signal.SIGSEGV, "abort": signal.SIGABRT, "kill": signal.SIGKILL}


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, in words: "was killed by SIGSEGV (Segmentation fault)", "exited
    with code 3"."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
            return f"was killed by {sig.name} ({signal.strsignal(sig) or 'signal'})"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def serve(inbox: BinaryIO, outbox: BinaryIO) -> None:
    """The worker's loop: solve each (backend, milp, limit, gap, fault) read from ``inbox``,
    write ("ok", result) or ("raise", exception, traceback) to ``outbox``; return at EOF."""
    while True:
        try:
            backend, milp, time_limit_s, mip_rel_gap, fault = pickle.load(inbox)
        except (EOFError, OSError):
            return
        if fault:
            os.kill(os.getpid(), _FAULTS[fault])
        try:
            reply: tuple = ("ok", backend.solve(milp, time_limit_s, mip_rel_gap))
        except BaseException as exc:  # noqa: BLE001 - sent back and raised in the planner
            reply = ("raise", exc, traceback.format_exc())
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - an unpicklable exception: send its text
            data = pickle.dumps(("raise", RuntimeError(reply[-1]), reply[-1]))
        outbox.write(data)
        outbox.flush()


def _main() -> None:
    """Entry point of the worker process: protocol on stdin/stdout, native output muted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the planner stops us; Ctrl-C is its to handle
    outbox = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # native banners and cut statistics go nowhere
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process' whole life
    serve(sys.stdin.buffer, outbox)


class _Worker:
    """The one solver worker of this process, started on first use and after every crash."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.owner = 0  # the pid that started it: a forked copy of this object starts its own
        self.lock = threading.Lock()

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[3])  # the folder holding ``autoddl``
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from autoddl.formulations.backends._isolated import _main; "
             "_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.owner = os.getpid()

    def stop(self) -> int | None:
        """Kill the worker (if running) and return its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return code

    def call(self, backend: Backend, milp: MILP, time_limit_s: float | None,
             mip_rel_gap: float) -> tuple[str, Any]:
        """("ok", result), ("raise", exception) or ("died", how it ended)."""
        with self.lock:
            if self.proc is None or self.owner != os.getpid() or self.proc.poll() is not None:
                if self.owner == os.getpid():
                    self.stop()
                self.proc = None
                self._start()
            fault = os.environ.get(FAULT_ENV, "").strip().lower()
            fault = fault if fault in _FAULTS else ""
            patience = None if time_limit_s is None else 2 * time_limit_s + 30.0
            try:
                proc = self.proc
                proc.stdin.write(pickle.dumps((backend, milp, time_limit_s, mip_rel_gap, fault),
                                              protocol=pickle.HIGHEST_PROTOCOL))
                proc.stdin.flush()
                reply = self._receive(patience)
            except (EOFError, OSError, pickle.UnpicklingError):
                return "died", describe_exit(self.stop())
            except BaseException:
                self.stop()  # Ctrl-C, SIGTERM: leave no worker behind
                raise
            if reply is None:
                self.stop()
                return "died", f"overran its time limit of {time_limit_s:g} s and was killed"
            return reply[0], reply[1]

    def _receive(self, patience_s: float | None) -> tuple | None:
        """The worker's reply; None if none began within ``patience_s``; EOFError if the
        worker died first."""
        start = time.monotonic()
        out = self.proc.stdout
        while not select.select([out], [], [], 1.0)[0]:
            if patience_s is not None and time.monotonic() - start > patience_s:
                return None
        return pickle.load(out)


_WORKER = _Worker()


def stop_worker() -> None:
    """Stop this process' solver worker, if one runs (the next solve starts another)."""
    _WORKER.stop()


class IsolatedBackend(Backend):
    """``inner``'s solver, run in the solver worker process (module docstring)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.package = inner.package

    def available(self) -> bool:
        """Whether ``inner`` is available (checked in this process)."""
        return self.inner.available()

    def solve(self, milp: MILP, time_limit_s: float | None, mip_rel_gap: float) -> SolveResult:
        """Solve in the worker; a worker that dies gives status ERROR with ``extra["crashed"]``.
        ``time_s`` is the wall time seen here, transfers included."""
        t0 = time.perf_counter()
        if milp.num_cols == 0:
            return trivial_result(self.name, milp, t0)
        kind, got = _WORKER.call(self.inner, milp, time_limit_s, mip_rel_gap)
        if kind == "raise":
            raise got
        if kind == "died":
            return finish(self.name, milp, SolveStatus.ERROR, None, None, t0,
                          f"{self.name}: its solver process {got}", {"crashed": True})
        return SolveResult(got.backend, got.status, got.x, got.objective, got.bound, got.gap,
                           time.perf_counter() - t0, got.message, got.extra)

