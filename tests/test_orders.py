"""Nesting orders: a dim split on several axes in any order (``S(d)^k`` marks).

The conversions are checked against a simulation, in numpy, of the collectives the runtime runs
on local pieces (each step acts on the innermost split of its dims, as the runtime's DTensor
redistribute or all-to-all does): every conversion between placements in any order must end on
the pieces the target's order defines, computed here from the definition (the chunk number of
a nested dim is the mixed-radix number of the device's coordinates, outer axis most
significant), and the steps' bytes are checked by hand where the module docstring states them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pytest

from autoddl.engine.costs import build_problem
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta
from autoddl.engine.mesh_signatures import leaf_signatures, order_variants, signatures
from autoddl.engine.plan import load_plan, save_plan
from autoddl.engine.plan_check import check_against_graph, check_placement
from autoddl.engine.placements import (
    B, P, S, default_order, has_order, is_split, is_valid, marks_valid, reshard_steps,
    split_dim, split_orders, strided_factor, with_orders,
)
from autoddl.engine.planner import solve_sharding
from autoddl.engine.workload import load_workload, plan_from_choice
from autoddl.errors import UserError
from tests.helpers import all_orders, piece

T = 1024.0


def placements(mesh_shape, shape, ndim: int = 2) -> list:
    """Every valid placement of one-axis B, P, S(d) in every nesting order."""
    one = [B, P] + [S(d) for d in range(ndim)]
    out = []
    for combo in itertools.product(one, repeat=len(mesh_shape)):
        if is_valid(combo, shape, mesh_shape):
            out += all_orders(combo, mesh_shape)
    return out


# --------------------------------------------------------------------------- the encoding
@pytest.mark.parametrize("axes", [2, 3, 4])
def test_every_order_has_one_encoding_and_decodes_back(axes):
    """The marks are an inversion table: each order of the axes of a dim gives distinct marks,
    decoding gives the order back, the default (left-to-right) order has no marks."""
    seen = set()
    for order in itertools.permutations(range(axes)):
        pl = with_orders((S(0),) * axes, {0: order})
        assert split_orders(pl) == {0: list(order)} and marks_valid(pl)
        assert has_order(pl) == (list(order) != sorted(order))
        assert default_order(pl) == (S(0),) * axes
        seen.add(pl)
    assert len(seen) == math.factorial(axes)
    assert with_orders((S(0),) * axes, {0: range(axes)}) == (S(0),) * axes


def test_marks_out_of_range_are_invalid():
    assert not marks_valid((S(0, 1), B)) and not is_valid((S(0, 1), B), (8, 8), (2, 2))
    assert not marks_valid((S(0, 1), S(1))) and marks_valid((S(0, 1), S(0)))
    assert marks_valid((S(0, 2), S(0), S(0)))  # two later axes: a mark of 2 fits
    assert split_dim("S(12)^1") == 12 and is_split("S(3)^2")


def test_strided_factor_is_the_product_of_the_later_axes_nested_outside():
    """DTensor's _StridedShard split factor of an axis: the sizes of the higher-indexed axes
    outside it. Axis order (2, 0, 1) on a (4, 3, 2) mesh: axis 2 outer (factor 1), then 0 and 1
    inside it (factor 2 each; DTensorSpec's own example)."""
    pl = with_orders((S(0),) * 3, {0: (2, 0, 1)})
    assert [strided_factor(pl, a, (4, 3, 2)) for a in range(3)] == [2, 2, 1]
    pl = with_orders((S(0),) * 3, {0: (2, 1, 0)})
    assert [strided_factor(pl, a, (4, 3, 2)) for a in range(3)] == [6, 2, 1]


# --------------------------------------------------------------------------- simulation
def _addend(coord, pl, weights) -> float:
    """The share of the whole a device's addend holds: a product over the P axes."""
    return math.prod(weights[a][coord[a]] for a, p in enumerate(pl) if p == P)


def simulate(full: np.ndarray, src, steps, mesh_shape, weights) -> dict:
    """Run ``steps`` on every device's piece with the collectives the runtime runs on local
    tensors, each acting on its axis's group (the devices differing only in that coordinate)."""
    coords = list(itertools.product(*[range(n) for n in mesh_shape]))
    local = {c: piece(full, src, mesh_shape, c) * _addend(c, src, weights) for c in coords}
    cur = list(src)
    for st in steps:
        m, p = st.axis, mesh_shape[st.axis]
        new = {}
        for c in coords:
            group = [c[:m] + (j,) + c[m + 1:] for j in range(p)]
            if st.kind == "slice":
                new[c] = np.split(local[c], p, axis=split_dim(st.dst))[c[m]]
            elif st.kind == "all_gather":
                new[c] = np.concatenate([local[g] for g in group], axis=split_dim(st.src))
            elif st.kind == "all_reduce":
                new[c] = sum(local[g] for g in group)
            elif st.kind == "reduce_scatter":
                new[c] = np.split(sum(local[g] for g in group), p, axis=split_dim(st.dst))[c[m]]
            else:  # all-to-all: chunk j of each sender's piece to device j, joined in order
                assert st.kind == "all_to_all", st
                new[c] = np.concatenate(
                    [np.split(local[g], p, axis=split_dim(st.dst))[c[m]] for g in group],
                    axis=split_dim(st.src))
        local = new
        cur[st.axis] = st.dst
    return local


@pytest.mark.parametrize("mesh_shape,sample", [((2, 2), None), ((2, 4), None),
                                               ((2, 2, 2), 2500), ((2, 3, 2), 1500)])
def test_conversions_in_any_order_end_on_the_target_pieces(mesh_shape, sample):
    """Every conversion (a sample on 3 axes) between placements in any nesting order: the
    steps, run as their collectives on local pieces, leave each device the piece the target's
    order defines (partial sums: the same share of it as before)."""
    shape = (24, 24)
    pls = placements(mesh_shape, shape)
    assert any(has_order(p) for p in pls)
    pairs = [(s, d) for s in pls for d in pls]
    if sample:
        pairs = random.Random(0).sample(pairs, sample)
    rng = np.random.default_rng(0)
    full = rng.standard_normal(shape)
    weights = [rng.dirichlet(np.ones(n)) for n in mesh_shape]
    coords = list(itertools.product(*[range(n) for n in mesh_shape]))
    ran = 0
    for src, dst in pairs:
        steps = reshard_steps(src, dst, T, mesh_shape)
        if steps is None:
            assert any(q == P and p != P for p, q in zip(src, dst))
            continue
        ran += 1
        got = simulate(full, src, steps, mesh_shape, weights)
        for c in coords:
            want = piece(full, dst, mesh_shape, c) * _addend(c, dst, weights)
            assert got[c].shape == want.shape and np.allclose(got[c], want), (src, dst, c)
    assert ran > len(pairs) // 3


@pytest.mark.parametrize("p0,p1", [(2, 2), (2, 4), (4, 2)])
def test_the_docstring_table_by_hand(p0, p1):
    """The rows of placements.py's table: T the bytes a device holds before."""
    mesh = (p0, p1)
    held = T / (p0 * p1)

    def run(src, dst):
        return [(s.axis, s.kind, s.bytes_per_device) for s in reshard_steps(src, dst, T, mesh)]

    assert run((S(0), S(0)), (S(0), B)) == [(1, "all_gather", (p1 - 1) * held)]
    assert run((S(0), S(0)), (B, S(0))) == [(1, "all_gather", (p1 - 1) * held),
                                           (0, "all_gather", (p0 - 1) * p1 * held),
                                           (1, "slice", 0.0)]
    assert run((S(0, 1), S(0)), (B, S(0))) == [(0, "all_gather", (p0 - 1) * held)]
    held_p = T / p1  # (P, S(0)) holds a partial sum of T / p1
    assert run((P, S(0)), (S(0, 1), S(0))) == [(0, "reduce_scatter", (p0 - 1) / p0 * held_p)]
    steps = run((S(0), S(0)), (S(0, 1), S(0)))
    assert [s[:2] for s in steps] == [(1, "all_gather"), (0, "all_gather"), (1, "slice"),
                                      (0, "slice")]
    assert sum(s[2] for s in steps) == pytest.approx((p0 * p1 - 1) * held)


def test_leaves_are_offered_in_every_order_operators_in_the_default_one():
    """A parameter split on all three axes of a 2x2x2 mesh, two of them nesting one dim: each
    such placement in both orders (and its ZeRO-3 variant in both), a 3-axis nest in all six."""
    node = OpNode("w", "param", "param", TensorMeta((8, 8), "float32"), requires_grad=True)
    mesh = (2, 2, 2)
    outs = [s.out for s in leaf_signatures(node, mesh)]
    assert len(outs) == len(set((s.out, s.zero) for s in leaf_signatures(node, mesh)))
    nested = {default_order(o) for o in outs if has_order(o)}
    for pl in nested:
        orders = {o for o in outs if default_order(o) == pl}
        groups = [len(seq) for seq in split_orders(pl).values()]
        assert len(orders) == math.prod(math.factorial(g) for g in groups), pl
    assert (S(0), S(0), S(0)) in nested and (S(0), S(1), S(0)) in nested


@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 2, 2)])
def test_an_operator_runs_exactly_in_every_order_of_its_nests(mesh_shape):
    """mesh_signatures' claim: a combination of one-axis signatures is exact in any nesting
    order applied to all its tensors. Y = X @ W on local pieces, for every signature of ``mm``
    without partial inputs in every order: the pieces (summed over the P axes of Y) are the
    ones Y's placement defines."""
    f = "float32"
    graph = OpGraph((
        OpNode("x", "input", "input", TensorMeta((8, 8), f)),
        OpNode("w", "input", "input", TensorMeta((8, 8), f)),
        OpNode("y", "op", "aten.mm.default", TensorMeta((8, 8), f), ("x", "w"),
               (TensorArg(0), TensorArg(1))),
    ), "y")
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    coords = list(itertools.product(*[range(n) for n in mesh_shape]))
    checked = 0
    for sig in signatures(graph["y"], graph, mesh_shape):
        if P in sig.ins[0] + sig.ins[1]:
            continue
        for var in order_variants(sig, mesh_shape):
            local = {c: piece(x, var.ins[0], mesh_shape, c) @ piece(w, var.ins[1], mesh_shape, c)
                     for c in coords}
            for c in coords:
                group = [d for d in coords
                         if all(d[a] == c[a] for a, p in enumerate(var.out) if p != P)]
                got = sum(local[d] for d in group)
                assert np.allclose(got, piece(x @ w, var.out, mesh_shape, c)), var
            checked += has_order(var.out) or any(has_order(i) for i in var.ins)
    assert checked >= 3  # rows, columns and the contraction nested


def test_plan_files_carry_orders_and_are_checked(tmp_path):
    """A plan whose weight is stored in the other order saves and loads it as ``S(0)^1``, and
    passes the checks against the model's graph; a mark no later axis can carry is refused
    in the file, and an operator in an order it is not offered in against the graph."""
    work = load_workload("mlp:batch=64,dim_in=16,hidden=32,layers=2,dim_out=16",
                         "cpu:devices=4", stages=1)
    costed = work.costed(work.mesh((2, 2)))
    sigs = dict(costed.sigs)
    sigs["p_layers_0_weight"] = [s for s in sigs["p_layers_0_weight"]
                                 if s.out == (S(0, 1), S(0)) and s.zero == 0]
    problem = build_problem(costed.graph, costed.mesh, costed.cluster, costed.config,
                            costed.mult, sigs=sigs)
    plan = plan_from_choice(work, problem, solve_sharding(problem, "highs").choice, "test", 0.0)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    plan = load_plan(path)
    assert plan.op("p_layers_0_weight").out == {"x": "S(0)^1", "y": "S(0)"}
    check_against_graph(plan, costed.graph)
    for bad in ("S(0)^0", "S(0)^x", "S(0)^10"):
        with pytest.raises(UserError, match="a placement is"):
            check_placement(bad, "f")
    data = json.loads(path.read_text())
    op = next(o for o in data["ops"] if o["name"] == "p_layers_0_weight")
    op["out"] = {"x": "S(0)", "y": "S(0)^1"}  # axis y has no later axis to nest inside
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="order mark"):
        load_plan(path)
    nest = {"x": "S(0)^1", "y": "S(0)"}  # legal in the default order, not offered in this one
    reordered = tuple(dataclasses.replace(o, out=nest, ins=(nest,)) if o.name == "gelu" else o
                      for o in plan.ops)
    with pytest.raises(UserError, match="not a legal signature"):
        check_against_graph(dataclasses.replace(plan, ops=reordered), costed.graph)
    default = {"x": "S(0)", "y": "S(0)"}
    check_against_graph(dataclasses.replace(plan, ops=tuple(
        dataclasses.replace(o, out=default, ins=(default,)) if o.name == "gelu" else o
        for o in plan.ops)), costed.graph)
