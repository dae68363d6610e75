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


def run_rank(command: str, body: Callable[[], int]) -> int:
    """Run one rank's ``body``: a :class:`UserError` prints ``COMMAND: error: ...`` (exit 2);
    any other exception prints its traceback and ``COMMAND: rank R: ...`` (exit 1), the lines
    the launcher turns into its report."""
    try:
        return body()
    except UserError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # a fault: name the rank, keep the traceback for the log
        traceback.print_exc()
        rank = os.environ.get("RANK", "?")
        print(f"{command}: rank {rank}: {type(exc).__name__}: {exc}".splitlines()[0],
              file=sys.stderr, flush=True)
        return 1


def exit_rank(code: int) -> None:
    """End the rank process with ``code`` without interpreter teardown: process groups die with
    the process (a peer tearing gloo down first made it abort other ranks at times)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
