"""Topology-aware collective pricing (two-level rings on axes spanning nodes) and gradient
buckets, checked against hand-computed algorithms (intra-node and inter-node parts summed
separately), not against the formula they test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autoddl.engine.baselines import _data_parallel
from autoddl.engine.cluster import Mesh, MeshAxis, parse_cluster
from autoddl.engine.costs import (
    BUCKET_BYTES, breakdown, predicted_collectives, step_seconds,
)
from autoddl.engine.placements import reshard_steps
from autoddl.engine.reshard_table import unit_matrices
from autoddl.engine.rules import ZERO_REGATHER
from autoddl.engine.workload import Workload
from tests.helpers import cluster, mlp_graph

MiB = 2**20
T = 64 * MiB  # the tensor converted, bytes per device before the step
# dgx-a100: NVLink 300 GB/s, 5 µs; InfiniBand 25 GB/s per GPU, 10 µs
BW_INTRA, BW_INTER, A_INTRA, A_INTER = 300e9, 25e9, 5e-6, 10e-6


def _dgx(shape: tuple[int, ...], nodes: int = 2) -> Mesh:
    return parse_cluster(f"dgx-a100:nodes={nodes}").mesh(shape)


def _one_step(src: str, dst: str, mesh: Mesh, axis: int = 0):
    pl_src = tuple(src if a == axis else "B" for a in range(mesh.ndim))
    pl_dst = tuple(dst if a == axis else "B" for a in range(mesh.ndim))
    steps = reshard_steps(pl_src, pl_dst, T, mesh.shape)
    assert steps is not None and len(steps) == 1
    return steps[0]


def _table_seconds(src: str, dst: str, mesh: Mesh, nbytes: float) -> float:
    """The same conversion priced by the vectorized table the ILP uses."""
    fb, fl, *_ = unit_matrices([(src,)], [((dst,), None)], mesh)
    return float(fb[0, 0] * nbytes + fl[0, 0])


def _ar_steps(n: int) -> int:
    """An all-reduce's α steps on n ranks: NCCL's double binary tree, ⌈log2 n⌉ hops up and
    down + 1 to start, never more than the ring's 2(n−1)+1."""
    return min(2 * (n - 1) + 1, 2 * math.ceil(math.log2(n)) + 1)


def _latency(steps: int, n: int, inter_share: float) -> float:
    return steps * ((1 - inter_share) * A_INTRA + inter_share * A_INTER)


def test_mesh_records_ranks_per_node_and_both_links():
    (x,) = _dgx((16,)).axes
    assert (x.spans_nodes, x.ranks_per_node, x.nodes_spanned) == (True, 8, 2)
    assert (x.bandwidth_gbps, x.intra_bandwidth_gbps) == (25.0, 300.0)
    assert (x.latency_s, x.intra_latency_s) == (pytest.approx(1e-5), pytest.approx(5e-6))
    rail, node = _dgx((2, 8)).axes  # axis 0: rank r and r + 8, one GPU per node
    assert (rail.ranks_per_node, rail.nodes_spanned, node.ranks_per_node) == (1, 2, 8)
    a, b = _dgx((4, 4)).axes  # axis 0: ranks r, r+4 on one node, r+8, r+12 on the other
    assert (a.ranks_per_node, a.nodes_spanned, b.spans_nodes) == (2, 2, False)
    # 3 nodes, mesh (4, 6): axis 0's groups {0, 6, 12, 18} hold 2, 1, 1 ranks per node
    uneven = parse_cluster("dgx-a100:nodes=3").mesh((4, 6)).axes[0]
    assert (uneven.ranks_per_node, uneven.spans_nodes) == (1, True)  # flat ring


def test_two_level_all_reduce_by_hand():
    """16 ranks on 2 nodes (g = 8, N = 2): intra reduce-scatter, inter all-reduce of T/8 over 8
    rails, intra all-gather."""
    mesh = _dgx((16,))
    g, N, n = 8, 2, 16
    intra_bytes = 2 * (g - 1) / g * T  # reduce-scatter + all-gather inside the node
    inter_bytes = 2 * (N - 1) / N * T / g  # all-reduce across nodes of one rail's 1/g
    assert intra_bytes + inter_bytes == pytest.approx(2 * (n - 1) / n * T)  # a flat ring's
    want = (intra_bytes / BW_INTRA + inter_bytes / BW_INTER
            + _latency(_ar_steps(n), n, inter_bytes / (intra_bytes + inter_bytes)))
    step = _one_step("P", "B", mesh)
    assert step_seconds(step, mesh) == pytest.approx(want, rel=1e-12)
    assert _table_seconds("P", "B", mesh, T) == pytest.approx(want, rel=1e-12)
    flat = 2 * (n - 1) / n * T / BW_INTER + _ar_steps(n) * A_INTER
    assert want < flat / 5  # 15/16 of the bytes ride NVLink


def test_two_level_reduce_scatter_and_4x4_axis_by_hand():
    """reduce-scatter on 16 ranks; and the all-reduce of a 4-rank group with 2 ranks on each of
    2 nodes (mesh (4, 4), axis 0)."""
    mesh = _dgx((16,))
    intra, inter = 7 / 8 * T, 1 / 2 * T / 8
    want = intra / BW_INTRA + inter / BW_INTER + _latency(16, 16, inter / (intra + inter))
    assert step_seconds(_one_step("P", "S(0)", mesh), mesh) == pytest.approx(want, rel=1e-12)
    assert _table_seconds("P", "S(0)", mesh, T) == pytest.approx(want, rel=1e-12)

    mesh = _dgx((4, 4))
    intra, inter = 2 * 1 / 2 * T, 2 * 1 / 2 * T / 2  # g = 2, N = 2
    want = intra / BW_INTRA + inter / BW_INTER + _latency(_ar_steps(4), 4, inter / (intra + inter))
    assert inter / (intra + inter) == pytest.approx(1 / 3)  # (N-1)/(n-1)
    assert step_seconds(_one_step("P", "B", mesh), mesh) == pytest.approx(want, rel=1e-12)


def test_rail_axis_is_a_flat_ring_on_the_inter_node_link():
    """Mesh (2, 8), axis 0: one GPU per node in each group (g = 1), every byte over its NIC."""
    mesh = _dgx((2, 8))
    want = 2 * 1 / 2 * T / BW_INTER + 3 * A_INTER
    step = _one_step("P", "B", mesh, axis=0)
    assert step_seconds(step, mesh) == pytest.approx(want, rel=1e-12)
    # the axis inside a node: NVLink only
    step = _one_step("P", "B", mesh, axis=1)
    assert step_seconds(step, mesh) == pytest.approx(
        2 * 7 / 8 * T / BW_INTRA + _ar_steps(8) * A_INTRA, rel=1e-12)
    assert _ar_steps(8) == 7 and _ar_steps(2) == 3  # the tree beats the ring's 15 from 3 ranks


def test_all_to_all_inter_share():
    """S(0) -> S(1) on 16 ranks over 2 nodes: each rank holds T/16 and sends T/256 to each other
    rank, 7 of them on its node (NVLink), 8 on the other (its NIC)."""
    mesh = _dgx((16,))
    intra, inter = 7 * T / 256, 8 * T / 256
    want = intra / BW_INTRA + inter / BW_INTER + _latency(16, 16, 8 / 15)
    step = _one_step("S(0)", "S(1)", mesh)
    assert step.kind == "all_to_all" and step.bytes_per_device == pytest.approx(intra + inter)
    assert step_seconds(step, mesh) == pytest.approx(want, rel=1e-12)
    assert _table_seconds("S(0)", "S(1)", mesh, T) == pytest.approx(want, rel=1e-12)


def test_old_mesh_dict_loads_as_a_flat_ring_and_new_dicts_round_trip():
    old = {"axes": [{"name": "x", "size": 16, "bandwidth_gbps": 25.0, "latency_s": 1e-5,
                     "spans_nodes": True},
                    {"name": "y", "size": 2, "bandwidth_gbps": 300.0, "latency_s": 5e-6,
                     "spans_nodes": False}]}
    mesh = Mesh.from_dict(old)
    x, y = mesh.axes
    assert (x.ranks_per_node, x.intra_bandwidth_gbps, y.ranks_per_node) == (1, 25.0, 2)
    step = _one_step("P", "B", mesh)
    assert step_seconds(step, mesh) == pytest.approx(
        2 * 15 / 16 * T / BW_INTER + _ar_steps(16) * A_INTER, rel=1e-12)
    new = _dgx((16,))
    d = json.loads(json.dumps(new.to_dict()))
    assert d["axes"][0]["ranks_per_node"] == 8 and d["axes"][0]["intra_bandwidth_gbps"] == 300.0
    assert Mesh.from_dict(d) == new


def test_inconsistent_ranks_per_node_is_a_user_error():
    from autoddl.errors import UserError

    with pytest.raises(UserError, match="ranks_per_node"):
        MeshAxis("x", 16, 25.0, 1e-5, True, 3)
    with pytest.raises(UserError, match="ranks_per_node"):
        MeshAxis("x", 4, 25.0, 1e-5, False, 2)


def test_old_plan_file_loads_and_shows(tmp_path):
    """A plan file written before the topology keys (mesh axes without them) loads and shows."""
    from autoddl.cli import main
    from autoddl.engine.plan import load_plan, save_plan, summary
    from autoddl.engine.planner import plan_graph

    c = cluster(devices=4, nodes=2, gbps=100, inter_gbps=10)
    plan = plan_graph(mlp_graph(8, 8, 16, 8), c, meshes=[c.mesh((4,))], model_spec="mlp")
    save_plan(plan, tmp_path / "new.json")
    d = json.loads((tmp_path / "new.json").read_text())
    assert d["mesh"]["axes"][0]["ranks_per_node"] == 2
    for ax in d["mesh"]["axes"]:
        for key in ("ranks_per_node", "intra_bandwidth_gbps", "intra_latency_s"):
            del ax[key]
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = load_plan(tmp_path / "old.json")
    assert Mesh.from_dict(old.mesh).axes[0].ranks_per_node == 1
    assert main(["show", str(tmp_path / "old.json")]) == 0
    assert "x=4 (10 GB/s across nodes, 2 per node at 100 GB/s)" in summary(plan)
    assert "x=4 (10 GB/s)" in summary(old)


# ---------------------------------------------------------------------------------------------
# gradient buckets
# ---------------------------------------------------------------------------------------------

P = 4  # data-parallel devices
GBPS, ALPHA = 10.0, 1e-5


def _dp(zero: int = 0):
    """The data-parallel plan of an MLP whose weights are 4 MiB and 2 MiB, on 4 devices of one
    node (a flat link: the bucket is the only change)."""
    graph = mlp_graph(batch=64, d_in=1024, hidden=1024, d_out=512)
    work = Workload("mlp", graph, cluster(devices=P, gbps=GBPS, latency_s=ALPHA))
    costed, choice = _data_parallel(work, zero)
    return graph, costed, choice


def _ilp_cost(costed, choice) -> float:
    """The ILP's objective at ``choice`` (its node and edge cost matrices)."""
    pick = np.array([costed.sigs[n.name].index(choice[n.name]) for n in costed.graph.nodes])
    return costed.problem.evaluate(pick)[0]


def test_data_parallel_gradient_sync_latency_is_per_bucket():
    graph, costed, choice = _dp()
    colls = predicted_collectives(costed, choice)
    sync = [c for c in colls if c.direction == "backward" and graph[c.src].kind == "param"]
    assert sorted(c.src for c in sync) == ["w1", "w2"] and {c.kind for c in sync} == {"all_reduce"}
    for c in sync:
        w = graph[c.src].out.nbytes
        assert w in (4 * MiB, 2 * MiB)
        want = 2 * (P - 1) / P * w / (GBPS * 1e9) + _ar_steps(P) * ALPHA * w / BUCKET_BYTES
        assert c.seconds == pytest.approx(want, rel=1e-12)
    # ILP objective and breakdown agree (and hold nothing but the sync and the loss's gather)
    total = breakdown(costed, choice)
    assert _ilp_cost(costed, choice) == pytest.approx(total["total_s"], rel=1e-12)
    rest = sum(c.seconds * c.copies for c in colls if c not in sync)
    assert total["bandwidth_s"] == pytest.approx(sum(c.seconds for c in sync) + rest, rel=1e-12)


def test_zero3_gathers_keep_full_latency_and_reduce_scatters_are_bucketed():
    graph, costed, choice = _dp(ZERO_REGATHER)
    colls = [c for c in predicted_collectives(costed, choice) if graph[c.src].kind == "param"]
    fwd = [c for c in colls if c.direction == "forward"]
    bwd = [c for c in colls if c.direction == "backward"]
    assert {c.kind for c in fwd} == {"all_gather"} and {c.kind for c in bwd} == {"reduce_scatter"}
    for c in fwd:  # gathered again in backward: two copies, each its full latency chain
        w = graph[c.src].out.nbytes
        assert c.copies == 2
        assert c.seconds == pytest.approx((P - 1) / P * w / (GBPS * 1e9) + P * ALPHA, rel=1e-12)
    for c in bwd:
        w = graph[c.src].out.nbytes
        assert c.seconds == pytest.approx(
            (P - 1) / P * w / (GBPS * 1e9) + P * ALPHA * w / BUCKET_BYTES, rel=1e-12)
    assert _ilp_cost(costed, choice) == pytest.approx(breakdown(costed, choice)["total_s"],
                                                      rel=1e-12)
