"""The vectorized conversion table equals the step-by-step rules the runtime executes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autoddl.engine.costs import edge_steps, steps_seconds
from autoddl.engine.placements import input_grad, local_fraction
from autoddl.engine.reshard_table import unit_matrices
from tests.helpers import cluster
from tests.test_orders import all_orders


def _placements(axes: int, ndim: int, nested: bool = False, orders: tuple = ()):
    """Every combination of one-axis placements (with ``nested``, dims split on several axes
    too); with ``orders`` (the mesh shape), each nested dim in every order of its axes."""
    one = ["B", "P"] + [f"S({d})" for d in range(ndim)]
    pls = [p for p in itertools.product(one, repeat=axes)
           if nested
           or len({x for x in p if x.startswith("S(")}) == sum(x.startswith("S(") for x in p)]
    if orders:
        pls = [o for p in pls for o in all_orders(p, orders)]
    return pls


def _scalar(pa, pin, pg, mesh):
    """The same five numbers from the step-by-step rules the runtime executes."""
    fwd, bwd = edge_steps(1.0, pa, pin, pg, mesh)
    if fwd is None:
        return (np.inf, np.inf, 0.0, 0.0, 0.0)

    def split(steps):
        per_byte = sum(mesh.axes[st.axis].step_seconds(st.kind, st.bytes_per_device, 0)
                       for st in steps)  # two-level where an axis spans nodes
        return per_byte, steps_seconds(steps, mesh) - per_byte

    frac = local_fraction(pin, mesh.shape) if pa != pin else 0.0
    return (*split(fwd), *split(bwd), frac)


@pytest.mark.parametrize("shape,ndim,nested,orders", [
    ((4,), 2, False, False), ((2, 4), 2, False, False), ((2, 1, 4), 2, False, False),
    ((2, 3, 2), 2, False, False), ((2, 2, 2), 3, False, False), ((2, 4), 2, True, False),
    ((2, 1, 4), 2, True, False), ((2, 3, 2), 2, True, False), ((2, 2, 2), 2, True, False),
    ((2, 2, 2, 2), 1, True, False), ((2, 4), 2, True, True), ((2, 3, 2), 2, True, True),
    ((4, 2, 2), 2, True, True)])
def test_table_matches_scalar_steps(shape, ndim, nested, orders):
    """Every pair, including dims moving between axes (chains, and on 3 axes cycles of 3) and,
    with ``nested``, placements splitting one dim on several axes (a size-1 axis nests
    nothing), with ``orders`` in every nesting order (conversions between orders)."""
    import math
    c = cluster(devices=math.prod(shape), nodes=2 if math.prod(shape) % 2 == 0 else 1,
                gbps=100, inter_gbps=7, latency_s=3e-6)
    mesh = c.mesh(shape)
    src = _placements(len(shape), ndim, nested, shape if orders else ())
    ins = _placements(len(shape), ndim, nested, shape if orders else ())
    rng = np.random.default_rng(0)
    dst = [(p, tuple(input_grad(x, "S(0)") for x in p)) for p in ins]
    dst += [(ins[i], None) for i in rng.choice(len(ins), 5)]
    dst += [(ins[i], ins[j]) for i, j in rng.integers(0, len(ins), (20, 2))]
    table = unit_matrices(src, dst, mesh)
    for a, pa in enumerate(src):
        for b, (pin, pg) in enumerate(dst):
            ref = _scalar(pa, pin, pg, mesh)
            got = [float(t[a, b]) for t in table]
            if not np.isfinite(ref[0]):
                assert not np.isfinite(got[0])
                continue
            assert got == pytest.approx(list(ref), rel=1e-12, abs=1e-18), (pa, pin, pg)
