"""What every rank process of a torchrun job shares: its device and backend, the collective
timeout, and how it ends (user errors as one line with exit code 2, faults naming the rank)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING, Callable

from autoddl.errors import UserError

if TYPE_CHECKING:  # torch is imported by the rank's own code: the command line starts without it
    import torch


def pick_device() -> tuple[str, torch.device]:
    """(backend, device) for this rank: NCCL on its own GPU when there is one GPU per local
    rank, else gloo on CPU. ``AUTODDL_DEVICE=cpu`` forces the CPU path."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    forced_cpu = os.environ.get("AUTODDL_DEVICE", "") == "cpu"
    if not forced_cpu and torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        torch.cuda.set_device(local)
        return "nccl", torch.device("cuda", local)
    return "gloo", torch.device("cpu")


def group_timeout_s() -> float:
    """Seconds a collective may wait for its peers (``AUTODDL_TIMEOUT_S``, default 300)."""
    return float(os.environ.get("AUTODDL_TIMEOUT_S", "300"))


#: the launcher's folder for this job (:func:`report`); set by ``launch.run_ranks``
JOB_DIR_ENV = "AUTODDL_JOB_DIR"


def report(kind: str, text: str = "") -> None:
    """Tell the launcher how this rank ended, in a file of its own (``<kind>-<rank>`` in the
    job folder, written whole): ``done`` after the rank's work, ``error`` with a user error's
    one line. Rank output on a shared stderr interleaves; these files do not. Without a
    launcher (plain torchrun) nothing is written."""
    folder = os.environ.get(JOB_DIR_ENV)
    if not folder:
        return
    from autoddl.files import write_text_atomic

    write_text_atomic(os.path.join(folder, f"{kind}-{os.environ.get('RANK', '0')}"), text)


def die_with_parent(signum: int = 9) -> None:
    """Have the kernel send ``signum`` (default SIGKILL) to this process when the process that
    started it dies, so no rank outlives torchrun and no torchrun its ``autoddl`` (Linux
    ``PR_SET_PDEATHSIG``; a no-op elsewhere)."""
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signum), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def run_rank(command: str, body: Callable[[], int]) -> int:
    """Run one rank's ``body``: a :class:`UserError` prints ``COMMAND: error: ...`` (exit 2);
    any other exception prints its traceback and ``COMMAND: rank R: ...`` (exit 1), the lines
    the launcher turns into its report; :func:`report` tells the launcher which it was. A
    ``SystemExit`` raised by user code (a model file calling ``sys.exit``) is a user error."""
    die_with_parent()
    try:
        code = body()
    except UserError as exc:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report("error", line)
        print(f"{command}: error: {line}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as exc:
        line = (f"the model's code called sys.exit({exc.code!r}) while the rank ran; "
                "remove the call from the model file")
        report("error", line)
        print(f"{command}: error: {line}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # a fault: name the rank, keep the traceback for the log
        traceback.print_exc()
        rank = os.environ.get("RANK", "?")
        print(f"{command}: rank {rank}: {type(exc).__name__}: {exc}".splitlines()[0],
              file=sys.stderr, flush=True)
        return 1
    report("done")
    return code


def exit_rank(code: int) -> None:
    """End the rank process with ``code`` without interpreter teardown: process groups die with
    the process (a peer tearing gloo down first made it abort other ranks at times)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
