"""Nested sharding (one tensor dim split on several mesh axes) in the search space.

The GEMM case of issue 14: Y = X @ W, all (8192, 8192), on a 4×4×4 mesh (P = 64), X and W start
split over all 64 devices (each on all three axes, in any nesting order) and Y must end so; the
3-D algorithm's bytes are the lower bound 3(mnk/P)^(2/3) − (mn+mk+nk)/P elements per device, and
the plan moves exactly them. And plain data parallelism over both axes of
a 2-axis mesh: its gradient sync against the one-axis two-level all-reduce.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autoddl.engine.costs import build_problem, edge_steps
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta
from autoddl.engine.placements import B, P, S, has_order, is_nested, is_split, reshard_steps
from autoddl.engine.planner import solve_sharding
from autoddl.engine.mesh_signatures import signatures
from autoddl.engine.rules import ZERO_NONE
from tests.helpers import cluster, mlp_graph

N = 8192
ELEM_BYTES = 4.0
TENSOR_BYTES = N * N * ELEM_BYTES


def _gemm_graph() -> OpGraph:
    """x, w (inputs) -> y = mm(x, w) -> z = clone(y): z pins y's final placement."""
    f = "float32"
    return OpGraph((
        OpNode("x", "input", "input", TensorMeta((N, N), f)),
        OpNode("w", "input", "input", TensorMeta((N, N), f)),
        OpNode("y", "op", "aten.mm.default", TensorMeta((N, N), f), ("x", "w"),
               (TensorArg(0), TensorArg(1)), flops=0.0),
        OpNode("z", "op", "aten.clone.default", TensorMeta((N, N), f), ("y",),
               (TensorArg(0),), flops=0.0),
    ), "z")


def _split_everywhere(pl) -> bool:
    return all(is_split(p) for p in pl)


def _gemm_sigs(graph: OpGraph, mesh_shape):
    """x and w start split on every axis (so over all 64 devices: two axes nest one dim), z
    reads y in such a placement; y (the GEMM) takes any legal signature."""
    sigs = {n.name: signatures(n, graph, mesh_shape) for n in graph.nodes}
    for leaf in ("x", "w"):
        sigs[leaf] = [s for s in sigs[leaf] if _split_everywhere(s.out) and s.zero == ZERO_NONE]
    sigs["z"] = [s for s in sigs["z"] if _split_everywhere(s.out) and s.ins[0] == s.out]
    return sigs


def _bound_bytes(m: int, n: int, k: int, p: int) -> float:
    """The 3-D GEMM lower bound per device, bytes."""
    return (3 * (m * n * k / p) ** (2 / 3) - (m * n + m * k + n * k) / p) * ELEM_BYTES


def _fwd_bytes(src, dst, mesh_shape) -> float:
    """Forward bytes per device of one conversion (inf where forbidden: into P)."""
    steps = reshard_steps(src, dst, TENSOR_BYTES, mesh_shape)
    return np.inf if steps is None else sum(st.bytes_per_device for st in steps)


@pytest.fixture(scope="module")
def gemm():
    graph = _gemm_graph()
    c = cluster(devices=64, gbps=10, latency_s=1e-9, peak_flops=1e18)
    mesh = c.mesh((4, 4, 4))
    sigs = _gemm_sigs(graph, mesh.shape)
    cand = solve_sharding(build_problem(graph, mesh, c, sigs=sigs), "highs")
    plan_bytes = 0.0
    for dst in ("y", "z"):
        for i, src in enumerate(graph[dst].inputs):
            fwd, _ = edge_steps(TENSOR_BYTES, cand.choice[src].out, cand.choice[dst].ins[i],
                                None, mesh)
            plan_bytes += sum(st.bytes_per_device for st in fwd)
    return graph, mesh, sigs, cand, plan_bytes


def test_gemm_bound_formula():
    """3(n³/64)^(2/3) − 3n²/64 = 3n²/16 − 3n²/64 = 9n²/64 elements: the 3-D algorithm's
    gather of X and of W along one axis of 4 each and reduce-scatter of Y along the third."""
    assert _bound_bytes(N, N, N, 64) == pytest.approx(9 * N * N / 64 * ELEM_BYTES, rel=1e-12)


def test_gemm_plan_is_the_brute_force_optimum(gemm):
    """The ILP's plan moves as few forward bytes as any choice of X's and W's starting
    placements (split on all three axes), GEMM signature and Y's final placement, enumerated
    here step by step from reshard_steps (latency is 1e-9 s per step: bytes decide)."""
    graph, mesh, sigs, cand, plan_bytes = gemm
    shape = mesh.shape
    xs = {s.out for s in sigs["x"]}
    ws = {s.out for s in sigs["w"]}
    zs = {s.ins[0] for s in sigs["z"]}
    best = np.inf
    for y in sigs["y"]:
        cost = (min(_fwd_bytes(x, y.ins[0], shape) for x in xs)
                + min(_fwd_bytes(w, y.ins[1], shape) for w in ws)
                + min(_fwd_bytes(y.out, z, shape) for z in zs))
        best = min(best, cost)
    assert plan_bytes == pytest.approx(best, rel=1e-12)
    assert any(is_nested(cand.choice[n].out, shape) for n in ("x", "w"))


def test_gemm_plan_reaches_the_3d_bound(gemm):
    """Inputs start split over all 64 devices, each on all three axes (two of them nest one
    dim, in either order: the leaves are offered in every nesting order), and Y ends so (in
    the default order: z is an operator).

    The 3-D algorithm gathers X along the axis that splits n (a_n), W along the one that
    splits m (a_m) and reduce-scatters Y along the one that splits k (a_k): 3/64 n² each, the
    bound's 9/64 n². Each must act on the inner split of its dim: X and W are stored with a_n,
    resp. a_m, nested inside; Y's reduce-scatter adds a_k inside the split it joins, which the
    default order allows when a_k is the highest axis. The plan finds it: each of the three
    conversions is one collective of 3/64 n²."""
    graph, mesh, sigs, cand, plan_bytes = gemm
    bound = _bound_bytes(N, N, N, 64)
    assert plan_bytes == pytest.approx(bound, rel=1e-9)
    for dst in ("y", "z"):
        for i, src in enumerate(graph[dst].inputs):
            fwd, _ = edge_steps(TENSOR_BYTES, cand.choice[src].out, cand.choice[dst].ins[i],
                                None, mesh)
            assert [st.bytes_per_device for st in fwd] == [pytest.approx(bound / 3)], fwd
    assert has_order(cand.choice["x"].out) and has_order(cand.choice["w"].out)


def test_gemm_plan_within_5_percent_of_the_3d_bound(gemm):
    *_, plan_bytes = gemm
    assert plan_bytes <= 1.05 * _bound_bytes(N, N, N, 64)


def test_gemm_in_the_default_order_only_moves_four_thirds_of_the_bound(gemm):
    """Without the other orders (DTensor's default left-to-right nesting everywhere) the 3-D
    algorithm cannot run with every step clean: each of a_n, a_m, a_k must be the inner split
    of its dim, a_n > a_m or a_k, a_m > a_n or a_k, a_k > a_m or a_n, which the smallest of
    the three cannot be. One extra conversion of a 1/16 piece (3/64 n²) is the cheapest way
    around: 12/64 n², 4/3 of the bound."""
    graph, mesh, sigs, *_ = gemm
    default = {k: [s for s in v if not any(has_order(p) for p in (s.out, *s.ins))]
               for k, v in sigs.items()}
    assert sum(map(len, default.values())) < sum(map(len, sigs.values()))
    c = cluster(devices=64, gbps=10, latency_s=1e-9, peak_flops=1e18)
    cand = solve_sharding(build_problem(graph, mesh, c, sigs=default), "highs")
    plan_bytes = sum(
        st.bytes_per_device for dst in ("y", "z") for i, src in enumerate(graph[dst].inputs)
        for st in edge_steps(TENSOR_BYTES, cand.choice[src].out, cand.choice[dst].ins[i], None,
                             mesh)[0])
    assert plan_bytes == pytest.approx(4 / 3 * _bound_bytes(N, N, N, 64), rel=1e-9)


def test_two_axis_data_parallel_is_searched_and_chosen():
    """An MLP on 2×2 with a large batch: the solver splits the batch on both axes (nested) and
    all-reduces each weight's gradient on each axis; the brute force over the same problem
    agrees."""
    graph = mlp_graph(batch=64, d_in=4, hidden=8, d_out=4)
    c = cluster(devices=4, latency_s=1e-9, peak_flops=1e9)
    mesh = c.mesh((2, 2))
    sigs = {n.name: signatures(n, graph, mesh.shape) for n in graph.nodes}
    # keep the problem brute-forceable: leaves and ops replicated, or split on dim 0 / nested
    keep = {(B, B), (S(0), B), (B, S(0)), (S(0), S(0)), (P, P)}
    for name, ss in sigs.items():
        sigs[name] = [s for s in ss if s.out in keep and s.zero == ZERO_NONE
                      and all(i in keep for i in s.ins)]
    problem = build_problem(graph, mesh, c, sigs=sigs).problem
    best, arg = problem.brute_force()
    cand = solve_sharding(build_problem(graph, mesh, c, sigs=sigs), "highs")
    assert cand.result.objective == pytest.approx(best, rel=1e-9)
    assert cand.choice["h"].out == (S(0), S(0)) and cand.choice["o"].out == (S(0), S(0))
    names = [n.name for n in graph.nodes]
    assert sigs["h"][arg[names.index("h")]].out == (S(0), S(0))


def test_two_axis_data_parallel_gradient_sync_against_the_two_level_all_reduce():
    """2 nodes × 2 devices. Data parallel over both axes of the 2×2 mesh (axis 0 across nodes,
    axis 1 within) reduces a gradient of G bytes with an all-reduce per axis, intra first:
    2·(1/2)·G within the node, then 2·(1/2)·G across nodes. The one-axis mesh of 4 prices the
    same all-reduce two-level (cluster.py: 2·(3/4)·G sent, a share φ = (N−1)/(n−1) = 1/3 of it
    across nodes: G/2). So the nested plan sends as many bytes in all but twice the inter-node
    bytes (g× in general: its inter-node all-reduce moves the whole gradient, NCCL's
    hierarchical ring 1/g of it): the solver prefers the one-axis mesh for plain DP when the
    inter-node link is the slow one."""
    g_bytes = 1e6
    c = cluster(devices=4, nodes=2, gbps=100, inter_gbps=10, latency_s=0.0)
    two, one = c.mesh((2, 2)), c.mesh((4,))
    assert two.axes[0].spans_nodes and not two.axes[1].spans_nodes
    steps = reshard_steps((P, P), (B, B), g_bytes, two.shape)
    assert [(s.axis, s.kind, s.bytes_per_device) for s in steps] == [
        (0, "all_reduce", g_bytes), (1, "all_reduce", g_bytes)]  # equal sizes: by index
    nested_s = sum(two.axes[s.axis].step_seconds(s.kind, s.bytes_per_device, 0) for s in steps)
    (flat,) = reshard_steps((P,), (B,), g_bytes, one.shape)
    assert flat.bytes_per_device == pytest.approx(1.5 * g_bytes)
    flat_s = one.axes[0].step_seconds("all_reduce", flat.bytes_per_device, 0)
    intra, inter = 1 / (100e9), 1 / (10e9)
    assert nested_s == pytest.approx(g_bytes * intra + g_bytes * inter, rel=1e-12)
    assert flat_s == pytest.approx(g_bytes * intra + 0.5 * g_bytes * inter, rel=1e-12)
    assert nested_s > flat_s


@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 2, 2)])
def test_data_parallel_signatures_are_offered(mesh_shape):
    """Every linear of the MLP may split its batch on all axes at once (and the loss with it,
    its mean scaled on each axis)."""
    graph = mlp_graph(batch=16, d_in=4, hidden=8, d_out=4)
    all_zero = tuple(S(0) for _ in mesh_shape)
    for name in ("h", "o"):
        outs = {s.out for s in signatures(graph[name], graph, mesh_shape)}
        assert all_zero in outs
    loss = [s for s in signatures(graph["loss"], graph, mesh_shape)
            if s.ins[0] == all_zero and s.ins[1] == all_zero]
    assert loss and all(a.scale for a in loss[0].axes)
    assert all(a == b for a, b in itertools.pairwise(loss[0].out)) and loss[0].out[0] == P


def test_signature_cache_tells_meshes_apart_by_nested_divisibility():
    """A dim of 6 splits on both axes of (2, 3) (6 pieces) but not of (2, 2) (4 pieces), though
    each axis size divides 6 on both meshes: the planner's signature cache must not share them."""
    from autoddl.engine.costs import _signatures

    f = "float32"
    graph = OpGraph((
        OpNode("x", "input", "input", TensorMeta((6, 6), f)),
        OpNode("y", "op", "aten.relu.default", TensorMeta((6, 6), f), ("x",), (TensorArg(0),)),
    ), "y")
    for shape in [(2, 3), (2, 2)]:
        got = {s.out for s in _signatures(graph["y"], graph, shape)}
        assert got == {s.out for s in signatures(graph["y"], graph, shape)}
        assert ((S(0), S(0)) in got) == (shape == (2, 3))
