"""Training state saved and resumed by ``autoddl run --save DIR`` / ``--resume DIR``.

Plain per-rank state dicts: each rank writes ``DIR/rank<R>.pt`` (``torch.save``) after every step,
atomically (a temporary file, then a rename), holding the steps completed, its local shards of
the parameters, its optimizer state (DTensor states as local shards) and, under ``--check``, the
single-process reference model and optimizer. A job that fails restarts with ``--resume DIR``
from the last step every rank saved; the plan's graph hash and device mesh must match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from autoddl.engine.plan import Plan
from autoddl.errors import UserError
from autoddl.files import write_atomic


def rank_file(folder: str | os.PathLike, rank: int) -> Path:
    """The file of ``rank`` in checkpoint ``folder``."""
    return Path(folder) / f"rank{rank}.pt"


def _fingerprint(plan: Plan) -> dict[str, Any]:
    """What a checkpoint must share with the plan that resumes it."""
    return {"graph_hash": plan.model.get("graph_hash"), "mesh": list(plan.device_mesh_shape),
            "names": list(plan.device_mesh_names)}


def _local(value: Any) -> Any:
    """``value`` with every DTensor replaced by its local shard (recursively)."""
    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def save(folder: str | os.PathLike, rank: int, step: int, plan: Plan,
         params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
         reference: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> None:
    """Write this rank's state after ``step`` steps, atomically."""
    state: dict[str, Any] = {
        "step": step, "plan": _fingerprint(plan),
        "params": {k: _local(p.detach()) for k, p in params.items()},
        "optimizer": _local(opt.state_dict()),
    }
    if reference is not None:
        state["reference"] = {"model": reference[0].state_dict(),
                              "optimizer": reference[1].state_dict()}
    write_atomic(rank_file(folder, rank), lambda tmp: torch.save(state, tmp))


def load(folder: str | os.PathLike, rank: int, plan: Plan, params: dict[str, torch.Tensor],
         opt: torch.optim.Optimizer,
         reference: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> int:
    """Restore this rank's state from ``folder``; returns the steps it had completed."""
    path = rank_file(folder, rank)
    if not path.is_file():
        raise UserError(f"--resume: {str(path)!r} not found; resume from a folder written by "
                        "`autoddl run --save` with the same plan")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("plan") != _fingerprint(plan):
        raise UserError(f"--resume: {str(folder)!r} was saved for another plan (graph or mesh "
                        "differs); resume with the plan that saved it")
    if reference is not None and "reference" not in state:
        raise UserError(f"--resume: {str(folder)!r} was saved without --check; resume without "
                        "--check or save with it")
    with torch.no_grad():
        for k, p in params.items():
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(state["params"][k].to(local.device))
    ordered = [p for group in opt.param_groups for p in group["params"]]
    saved = state["optimizer"]
    for idx, st in saved["state"].items():
        p = ordered[int(idx)]
        for key, v in list(st.items()):
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == \
                    p.to_local().shape and key != "step":
                st[key] = DTensor.from_local(v.to(p.to_local().device), p.device_mesh,
                                             p.placements, run_check=False,
                                             shape=p.shape, stride=p.stride())
    opt.load_state_dict(saved)
    if reference is not None:
        reference[0].load_state_dict(state["reference"]["model"])
        reference[1].load_state_dict(state["reference"]["optimizer"])
    return int(state["step"])
