"""Interleaved 1F1B (v model chunks per device) as a planner choice: the plan's step is
Megatron's formula over stage times computed here from the real layers, the planner takes v = 2
where the smaller bubble pays and v = 1 where the extra transfers cost more, and the plan file
keeps v."""

from __future__ import annotations

import json

import pytest

from autoddl.engine.capture import capture
from autoddl.engine.costs import node_forward_s, passes
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import load_plan, save_plan, summary
from autoddl.engine.plan_check import check_plan_data
from autoddl.engine.planner import plan_graph
from autoddl.engine.programs import (
    build_program, interleave_bound_scale, interleave_options, interleaved,
)
from autoddl.engine.repeat import expand_plan, find_blocks
from autoddl.engine.mesh_signatures import signatures
from autoddl.errors import UserError
from autoddl.runtime.pipeline import boundary_tensors, p2p_per_step
from tests.helpers import cluster, microbatch_graph

SPEC = "gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128"
M = 4  # micro-batches


def _plan(latency_s: float, **kw):
    s = parse_model_spec(SPEC)
    g = capture(*build_model(s, "meta"))
    mb = microbatch_graph(SPEC, M)
    c = cluster(devices=2, latency_s=latency_s, peak_flops=1e9, gbps=10.0)
    plan = plan_graph(g, c, model_spec=s.text, microbatch_graph=mb, microbatches=M, stages=2,
                      **kw)
    return plan, mb, c


def _by_hand(plan, mb, c) -> float:
    """Megatron's step, Σ t_k / v + (m − 1/v) max t_k, with t_k one device's forward and
    backward of its chunks' operators (3 forward passes each, every op on one device) and, as
    the cost model charges them, the sends of all v·K − 1 boundaries (the runtime's boundary
    tensors: forward, and backward for those with gradients) on the receiving last device."""
    full = expand_plan(plan, mb)
    v, K = plan.interleave, plan.num_stages
    t = [0.0] * K
    mesh = cluster(devices=1, peak_flops=c.peak_flops).mesh((1,))  # one device per stage
    for n in mb.ops:
        sig = signatures(n, mb, mesh.shape)[0]
        t[full.op(n.name).stage % K] += passes(n.name, _NoRecompute()) * node_forward_s(
            mb, n, sig, mesh, c, "fp32")
    link = c.intra_node
    for names in boundary_tensors(mb, full):
        for name in names:
            sends = 1 + int(mb[name].requires_grad)
            t[K - 1] += sends * (mb[name].out.nbytes / (link.bandwidth_gbps * 1e9)
                                 + link.latency_s)
    assert len(boundary_tensors(mb, full)) == v * K - 1
    return sum(t) / v + (M - 1 / v) * max(t)


def _NoRecompute():  # noqa: N802 - no layer recomputed
    from autoddl.engine.costs import Multiplicity

    return Multiplicity()


def test_planner_interleaves_where_the_bubble_pays():
    plan, mb, c = _plan(latency_s=1e-7)
    assert plan.interleave == 2 and plan.num_chunks == 4
    assert plan.cost["step_time_s"] == pytest.approx(_by_hand(plan, mb, c), rel=1e-9)
    # the v = 1 plan of the same pipeline is slower, and its step is the 1F1B formula
    plain, _, _ = _plan(latency_s=1e-7, interleave=1)
    assert plain.interleave == 1
    assert plain.cost["step_time_s"] == pytest.approx(_by_hand(plain, mb, c), rel=1e-9)
    assert plan.cost["step_time_s"] < plain.cost["step_time_s"]
    # the bound the search prunes derived candidates with holds
    r = interleave_bound_scale(2, M, 2)
    assert r * plain.cost["step_time_s"] <= plan.cost["step_time_s"]
    # solving every candidate, unscreened, finds the same plan
    unscreened, _, _ = _plan(latency_s=1e-7, screen=False)
    assert unscreened.interleave == 2
    assert unscreened.cost["step_time_s"] == pytest.approx(plan.cost["step_time_s"], rel=1e-9)
    # the plan's predicted sends are the runtime's (v·K − 1 boundaries)
    full = expand_plan(plan, mb)
    assert plan.cost["per_kind"]["p2p"]["count"] == p2p_per_step(mb, full)["count"]
    assert plan.cost["per_kind"]["p2p"]["bytes"] == pytest.approx(
        p2p_per_step(mb, full)["bytes"], rel=1e-12)
    assert "interleaved: 2 model chunks per device (4 chunks of 1 layer)" in summary(plan)


def test_planner_keeps_one_chunk_where_transfers_are_expensive():
    plan, mb, c = _plan(latency_s=5e-3)
    assert plan.interleave == 1
    assert plan.cost["step_time_s"] == pytest.approx(_by_hand(plan, mb, c), rel=1e-9)
    forced, _, _ = _plan(latency_s=5e-3, interleave=2)
    assert forced.interleave == 2
    assert forced.cost["step_time_s"] == pytest.approx(_by_hand(forced, mb, c), rel=1e-9)
    assert forced.cost["step_time_s"] > plan.cost["step_time_s"]


def test_plan_file_round_trip_keeps_v(tmp_path):
    plan, mb, _ = _plan(latency_s=1e-7)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    data = json.loads(path.read_text())
    assert data["pipeline"]["interleave"] == 2
    back = load_plan(path)
    assert back.interleave == 2 and back.num_chunks == 4 and back == plan
    # ops may sit in any of the v·K chunks, not beyond
    data["ops"][-1]["stage"] = 4
    with pytest.raises(UserError, match="stage"):
        check_plan_data(data)
    data["ops"][-1]["stage"] = 3
    data["pipeline"]["interleave"] = 0
    with pytest.raises(UserError, match="interleave"):
        check_plan_data(data)
    data["pipeline"].update(interleave=2, microbatches=3)
    with pytest.raises(UserError, match="interleave"):
        check_plan_data(data)
    data["pipeline"].update(microbatches=4, schedule="GPipe")
    with pytest.raises(UserError, match="1F1B only"):
        check_plan_data(data)
    data["pipeline"].update(schedule="1F1B")
    check_plan_data(data)
    del data["pipeline"]["interleave"]  # read as one chunk per device: chunk 3 is too far
    with pytest.raises(UserError, match="stage is 3"):
        check_plan_data(data)


def test_interleave_options_and_bound():
    assert interleave_options(96, 8, 16) == [1, 2, 3, 4]
    assert interleave_options(105, 35, 280) == [1, 3]
    assert interleave_options(96, 8, 12) == [1]  # micro-batches not a multiple of the stages
    assert interleave_options(8, 1, 4) == [1]
    assert interleave_bound_scale(4, 8, 1) == 1.0
    assert interleave_bound_scale(4, 8, 3) == pytest.approx((8 + 1) / 11)


def test_interleaved_program_counts_every_chunk_boundary():
    mb = microbatch_graph(SPEC, M)
    blocks = find_blocks(mb)
    prog = build_program(mb, blocks, 4, 2, M)
    two = interleaved(prog, 2)
    # K = 2: one boundary per micro-batch at v = 1, three (v·K − 1) at v = 2
    assert sum(prog.crossing.values()) * 3 == sum(two.crossing.values())
    with pytest.raises(ValueError):
        interleaved(prog, 3)


def test_forced_interleave_errors():
    with pytest.raises(UserError, match="--interleave"):
        _plan(latency_s=1e-7, interleave=3)
    with pytest.raises(UserError, match="--interleave"):
        _plan(latency_s=1e-7, interleave=0)
    with pytest.raises(UserError, match="1F1B only"):
        _plan(latency_s=1e-7, interleave=2, schedule="GPipe")
    assert _plan(latency_s=1e-7, schedule="GPipe")[0].interleave == 1  # where 1F1B takes v = 2


@pytest.mark.dist
@pytest.mark.parametrize("devices", [2, 4])
def test_interleaved_run_equals_one_process(tmp_path, devices):
    """`autoddl plan --stages 2 --interleave 2` of a 4-layer GPT: 4 chunks of one layer, rank k
    of the pipeline holding chunks k and k + 2 (on a 2-device stage mesh with 4 ranks). `autoddl
    run --check` under ScheduleInterleaved1F1B: loss and gradients as one process, weights after
    the updates too, and every collective and send, bytes included, as the plan predicts."""
    import re
    import subprocess
    import sys

    from tests.helpers import run_checked

    path = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "autoddl.cli", "plan", "--model", SPEC, "--cluster",
         f"cpu:devices={devices},intra_latency_us=1,tflops=0.01", "-o", str(path),
         "--stages", "2", "--microbatches", str(M), "--interleave", "2"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(path)
    assert plan.interleave == 2 and plan.device_mesh_shape[0] == 2
    assert "interleaved: 2 model chunks per device" in proc.stdout
    out = run_checked(path, steps=2, require=("p2p",), tol=3e-5)
    assert "2 stages × 4 micro-batches (interleaved 1F1B, 2 chunks per stage)" in out
    weights = float(re.search(r"weights after the last update differ by ([0-9.e+-]+)",
                              out).group(1))
    assert weights < 1e-5, out


def test_derived_candidates_pruned_unbuilt_by_their_parents_bound():
    """Where unpipelined plans win, every interleaved candidate is pruned by its v = 1
    parent's bound scaled (never built), and solving every candidate agrees."""
    spec = "gpt:layers=8,hidden=64,heads=4,seq=16,batch=8,vocab=128"
    s = parse_model_spec(spec)
    g = capture(*build_model(s, "meta"))
    mb = microbatch_graph(spec, 4)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    plans = [plan_graph(g, c, model_spec=s.text, microbatch_graph=mb, microbatches=4,
                        screen=screen) for screen in (True, False)]
    derived = [(rec, t) for rec, t in zip(plans[0].candidates, plans[0].timings["candidates"])
               if rec.get("interleave", 1) > 1]
    assert {rec["interleave"] for rec, _ in derived} == {2, 4}
    for rec, t in derived:
        assert rec["status"] == "pruned" and rec["bound_from"] == "parent", rec
        assert t.get("build_s") is None, t
        assert rec["lower_bound"] >= plans[0].cost["step_time_s"] * (1 - 1e-6)
    assert plans[0].cost["step_time_s"] == pytest.approx(plans[1].cost["step_time_s"], rel=1e-9)
    assert len(plans[1].candidates) == len(plans[0].candidates)
