"""Byte truth, without launching: the plan's bytes per (mesh axis, kind) and the comparison that
``autoddl run --check`` makes with the bytes the ranks sent (:func:`autoddl.runtime.worker.
byte_check`). The launched runtime tests check every runtime plan end to end
(``tests.helpers.check_byte_table``) and one tampered plan failing."""

from __future__ import annotations

import json

import pytest

from autoddl.engine.capture import capture
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import Plan
from autoddl.engine.planner import plan_graph
from autoddl.runtime.worker import BYTE_FLOOR, aggregate_measured, byte_check
from tests.helpers import cluster, microbatch_graph

MLP = "mlp:batch=32,dim_in=16,hidden=32,layers=2,dim_out=16"


def _consistent(cost: dict) -> None:
    """per_axis_kind sums to per_axis over kinds and to per_kind over axes."""
    pak = cost["per_axis_kind"]
    assert set(pak) == set(cost["per_axis"])
    for axis, kinds in pak.items():
        for field in ("bytes", "count", "seconds"):
            assert sum(v[field] for v in kinds.values()) == pytest.approx(
                cost["per_axis"][axis][field], rel=1e-9, abs=1e-12), (axis, field)
    for kind, v in cost["per_kind"].items():
        for field in ("bytes", "count", "seconds"):
            assert sum(kinds[kind][field] for kinds in pak.values() if kind in kinds) == \
                pytest.approx(v[field], rel=1e-9, abs=1e-12), (kind, field)


def test_per_axis_kind_adds_up_and_round_trips_unpipelined():
    spec = parse_model_spec(MLP)
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, meshes=[c.mesh((2, 2))])
    _consistent(plan.cost)
    assert any(plan.cost["per_axis_kind"].values())
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.cost["per_axis_kind"] == plan.cost["per_axis_kind"]


def test_per_axis_kind_of_a_pipelined_plan_has_the_sends():
    spec = parse_model_spec(MLP)
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, microbatch_graph=microbatch_graph(MLP, 4),
                      microbatches=4, stages=2, balance_eps=2.0)
    assert plan.pipeline and plan.num_stages == 2
    _consistent(plan.cost)
    pp = plan.pipeline["axis"]["name"]
    assert set(plan.cost["per_axis_kind"][pp]) == {"p2p"}
    assert plan.cost["per_axis_kind"][pp]["p2p"]["count"] > 0


def test_aggregate_takes_each_stages_busiest_device_and_sums_stages():
    logs = [  # (stage, {(axis, kind): [count, bytes]}) of four ranks, two per stage
        (0, {("x", "all_reduce"): [2, 100.0], ("pp", "p2p"): [4, 400.0]}),
        (0, {("x", "all_reduce"): [2, 100.0], ("pp", "p2p"): [4, 400.0]}),
        (1, {("x", "all_reduce"): [3, 300.0], ("pp", "p2p"): [2, 200.0]}),
        (1, {("pp", "p2p"): [2, 200.0]}),  # this rank ran no all-reduce
    ]
    m = aggregate_measured(logs)
    assert m[("x", "all_reduce")] == {"count": 5, "bytes": 400.0, "min_bytes": 100.0}
    assert m[("pp", "p2p")] == {"count": 6, "bytes": 600.0, "min_bytes": 600.0}


def _pred(**entries) -> dict:
    out: dict = {"x": {}, "y": {}}
    for key, (count, nbytes) in entries.items():
        axis, kind = key.split("_", 1)
        out[axis][kind] = {"count": count, "bytes": nbytes, "seconds": 0.0}
    return out


def _meas(**entries) -> dict:
    return {tuple(k.split("_", 1)): {"count": c, "bytes": b, "min_bytes": b}
            for k, (c, b) in entries.items()}


def test_byte_check_statuses():
    pred = _pred(x_all_reduce=(4, 1000.0), y_all_gather=(2, 500.0), y_all_reduce=(1, 4.0))
    same = byte_check(pred, _meas(x_all_reduce=(4, 1000.0), y_all_gather=(2, 500.0),
                                  y_all_reduce=(1, 4.0)))
    assert [(r.axis, r.kind, r.status) for r in same] == [
        ("x", "all_reduce", "ok"), ("y", "all_gather", "ok"), ("y", "all_reduce", "ok")]
    assert all(r.rel_diff == 0.0 for r in same)
    # predicted ×1.1 (the tampered plan): executed is 9.1 % less
    tampered = _pred(x_all_reduce=(4, 1100.0), y_all_gather=(2, 500.0), y_all_reduce=(1, 4.0))
    rows = {(r.axis, r.kind): r for r in byte_check(tampered, _meas(
        x_all_reduce=(4, 1000.0), y_all_gather=(2, 500.0), y_all_reduce=(1, 4.0)))}
    assert rows[("x", "all_reduce")].status == "MISMATCH"
    assert rows[("x", "all_reduce")].rel_diff == pytest.approx(-100 / 1100)
    assert rows[("y", "all_gather")].status == "ok"
    # within 1 %: fine; the count must be equal
    near = byte_check(pred, _meas(x_all_reduce=(4, 1009.0), y_all_gather=(3, 500.0),
                                  y_all_reduce=(1, 4.0)))
    assert [r.status for r in near] == ["ok", "MISMATCH", "ok"]
    # tiny totals: compared against BYTE_FLOOR bytes (sub-byte noise passes, 4 B more fails)
    assert BYTE_FLOOR == 64.0
    tiny = byte_check(pred, _meas(x_all_reduce=(4, 1000.0), y_all_gather=(2, 500.0),
                                  y_all_reduce=(1, 4.5)))
    assert tiny[2].status == "ok"
    tiny = byte_check(pred, _meas(x_all_reduce=(4, 1000.0), y_all_gather=(2, 500.0),
                                  y_all_reduce=(1, 8.0)))
    assert tiny[2].status == "MISMATCH"
    # executed but not predicted on a predicted axis: predicted 0, a mismatch; predicted but
    # not executed: a mismatch
    extra = {(r.axis, r.kind): r.status for r in byte_check(pred, _meas(
        x_all_reduce=(4, 1000.0), x_all_to_all=(1, 96.0), y_all_reduce=(1, 4.0)))}
    assert extra == {("x", "all_reduce"): "ok", ("y", "all_gather"): "MISMATCH",
                     ("y", "all_reduce"): "ok", ("x", "all_to_all"): "MISMATCH"}


def test_byte_check_says_what_it_cannot_predict():
    # an axis the plan does not name, and a plan file without per_axis_kind
    rows = byte_check(_pred(x_all_reduce=(1, 8.0)), _meas(x_all_reduce=(1, 8.0),
                                                          pp_p2p=(2, 64.0)))
    assert [(r.axis, r.kind, r.status) for r in rows] == [
        ("x", "all_reduce", "ok"), ("pp", "p2p", "not predicted")]
    assert rows[1].rel_diff is None and rows[1].predicted_bytes is None
    rows = byte_check(None, _meas(x_all_reduce=(1, 8.0)))
    assert [r.status for r in rows] == ["not predicted"]
