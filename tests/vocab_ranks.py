"""Rank program of ``tests/test_vocab_parallel.py`` (4 gloo ranks, run by torchrun).

Runs :func:`~autoddl.runtime.vocab_loss.vocab_parallel_cross_entropy` on this rank's vocabulary
columns of seeded logits and compares the loss and the logits' gradient with ``F.cross_entropy``
of the whole logits on one process: over the whole world (4 ranks) and over each axis group of a
2×2 DeviceMesh, mean and sum, with targets that include ignored rows (-100) and logits offset by
1e4 (where an unshifted sum of exponentials overflows). The collectives are logged by the
runtime's :class:`~autoddl.runtime.commlog.CollectiveRecorder` under the mesh axis. Writes the
worst errors over all ranks and rank 0's log as JSON to the path in argv[1].
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from autoddl.runtime.commlog import CollectiveRecorder, CommLog
from autoddl.runtime.vocab_loss import vocab_parallel_cross_entropy

ROWS, VOCAB = 12, 32


def _case(group, rank_in_group: int, size: int, reduction: str, offset: float, seed: int,
          log: CommLog | None = None, groups: dict | None = None) -> tuple[float, float]:
    """(relative error of the loss, max relative error of the gradient) on this rank."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(ROWS, VOCAB, generator=gen) * 3 + offset
    target = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    target[::5] = -100  # ignored rows
    ref_in = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in, target, reduction=reduction)
    ref.backward()
    cols = VOCAB // size
    local = full[:, rank_in_group * cols:(rank_in_group + 1) * cols].clone().requires_grad_(True)
    if log is not None:
        with CollectiveRecorder(log, groups or {}):
            loss = vocab_parallel_cross_entropy(local, target, group, rank_in_group * cols,
                                                reduction)
    else:
        loss = vocab_parallel_cross_entropy(local, target, group, rank_in_group * cols, reduction)
    loss.backward()
    want = ref_in.grad[:, rank_in_group * cols:(rank_in_group + 1) * cols]
    got, want_loss = float(loss.detach()), float(ref.detach())
    loss_err = abs(got - want_loss) / max(abs(want_loss), 1e-12)
    grad_err = float((local.grad - want).abs().max() / want.abs().max())
    return loss_err, grad_err


def main() -> None:
    """Run the cases, gather the worst errors, write them (rank 0)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    worst = torch.zeros(2)
    cases = 0
    for reduction in ("mean", "sum"):
        for offset in (0.0, 1e4):
            errs = _case(None, rank, 4, reduction, offset, seed=cases)
            worst = torch.maximum(worst, torch.tensor(errs))
            cases += 1
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("x", "y"))
    groups = {mesh.get_group(a).group_name: (name, 2) for a, name in enumerate(("x", "y"))}
    logs = {}
    for axis, name in enumerate(("x", "y")):
        log = CommLog()
        errs = _case(mesh.get_group(axis), mesh.get_local_rank(axis), 2, "mean", 0.0,
                     seed=10 + axis, log=log, groups=groups)
        worst = torch.maximum(worst, torch.tensor(errs))
        logs[name] = {f"{d}/{a}/{k}": v for (d, a, k), v in log.entries.items()}
        cases += 1
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"loss_err": float(worst[0]), "grad_err": float(worst[1]),
                       "cases": cases, "logs": logs, "rows": ROWS}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
