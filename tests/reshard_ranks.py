"""Rank program of ``tests/test_reshard_dist.py`` (4 gloo ranks, a 2×2 mesh; run by torchrun).

Runs every conversion between valid placements of a (4, 4) tensor, nested dims in either order,
through the runtime's own edge conversion (:class:`~autoddl.runtime.execute.Converter` on the
steps of :func:`~autoddl.engine.placements.reshard_steps`) under torch's ``CommDebugMode``, a few
of them through the autograd edge (:class:`~autoddl.runtime.execute._Reshard`) with their
gradients, and one conversion by the old step order (the slice first, nesting two splits of dim
0); checks that DTensor's pieces of each placement (a nesting order as ``_StridedShard``) are the
ones the order defines (:func:`tests.helpers.piece`); and writes rank 0's findings as JSON to the
path in argv[1].
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from autoddl.engine.placements import (
    P, Placement, Step, grad_target, has_order, is_valid, reshard_steps,
)
from autoddl.runtime.execute import CommLog, Converter, _Reshard, to_dtensor_placements
from tests.helpers import all_orders, piece

SHAPE, MESH, NBYTES = (4, 4), (2, 2), 64.0
_TORCH_KIND = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
               "all_reduce": "all_reduce", "all_to_all_single": "all_to_all",
               "alltoall_base_": "all_to_all"}


def _local(full: torch.Tensor, mesh, pl: Placement) -> torch.Tensor:
    """This rank's piece of ``full`` under ``pl`` (a P axis holds full / axis size)."""
    dt = [Replicate() if p == P else q
          for p, q in zip(pl, to_dtensor_placements(pl, tuple(mesh.shape)))]
    local = distribute_tensor(full, mesh, dt, src_data_rank=None).to_local()
    return local / 2 ** sum(p == P for p in pl)


def _torch_kinds(comm: CommDebugMode) -> dict[str, int]:
    out: Counter = Counter()
    for op, n in comm.get_comm_counts().items():
        out[_TORCH_KIND.get(str(op).split(".")[-1], str(op))] += n
    return dict(out)


def _run(mesh, full, src, steps) -> dict:
    log = CommLog()
    with CommDebugMode() as comm:
        out = Converter(mesh, ("a", "b"), log).run(_local(full, mesh, src), src, steps, SHAPE)
    predicted: dict[str, list] = {}
    for st in steps:
        if st.kind != "slice":
            e = predicted.setdefault(f"{'ab'[st.axis]}/{st.kind}", [0, 0.0])
            e[0], e[1] = e[0] + 1, e[1] + st.bytes_per_device
    return {"out": out, "torch": _torch_kinds(comm), "predicted": predicted,
            "logged": {f"{a}/{k}": v for (a, k), v in log.by_axis_kind().items()},
            "predicted_kinds": dict(Counter(st.kind for st in steps if st.kind != "slice"))}


def conversions(mesh, full) -> list[dict]:
    """Every conversion: correct result, torch's collectives, the log and the prediction."""
    pls = [o for p in itertools.product(["B", "P", "S(0)", "S(1)"], repeat=2)
           if is_valid(p, SHAPE, MESH) for o in all_orders(p, MESH)]
    rows = []
    for src, dst in itertools.product(pls, pls):
        steps = reshard_steps(src, dst, NBYTES, MESH)
        if not steps:
            continue
        r = _run(mesh, full, src, steps)
        want = distribute_tensor(full, mesh, to_dtensor_placements(dst, tuple(mesh.shape)),
                                 src_data_rank=None).to_local()
        r["correct"] = bool(torch.allclose(r.pop("out"), want))
        rows.append({"src": src, "dst": dst, **r})
    return rows


def gradients(mesh, full) -> list[dict]:
    """Edges through the autograd conversion: the gradient arrives in the producer's placement,
    equal to the piece of the whole gradient (here 2 * the whole input)."""
    rows = []
    for src, dst in [(("S(1)", "B"), ("B", "S(1)")), (("B", "S(0)"), ("S(0)", "B")),
                     (("S(0)", "S(1)"), ("S(1)", "S(0)")), (("B", "S(1)"), ("S(1)", "S(0)")),
                     (("S(0)", "S(0)"), ("B", "S(0)")), (("S(1)", "S(0)"), ("S(0)", "S(0)")),
                     (("S(0)", "S(0)"), ("S(1)", "S(1)")), (("S(1)", "B"), ("S(0)", "S(0)")),
                     (("S(0)^1", "S(0)"), ("B", "S(0)")), (("S(0)", "S(0)"), ("S(0)^1", "S(0)")),
                     (("S(1)", "S(0)"), ("S(0)^1", "S(0)")), (("B", "S(1)"), ("S(1)^1", "S(1)"))]:
        x = _local(full, mesh, src).requires_grad_()
        fwd = reshard_steps(src, dst, NBYTES, MESH)
        gsrc = tuple(grad_target(p) for p in src)
        bwd = reshard_steps(dst, gsrc, NBYTES, MESH)
        conv = Converter(mesh, ("a", "b"), CommLog())
        y = _Reshard.apply(x, conv, src, fwd, dst, bwd, SHAPE)
        (y * y).sum().backward()
        want = _local(2 * full, mesh, src)
        rows.append({"src": src, "dst": dst, "correct": bool(torch.allclose(x.grad, want))})
    return rows


def layouts(mesh, full) -> dict:
    """Each placement without partial sums, in every nesting order: whether DTensor's piece
    (``distribute_tensor`` of :func:`~autoddl.runtime.execute.to_dtensor_placements`) is the
    one the order defines, on every rank."""
    pls = [o for p in itertools.product(["B", "S(0)", "S(1)"], repeat=len(MESH))
           if is_valid(p, SHAPE, MESH) for o in all_orders(p, MESH)]
    coord = tuple(mesh.get_coordinate())
    bad = []
    for pl in pls:
        got = distribute_tensor(full, mesh, to_dtensor_placements(pl, MESH),
                                src_data_rank=None).to_local()
        if not torch.equal(got, torch.from_numpy(piece(full.numpy(), pl, MESH, coord))):
            bad.append([list(pl), list(coord)])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, bad)
    return {"checked": len(pls), "ordered": sum(has_order(p) for p in pls),
            "bad": [b for r in everyone for b in r]}


def nested(mesh, full) -> dict:
    """(B, S(0)) -> (S(0), B) by the old step order: slice on axis a first (DTensor must then
    gather to slice dim 0 inside axis b's split), then the all-gather on b."""
    steps = [Step(0, "B", "S(0)", "slice", 0.0, 0), Step(1, "S(0)", "B", "all_gather", 16.0, 2)]
    r = _run(mesh, full, ("B", "S(0)"), steps)
    r.pop("out")
    return r


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", MESH)
    full = torch.arange(16.0).reshape(SHAPE) + 1
    result = {"conversions": conversions(mesh, full), "gradients": gradients(mesh, full),
              "nested": nested(mesh, full), "layouts": layouts(mesh, full)}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
