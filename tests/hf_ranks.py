"""Rank program of ``tests/test_hf_zoo.py``: ``autoddl run PLAN --check`` (one step) for each
plan file in ``argv``, in one torchrun launch (a launch per family would cost ~8 s each).

Each plan runs through :func:`autoddl.runtime.worker.run`, as ``autoddl run`` runs it, in the
one process group; before each, rank 0 prints ``=== PLAN``, after it ``=== exit CODE`` (0:
checked and passed).
"""

from __future__ import annotations

import os
import sys

import torch

from autoddl.engine.plan import load_plan
from autoddl.runtime import worker
from autoddl.runtime.rank import exit_rank, run_rank


def main() -> int:
    """Run every plan checked; the worst exit code."""
    worst = 0
    rank0 = os.environ.get("RANK", "0") == "0"  # (before the process group exists)
    for path in sys.argv[1:]:
        if rank0:
            print(f"=== {path}", flush=True)
        torch.manual_seed(0)
        code = worker.run(load_plan(path), steps=1, check=True, lr=None, tol=None)
        if rank0:
            print(f"=== exit {code}", flush=True)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    exit_rank(run_rank("hf_ranks", main))
