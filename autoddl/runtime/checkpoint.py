"""Training state saved and resumed by ``autoddl run --save DIR`` / ``--resume DIR``.

Step-atomic checkpoints in PyTorch's distributed checkpoint format (DCP,
:mod:`torch.distributed.checkpoint`). After step N (N steps done) every rank saves its part into
``DIR/.step-N.partial``: the parameters as DTensors (DCP records their sharding and writes each
shard once), the optimizer state by parameter name (DTensors alike), and under ``--check`` the
single-process reference model and optimizer (plain tensors). When DCP's save has returned on
every rank (its coordinator writes ``.metadata`` last), rank 0 writes ``autoddl.json`` (step,
lr, model graph hash, optimizer, mesh and placements) into it, renames it to ``DIR/step-N``
(one atomic rename), points ``DIR/latest.json`` at it (atomically) and only then deletes older
steps and leftover partial folders; a barrier keeps the ranks together. A kill at any moment
leaves the last complete step in place.

``--resume DIR`` loads the newest complete step (the folder ``latest.json`` names; without one,
the highest-numbered ``step-N`` holding ``.metadata`` and ``autoddl.json``); partial folders are
ignored (and removed by the next save). The model (graph hash) and the optimizer must be those
of the resuming plan; the mesh and placements may differ: DCP reshards the state to this plan.

This module imports torch only where it saves or loads: the launcher checks a folder without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoddl.engine.plan import Plan
from autoddl.errors import UserError
from autoddl.files import write_text_atomic

if TYPE_CHECKING:
    import torch

#: the file naming the newest complete step of a checkpoint folder
MANIFEST = "latest.json"
#: autoddl's description of one step, inside its folder
INFO = "autoddl.json"
#: the file DCP's coordinator writes last: a step folder without it is incomplete
DCP_METADATA = ".metadata"
#: the learning rate of a run given no ``--lr`` that does not resume
DEFAULT_LR = 1e-3
_STEP = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.(step-\d+\.partial|trash-.*)$")


@dataclass(frozen=True)
class Saved:
    """A complete step of a checkpoint folder: its folder, steps done, and ``autoddl.json``."""

    path: Path
    step: int
    info: dict[str, Any]


def step_folder(folder: str | os.PathLike, step: int) -> Path:
    """The folder of the state after ``step`` steps in checkpoint folder ``folder``."""
    return Path(folder) / f"step-{step}"


def _complete(path: Path) -> dict[str, Any] | None:
    """``path``'s ``autoddl.json`` when it is a complete step folder, else None."""
    try:
        if not (path / DCP_METADATA).is_file():
            return None
        info = json.loads((path / INFO).read_text())
        return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None
    except (OSError, ValueError):
        return None


def _named_by_manifest(folder: Path) -> list[Path]:
    """The step folder ``latest.json`` names (none if it is missing or unreadable)."""
    try:
        name = json.loads((folder / MANIFEST).read_text()).get("latest", "")
    except (OSError, ValueError, AttributeError):
        return []
    return [folder / name] if isinstance(name, str) and _STEP.match(name) else []


def latest(folder: str | os.PathLike) -> Saved:
    """The newest complete step saved in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--resume: folder {str(folder)!r} not found; give a folder written by "
                        "`autoddl run --save`")
    steps = sorted((p for p in folder.iterdir() if _STEP.match(p.name)),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for path in _named_by_manifest(folder) + steps:
        info = _complete(path)
        if info is not None:
            return Saved(path, info["step"], info)
    if any(folder.glob("rank*.pt")):
        raise UserError(f"--resume: {str(folder)!r} holds per-rank files (rank*.pt) of an older "
                        "autoddl, which cannot be resumed; start a new run with --save")
    raise UserError(f"--resume: no checkpoint files (no complete step-<N> folder) found in "
                    f"{str(folder)!r}; give a folder written by `autoddl run --save`")


def _placements(plan: Plan) -> dict[str, dict[str, str]]:
    """Each parameter node's planned placement (by mesh axis)."""
    return {o.name: dict(o.out) for o in plan.ops if o.target == "param"}


def describe(plan: Plan, lr: float, check: bool) -> dict[str, Any]:
    """What ``autoddl.json`` records of the run that saves (the step aside)."""
    return {"graph_hash": plan.model.get("graph_hash"), "model": plan.model.get("spec"),
            "optimizer": plan.training.get("optimizer"), "lr": lr, "reference": check,
            "mesh": list(plan.device_mesh_shape), "mesh_names": list(plan.device_mesh_names),
            "placements": _placements(plan)}


def check_resumable(saved: Saved, plan: Plan, check: bool) -> None:
    """Raise a :class:`UserError` unless ``plan`` (with ``--check`` or not) can resume ``saved``:
    the same model graph and optimizer, and a reference model saved when checking."""
    where = str(saved.path)
    have, want = saved.info.get("graph_hash"), plan.model.get("graph_hash")
    if have != want:
        raise UserError(f"--resume: {where!r} was saved for another model (graph hash {have}, "
                        f"this plan's {want}); resume with a plan of the model that saved it")
    have, want = saved.info.get("optimizer"), plan.training.get("optimizer")
    if have != want:
        raise UserError(f"--resume: {where!r} was saved with optimizer {have!r}, but this plan "
                        f"trains with {want!r}; resume with a plan made with `autoddl plan "
                        f"--optimizer {have}`, or start a new run without --resume")
    if check and not saved.info.get("reference"):
        raise UserError(f"--resume: {where!r} was saved without --check; resume without "
                        "--check or save with it")


def pick_lr(saved: Saved | None, lr: float | None) -> tuple[float, str | None]:
    """The learning rate to train with (``lr``: ``--lr``, None if not given) and, when it
    differs from the saved one, a line saying so."""
    if saved is None:
        return (DEFAULT_LR if lr is None else lr), None
    was = float(saved.info["lr"])
    if lr is None or lr == was:
        return was, None
    return lr, f"lr changed from {was:g} to {lr:g} (--lr; the checkpoint was saved with {was:g})"


def resharded_note(saved: Saved, plan: Plan) -> str | None:
    """A line saying the state was saved under another mesh or placements, or None."""
    moved = [k for k, v in _placements(plan).items() if saved.info.get("placements", {}).get(k)
             != v]
    if saved.info.get("mesh") == list(plan.device_mesh_shape) and not moved:
        return None
    mesh = "x".join(map(str, saved.info.get("mesh", [])))
    return (f"the checkpoint was saved under another plan (mesh {mesh}, {len(moved)} "
            f"parameter(s) placed otherwise); its state was resharded to this plan")


def _state(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
           reference: tuple[torch.nn.Module, torch.optim.Optimizer] | None
           ) -> dict[str, torch.Tensor]:
    """The flat state dict DCP saves and loads in place: ``param/<name>``,
    ``optim/<name>/<state>``, and under ``--check`` ``ref/<name>``, ``ref_optim/<name>/<state>``."""
    import torch

    def opt_state(prefix: str, named: dict[str, torch.Tensor], o: torch.optim.Optimizer):
        return {f"{prefix}/{k}/{s}": v for k, p in named.items()
                for s, v in o.state.get(p, {}).items() if isinstance(v, torch.Tensor)}

    state = {f"param/{k}": p for k, p in params.items()}
    state.update(opt_state("optim", params, opt))
    if reference is not None:
        model, ref_opt = reference
        state.update({f"ref/{k}": v for k, v in model.state_dict().items()})
        state.update(opt_state("ref_optim", dict(model.named_parameters()), ref_opt))
    return state


def _init_states(opt: torch.optim.Optimizer, named: dict[str, torch.Tensor], prefix: str,
                 keys: set[str]) -> None:
    """Create ``opt``'s state for the parameters that have state under ``prefix`` in the saved
    ``keys`` (one step with zero gradients at lr 0), for DCP to load in place. The parameters
    this may touch are loaded afterwards."""
    import torch

    have = {k.split("/")[1] for k in keys if k.startswith(prefix + "/")}
    wanted = {id(p) for k, p in named.items() if k in have}
    if not wanted:
        return
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if id(p) in wanted else None
    opt.step()
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)


def load(saved: Saved, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
         reference: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> int:
    """Restore this rank's parameters, optimizer state and reference from ``saved``, resharded
    to their placements; returns the steps done. Collective: all ranks call it."""
    import torch
    import torch.distributed.checkpoint as dcp

    keys = set(dcp.FileSystemReader(saved.path).read_metadata().state_dict_metadata)
    _init_states(opt, params, "optim", keys)
    if reference is not None:
        _init_states(reference[1], dict(reference[0].named_parameters()), "ref_optim", keys)
    state = _state(params, opt, reference)
    missing = sorted(set(state) - keys)
    if missing:
        raise UserError(f"--resume: {str(saved.path)!r} lacks {missing[0]} (and "
                        f"{len(missing) - 1} more entries); resume with the model and optimizer "
                        "that saved it")
    with torch.no_grad():
        dcp.load(state, storage_reader=dcp.FileSystemReader(saved.path))
    return saved.step


def _fault_here(rank: int, step: int, where: str) -> bool:
    """Whether the test hook ``AUTODDL_FAULT_SAVE`` (``1`` or ``write``: once this rank's data
    is written, before ``.metadata``; ``commit``: rank 0, after DCP's save, before the rename)
    asks rank ``AUTODDL_FAULT_RANK`` to die while saving the state after step
    ``AUTODDL_FAULT_STEP`` (the folder ``step-<STEP+1>``)."""
    kind = {"1": "write"}.get(os.environ.get("AUTODDL_FAULT_SAVE", ""),
                              os.environ.get("AUTODDL_FAULT_SAVE", ""))
    return (kind == where and os.environ.get("AUTODDL_FAULT_RANK") == str(rank)
            and int(os.environ.get("AUTODDL_FAULT_STEP", "0")) == step - 1)


def faults_in_save() -> bool:
    """Whether the injected fault is moved into a save (``AUTODDL_FAULT_SAVE``)."""
    return bool(os.environ.get("AUTODDL_FAULT_SAVE"))


def die_now() -> None:
    """SIGKILL this process, its output flushed (the fault-injection test hooks)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _writer(path: Path, die: bool) -> Any:
    """DCP's file system writer into ``path``; ``die``: SIGKILL this rank once it wrote its data."""
    from torch.distributed.checkpoint import FileSystemWriter

    class _DyingWriter(FileSystemWriter):
        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            written = super().write_data(plan, planner)
            written.wait()
            die_now()
            return written

    return (_DyingWriter if die else FileSystemWriter)(path)


def _discard(path: Path) -> None:
    """Remove folder ``path``: first renamed out of the ``step-N`` names (atomic), then deleted."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Saver:
    """Saves the training state after every step into a checkpoint folder (module docstring).
    Collective: all ranks create it and call :meth:`save`."""

    def __init__(self, folder: str | os.PathLike, plan: Plan, lr: float, check: bool) -> None:
        import torch.distributed as dist

        self.folder = Path(folder)
        self.info = describe(plan, lr, check)
        self.rank = dist.get_rank()
        if self.rank == 0:  # partial folders of a killed job: never resumed, no longer needed
            self._sweep(keep=None)
        dist.barrier()

    def save(self, step: int, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
             reference: tuple[torch.nn.Module, torch.optim.Optimizer] | None) -> None:
        """Save the state after ``step`` steps as ``step-<step>``; older steps go once it is
        complete."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        partial = self.folder / f".step-{step}.partial"
        dcp.save(_state(params, opt, reference),
                 storage_writer=_writer(partial, _fault_here(self.rank, step, "write")))
        if self.rank == 0:
            self._commit(partial, step)
        dist.barrier()

    def _commit(self, partial: Path, step: int) -> None:
        """Rank 0: make the saved ``partial`` step the folder's latest complete step."""
        info = {**self.info, "step": step}
        write_text_atomic(partial / INFO, json.dumps(info, indent=1) + "\n")
        if _fault_here(self.rank, step, "commit"):
            die_now()
        final = step_folder(self.folder, step)
        if final.exists():  # left by an earlier job that saved here
            _discard(final)
        os.replace(partial, final)
        _fsync_dir(self.folder)
        write_text_atomic(self.folder / MANIFEST,
                          json.dumps({"latest": final.name, **info}, indent=1) + "\n")
        self._sweep(keep=final.name)

    def _sweep(self, keep: str | None) -> None:
        """Remove leftover partial folders and, given ``keep``, every step folder but it."""
        for path in self.folder.iterdir():
            if _LEFTOVER.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
            elif keep is not None and _STEP.match(path.name) and path.name != keep:
                _discard(path)
