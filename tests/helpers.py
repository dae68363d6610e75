"""Hand-built graphs and small utilities shared by the tests."""

from __future__ import annotations

from autoddl.engine.cluster import Cluster, Link
from autoddl.engine.compute import ComputeFigures
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta


def cluster(devices: int = 2, memory_bytes: int = 2**40, gbps: float = 10.0,
            latency_s: float = 1e-5, peak_flops: float = 1e12, nodes: int = 1,
            inter_gbps: float | None = None, overlap: bool = True) -> Cluster:
    """A synthetic cluster with round numbers: matmuls at the peak, other operators free;
    ``overlap=False`` puts every collective on the critical path (nothing runs behind
    compute)."""
    per_node = devices // nodes
    return Cluster("test", nodes, per_node, Link(gbps, latency_s),
                   Link(inter_gbps or gbps, latency_s), memory_bytes, peak_flops, "cpu", "test",
                   compute=ComputeFigures(overlap=overlap))


def mlp_graph(batch: int, d_in: int, hidden: int, d_out: int, bias: bool = False) -> OpGraph:
    """x -> linear(W1) -> gelu -> linear(W2) -> mse(target), built by hand."""
    f = "float32"
    lin = "aten.linear.default"
    n = [
        OpNode("w1", "param", "param", TensorMeta((hidden, d_in), f), requires_grad=True,
               fqn="w1"),
        OpNode("w2", "param", "param", TensorMeta((d_out, hidden), f), requires_grad=True,
               fqn="w2"),
        OpNode("x", "input", "input", TensorMeta((batch, d_in), f)),
        OpNode("y", "input", "input", TensorMeta((batch, d_out), f)),
    ]
    if bias:
        n.append(OpNode("b1", "param", "param", TensorMeta((hidden,), f), requires_grad=True,
                        fqn="b1"))
    ins1 = ("x", "w1", "b1") if bias else ("x", "w1")
    n += [
        OpNode("h", "op", lin, TensorMeta((batch, hidden), f), ins1,
               tuple(TensorArg(i) for i in range(len(ins1))), flops=2.0 * batch * d_in * hidden,
               requires_grad=True),
        OpNode("a", "op", "aten.gelu.default", TensorMeta((batch, hidden), f), ("h",),
               (TensorArg(0),), flops=batch * hidden, requires_grad=True),
        OpNode("o", "op", lin, TensorMeta((batch, d_out), f), ("a", "w2"),
               (TensorArg(0), TensorArg(1)), flops=2.0 * batch * hidden * d_out,
               requires_grad=True),
        OpNode("loss", "op", "aten.mse_loss.default", TensorMeta((), f), ("o", "y"),
               (TensorArg(0), TensorArg(1)), flops=batch * d_out, requires_grad=True),
    ]
    return OpGraph(tuple(n), "loss")


def microbatch_graph(spec_text: str, microbatches: int) -> OpGraph:
    """The graph of one micro-batch of a built-in model: its example inputs sliced to their
    first batch/microbatches rows (what a pipelined plan is made on)."""
    from autoddl.engine.capture import capture
    from autoddl.engine.models import build_model, parse_model_spec
    from autoddl.engine.capture import microbatch_inputs

    model, inputs = build_model(parse_model_spec(spec_text), "meta")
    return capture(model, microbatch_inputs(inputs, microbatches))


def _balanced_cuts(n_ops: int, stages: int, forbidden: set[int]) -> list[int]:
    """Cut positions 0 < c_1 < ... < c_{K-1} < n_ops (op c starts a stage) nearest to an even
    split of the op count, avoiding ``forbidden`` positions."""
    allowed = [c for c in range(1, n_ops) if c not in forbidden]
    cuts: list[int] = []
    for k in range(1, stages):
        target = k * n_ops / stages
        lo = cuts[-1] if cuts else 0
        # leave room for the remaining stages to get one op each
        room = [c for c in allowed if c > lo and
                len([d for d in allowed if d > c]) >= stages - 1 - k]
        if not room:
            raise ValueError(f"cannot cut {n_ops} ops into {stages} stages")
        cuts.append(min(room, key=lambda c: (abs(c - target), c)))
    return cuts


def make_pipelined_plan(plan, stages: int, microbatches: int, schedule: str = "1F1B",
                        graph: OpGraph | None = None):
    """A pipelined copy of ``plan``, an unpipelined plan made on the micro-batch graph (the model
    spec's inputs sliced to batch/microbatches rows) on a cluster of stage-mesh size.

    Stages are contiguous chunks of operators in graph order balanced by operator count (FLOPs
    ignored), never cutting between two readers of one parameter; parameters go to their
    readers' stage, user inputs to stage 0, the loss (last op) to stage K-1. The cost is the
    micro-batch plan's scaled by the micro-batch count (every collective runs once per
    micro-batch) except the backward conversions of weight gradients accumulated over the
    micro-batches (``accumulates_grad``), which run once per step, plus ``per_kind["p2p"]`` (and
    ``per_axis["pp"]``, ``per_axis_kind["pp"]["p2p"]``): the point-to-point sends the runtime
    executes — one per tensor per boundary crossed per micro-batch forward, one more backward
    for a tensor carrying a gradient, bytes = the producer's local piece.
    """
    import dataclasses

    from autoddl.runtime.pipeline import p2p_per_step

    assert plan.pipeline is None, "plan is already pipelined"
    if graph is None:
        graph = microbatch_graph(plan.model["spec"], microbatches)
    assert graph.digest() == plan.model["graph_hash"], "plan was not made on the micro-batch graph"
    ops = graph.ops
    pos = {n.name: i for i, n in enumerate(ops)}
    forbidden: set[int] = set()
    for p in graph.params:
        readers = [pos[n.name] for n in ops if p.name in n.inputs]
        if readers:
            forbidden.update(range(min(readers) + 1, max(readers) + 1))
    cuts = _balanced_cuts(len(ops), stages, forbidden)
    stage: dict[str, int] = {}
    for i, n in enumerate(ops):
        stage[n.name] = sum(1 for c in cuts if i >= c)
    for n in graph.nodes:
        if n.kind == "input":
            stage[n.name] = 0
        elif n.kind == "param":
            readers = [stage[c.name] for c in ops if n.name in c.inputs]
            stage[n.name] = readers[0] if readers else 0
    assert stage[graph.loss] == stages - 1
    bw, lat = 10.0, 1e-5
    new = dataclasses.replace(
        plan, ops=tuple(dataclasses.replace(o, stage=stage[o.name]) for o in plan.ops),
        pipeline={"stages": stages, "microbatches": microbatches, "schedule": schedule,
                  "axis": {"name": "pp", "size": stages, "bandwidth_gbps": bw,
                           "latency_s": lat}})
    m = microbatches
    sends = p2p_per_step(graph, new)
    p2p = {"bytes": sends["bytes"], "count": int(sends["count"]),
           "seconds": sends["bytes"] / (bw * 1e9) + sends["count"] * lat}

    def scaled(d: dict) -> dict:
        return {k: (int(v * m) if k == "count" else v * m) for k, v in d.items()}

    cost = dict(plan.cost)
    cost["per_kind"] = {k: scaled(v) for k, v in plan.cost["per_kind"].items()}
    cost["per_kind"]["p2p"] = p2p
    cost["per_axis"] = {k: scaled(v) for k, v in plan.cost["per_axis"].items()}
    cost["per_axis"]["pp"] = p2p
    cost["per_axis_kind"] = {a: {k: scaled(v) for k, v in kinds.items()}
                             for a, kinds in plan.cost["per_axis_kind"].items()}
    cost["per_axis_kind"]["pp"] = {"p2p": dict(p2p)}
    for key in ("total_s", "bandwidth_s", "bytes_per_device"):
        cost[key] = plan.cost[key] * m + (p2p["bytes"] if key == "bytes_per_device"
                                          else p2p["seconds"])
    for axis, kind, nbytes, secs in _accumulated_steps(graph, plan):  # counted m times: once
        for bucket in (cost["per_kind"][kind], cost["per_axis"][axis],
                       cost["per_axis_kind"][axis][kind]):
            bucket["count"] -= m - 1
            bucket["bytes"] -= (m - 1) * nbytes
            bucket["seconds"] -= (m - 1) * secs
        cost["total_s"] -= (m - 1) * secs
        cost["bandwidth_s"] -= (m - 1) * secs
        cost["bytes_per_device"] -= (m - 1) * nbytes
    return dataclasses.replace(new, cost=cost, memory=dict(plan.memory))


def _accumulated_steps(graph: OpGraph, plan) -> list[tuple[str, str, float, float]]:
    """(axis, kind, bytes, seconds) of each collective converting a weight gradient that a
    pipelined step accumulates over its micro-batches (once per step)."""
    from autoddl.engine.cluster import Mesh
    from autoddl.engine.costs import (
        accumulated_edges, accumulates_grad, edge_steps, grad_fraction, grad_sync_share,
        step_seconds,
    )
    from autoddl.engine.precision import plan_precision, tensor_bytes
    from autoddl.runtime.execute import find_signature

    mesh = Mesh.from_dict(plan.mesh)
    out = []
    for src, dst, i in accumulated_edges(graph):
        s_src, s_dst = (find_signature(graph, n, plan, mesh.shape) for n in (src, dst))
        if accumulates_grad(grad_fraction(s_src, mesh.shape), s_dst.grads[i], mesh.shape):
            nbytes = tensor_bytes(graph[src].out, plan_precision(plan.training))
            _, bwd = edge_steps(nbytes, s_src.out, s_dst.ins[i], s_dst.grads[i], mesh)
            out += [(mesh.axes[st.axis].name, st.kind, st.bytes_per_device,
                     step_seconds(st, mesh, grad_sync_share(graph, src, s_dst.grads[i],
                                                            mesh.shape)))
                    for st in bwd if st.kind not in ("slice", "none")]
    return out


def run_checked(path, steps: int = 2, require: tuple[str, ...] = (), tol: float = 1e-5) -> str:
    """``autoddl run PATH --check``: assert it passes, that every collective kind in its table
    (and each kind in ``require``) was predicted, executed and seen equally, bytes included, and
    that its bytes per (mesh axis, kind) match the plan (:func:`check_byte_table`)."""
    import re
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "autoddl.cli", "run", str(path), "--steps", str(steps), "--check",
         "--tol", str(tol)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "check PASSED" in out, out
    assert len(re.findall(r"^step \d+: loss", out, re.M)) == steps
    table = re.findall(
        r"^(all_\w+|reduce_scatter|p2p)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    assert table, out
    for kind in require:
        assert any(k == kind for k, *_ in table), (kind, out)
    for kind, predicted, executed, seen, pbytes, ebytes in table:
        assert predicted == executed == seen, (kind, predicted, executed, seen)
        assert pbytes == ebytes, (kind, pbytes, ebytes)
    check_byte_table(out, path)
    return out


#: one row of ``autoddl run``'s byte table: axis, kind, predicted and executed count, predicted
#: and executed bytes, relative difference (%), status
BYTE_ROW = (r"^(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([-+]\d+\.\d+) %"
            r"\s+(ok|MISMATCH)\b")


def check_byte_table(out: str, path) -> None:
    """The run's bytes per (mesh axis, kind) table has a row for every (axis, kind) the plan
    file predicts any collective for, each row predicted = executed (count, and bytes within
    1 %), and the verdict line says so."""
    import json
    import re
    from pathlib import Path

    rows = {(a, k): (int(pc), int(ec), float(pb), float(eb), float(rel), st)
            for a, k, pc, ec, pb, eb, rel, st in re.findall(BYTE_ROW, out, re.M)}
    assert rows, out
    cost = json.loads(Path(path).read_text())["cost"]
    want = {(a, k) for a, kinds in cost["per_axis_kind"].items() for k, v in kinds.items()
            if v["count"]}
    assert want and want <= set(rows), (sorted(want - set(rows)), out)
    for key, (pc, ec, pb, eb, rel, st) in rows.items():
        assert st == "ok" and pc == ec and abs(rel) <= 1.0, (key, rows[key], out)
        assert abs(eb - pb) <= max(0.01 * pb, 1.0), (key, rows[key])
    assert "byte check passed" in out and "MISMATCH" not in out, out


def all_orders(pl, mesh_shape) -> list:
    """Placement ``pl`` in every order of its nested dims (the default order first)."""
    from autoddl.engine.mesh_signatures import order_variants
    from autoddl.engine.rules import Signature

    return [s.out for s in order_variants(Signature((), tuple(pl), (), ()), mesh_shape)]


def piece(full: "np.ndarray", pl, mesh_shape, coord) -> "np.ndarray":
    """The piece of ``full`` device ``coord`` holds under ``pl``, by the definition: each split
    dim cut into the product of its axes' sizes, chunk number the mixed-radix number of the
    coordinates on those axes in their order (outer most significant)."""
    import numpy as np

    from autoddl.engine.placements import split_orders

    out = full
    for d, seq in split_orders(pl).items():
        index, count = 0, 1
        for a in seq:
            index, count = index * mesh_shape[a] + coord[a], count * mesh_shape[a]
        out = np.split(out, count, axis=d)[index]
    return out
