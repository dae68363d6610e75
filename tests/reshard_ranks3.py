"""Rank program of ``tests/test_reshard_dist.py``'s 3-axis case (8 gloo ranks, a 2×2×2 mesh).

Runs a fixed random sample of conversions of an (8, 8) tensor whose source or target nests a
split (one dim split on two or three axes) through the runtime's
:class:`~autoddl.runtime.execute.Converter`, and writes, as JSON to argv[1], how many ran and
those whose result differs from DTensor's own distribution of the whole tensor or whose logged
collectives (count and bytes per axis and kind) differ from the steps' prediction.
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

from autoddl.engine.placements import is_nested, is_valid, reshard_steps
from autoddl.runtime.execute import CommLog, Converter, to_dtensor_placements
from tests.reshard_ranks import _local

SHAPE, MESH, NBYTES, SAMPLE = (8, 8), (2, 2, 2), 256.0, 160


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", MESH)
    full = torch.arange(64.0).reshape(SHAPE) + 1
    pls = [p for p in itertools.product(["B", "P", "S(0)", "S(1)"], repeat=3)
           if is_valid(p, SHAPE, MESH)]
    pairs = [(s, d) for s, d in itertools.product(pls, pls)
             if is_nested(s, MESH) or is_nested(d, MESH)]
    random.Random(0).shuffle(pairs)
    ran, bad = 0, []
    for src, dst in pairs[:SAMPLE]:
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
        if not torch.allclose(out, want) or logged != predicted:
            bad.append([src, dst, logged, predicted])
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"ran": ran, "bad": bad}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
