"""The runtime's log of the collectives it runs, recorded from what torch actually dispatched.

:class:`CommLog` holds, per (direction, mesh axis, kind), the count and the bytes this device
sent. While a conversion runs (:class:`~autoddl.runtime.execute.Converter`) a
:class:`CollectiveRecorder` — a ``TorchDispatchMode``, the mechanism of torch's own
``CommDebugMode`` — sees every collective operator that reaches the dispatcher, whoever issued
it: DTensor's ``redistribute`` (including collectives it adds on its own, e.g. the all-gathers
it runs to undo a nested split), the runtime's explicit all-to-all, functional (``_c10d_functional``)
or classic (``c10d``) operators. Each is logged with the bytes of the tensor this device sends
and the ring formula of :func:`~autoddl.engine.placements.collective_cost` on its group's size,
under the mesh axis whose process group it ran on. So the byte check compares the plan with what
ran, not with what the runtime meant to run; local slices move no bytes and are not logged.
A collective on a group that is no mesh axis is logged under axis ``group:<name>`` and a
collective operator of no known kind under its own name: never dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autoddl.engine.placements import collective_cost


@dataclass
class CommLog:
    """Collectives the executor ran: (direction, axis name, kind) -> [count, bytes sent/device]."""

    entries: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    direction: str = "forward"

    def add(self, axis: str, kind: str, nbytes: float, direction: str | None = None) -> None:
        """Record one collective step (or one point-to-point send, kind ``p2p``)."""
        e = self.entries.setdefault((direction or self.direction, axis, kind), [0, 0.0])
        e[0] += 1
        e[1] += nbytes

    def by_kind(self) -> Counter:
        """Counts per collective kind."""
        c: Counter = Counter()
        for (_, _, kind), (n, _) in self.entries.items():
            c[kind] += int(n)
        return c

    def bytes_by_kind(self) -> Counter:
        """Bytes sent per device, per collective kind."""
        c: Counter = Counter()
        for (_, _, kind), (_, b) in self.entries.items():
            c[kind] += b
        return c

    def by_axis_kind(self) -> dict[tuple[str, str], list[float]]:
        """(axis name, kind) -> [count, bytes sent by this device], forward and backward
        together: what :func:`autoddl.runtime.worker.byte_check` compares with the plan."""
        out: dict[tuple[str, str], list[float]] = {}
        for (_, axis, kind), (n, b) in self.entries.items():
            e = out.setdefault((axis, kind), [0, 0.0])
            e[0] += int(n)
            e[1] += b
        return out


#: collective operator name -> (autoddl kind, index of the argument this device sends)
_OPS: dict[str, tuple[str, int]] = {
    # functional collectives (what DTensor issues)
    "all_gather_into_tensor": ("all_gather", 0),
    "all_gather_into_tensor_coalesced": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "all_gather_into_tensor_out": ("all_gather", 0),
    "all_reduce": ("all_reduce", 0),
    "all_reduce_": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "all_to_all_single": ("all_to_all", 0),
    "broadcast": ("broadcast", 0),
    # classic c10d operators (torch.distributed calls)
    "_allgather_base_": ("all_gather", 1),
    "allgather_": ("all_gather", 1),
    "allgather_into_tensor_coalesced_": ("all_gather", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "alltoall_base_": ("all_to_all", 1),
    "alltoall_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
    "reduce_": ("reduce", 0),
    "gather_": ("gather", 1),
    "scatter_": ("scatter", 1),
}
_NAMESPACES = {"_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d"}


def _nbytes(x: Any) -> int:
    """Bytes of a tensor or of the tensors of a (nested) list."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _group(args: Sequence[Any]) -> tuple[str | None, int]:
    """(name, size) of the process group an operator runs on: a classic operator's
    ProcessGroup object, or a functional collective's group name (its last string argument;
    size 0: unknown here)."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                pg = torch._C._distributed_c10d.ProcessGroup.unbox(a)
                return pg.group_name, pg.size()
            except (AttributeError, RuntimeError):
                return None, 0
    names = [a for a in args if isinstance(a, str)]
    return (names[-1] if names else None), 0


def sent_bytes(kind: str, p: int, held: float) -> float:
    """Bytes one device sends in a ring collective of ``kind`` on ``p`` devices, from the bytes
    it holds before (the cost model's formula); a kind the cost model has none for: ``held``."""
    if kind in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all"):
        return collective_cost(kind, p, held)[0]
    return float(held)


class CollectiveRecorder(TorchDispatchMode):
    """Logs into ``log`` every collective operator dispatched while active (see the module
    docstring). ``groups`` maps a process group's name to (mesh axis name, group size)."""

    def __init__(self, log: CommLog, groups: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.log, self.groups = log, groups

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func.namespace in _NAMESPACES:
            name = func._overloadpacket.__name__
            if name in _OPS or func.namespace == "c10d" and not name.startswith(("wait", "_wrap")):
                self._record(name, list(args) + list(kwargs.values()))
        return func(*args, **kwargs)

    def _record(self, name: str, args: list[Any]) -> None:
        kind, idx = _OPS.get(name, (name, 0))
        group, size = _group(args)
        axis, p = self.groups.get(group or "", (f"group:{group}", max(size, 1)))
        held = _nbytes(args[idx]) if idx < len(args) else 0
        self.log.add(axis, kind, sent_bytes(kind, p, held))
