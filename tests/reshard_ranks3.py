"""Rank program of ``tests/test_reshard_dist.py``'s 3-axis case (8 gloo ranks, a 2×2×2 mesh).

Runs a fixed random sample of conversions of an (8, 8) tensor whose source or target nests a
split (one dim split on two or three axes, in the default order, and a sample in other orders)
through the runtime's :class:`~autoddl.runtime.execute.Converter`, and writes, as JSON to argv[1],
how many ran and those whose result differs from DTensor's own distribution of the whole tensor
(or that differs from the piece the target's order defines) or whose logged collectives (count
and bytes per axis and kind) differ from the steps' prediction, on any rank.
"""

from __future__ import annotations

import itertools
import json
import random
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor

from autoddl.engine.placements import P, has_order, is_nested, is_valid, reshard_steps
from autoddl.runtime.execute import CommLog, Converter, to_dtensor_placements
from tests.helpers import all_orders, piece
from tests.reshard_ranks import _local

SHAPE, MESH, NBYTES, SAMPLE, ORDERED = (8, 8), (2, 2, 2), 256.0, 160, 80


def _pairs() -> list:
    """The sample: SAMPLE pairs whose source or target nests a split (the default order), and
    ORDERED pairs whose source or target nests one in another order (3-axis nests in any of
    their six orders)."""
    pls = [p for p in itertools.product(["B", "P", "S(0)", "S(1)"], repeat=3)
           if is_valid(p, SHAPE, MESH)]
    pairs = [(s, d) for s, d in itertools.product(pls, pls)
             if is_nested(s, MESH) or is_nested(d, MESH)]
    random.Random(0).shuffle(pairs)
    ordered = [o for p in pls for o in all_orders(p, MESH)]
    others = [(s, d) for s, d in itertools.product(ordered, ordered)
              if has_order(s) or has_order(d)]
    return pairs[:SAMPLE] + random.Random(1).sample(others, ORDERED)


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", MESH)
    full = torch.arange(64.0).reshape(SHAPE) + 1
    coord = tuple(mesh.get_coordinate())
    ran, ordered, bad = 0, 0, []
    for src, dst in _pairs():
        steps = reshard_steps(src, dst, NBYTES, MESH)
        if not steps:
            continue
        log = CommLog()
        out = Converter(mesh, ("a", "b", "c"), log).run(_local(full, mesh, src), src, steps,
                                                        SHAPE)
        predicted: dict[str, list] = {}
        for st in steps:
            if st.kind != "slice":
                e = predicted.setdefault(f"{'abc'[st.axis]}/{st.kind}", [0, 0.0])
                e[0], e[1] = e[0] + 1, e[1] + st.bytes_per_device
        logged = {f"{a}/{k}": v for (a, k), v in log.by_axis_kind().items()}
        want = distribute_tensor(full, mesh, to_dtensor_placements(dst, tuple(mesh.shape)),
                                 src_data_rank=None).to_local()
        ran += 1
        ordered += has_order(src) or has_order(dst)
        defined = P in dst or torch.equal(
            want, torch.from_numpy(piece(full.numpy(), dst, MESH, coord)))
        if not torch.allclose(out, want) or logged != predicted or not defined:
            bad.append([src, dst, logged, predicted])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, bad)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"ran": ran, "ordered": ordered, "bad": [b for r in everyone for b in r]},
                      f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
