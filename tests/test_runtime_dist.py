"""Multi-process runtime on gloo: planned execution equals a single-process run.

Each test plans a model, launches ``autoddl run --check`` on 4 CPU processes (torchrun, gloo), and
checks the verdict printed by rank 0: loss and every gradient within 1e-5 of the single-process
reference, the collectives counted by torch (CommDebugMode) equal to the plan's prediction, and
the bytes sent per device per (mesh axis, kind) equal to the plan's ``per_axis_kind`` within 1 %
(``tests.helpers.check_byte_table``). A plan whose predicted bytes were tampered with fails.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from autoddl.engine.capture import capture
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.placements import P, S
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph
from tests.helpers import cluster, run_checked

pytestmark = pytest.mark.dist


def _plan(spec: str, mesh_shape: tuple[int, ...], path):
    s = parse_model_spec(spec)
    graph = capture(*build_model(s, "meta"))
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10, overlap=False)
    plan = plan_graph(graph, c, model_spec=s.text, meshes=[c.mesh(mesh_shape)])
    save_plan(plan, path)
    return graph, plan


def _run_checked(path, steps: int = 2, tol: float = 1e-5) -> str:
    return run_checked(path, steps, tol=tol)


def test_gpt_mixed_data_and_tensor_parallel_on_2x2(tmp_path):
    path = tmp_path / "plan.json"
    graph, plan = _plan("gpt:layers=2,hidden=64,heads=4,seq=16,batch=8,vocab=128", (2, 2), path)
    lin = [n for n in graph.ops if n.target == "aten.linear.default"]
    dp = [a for a in plan.axis_names if all(plan.op(n.name).out[a] == S(0) for n in lin)]
    tp = [a for a in plan.axis_names
          if any(plan.op(n.name).ins[1][a].startswith("S(") for n in lin)]
    assert dp and tp and set(dp) != set(tp), "plan does not mix data and tensor parallelism"
    assert any(plan.op(n.name).out[tp[0]] == P for n in lin)  # row-parallel partial sums
    out = _run_checked(path, steps=2)
    assert len(re.findall(r"^step \d+: loss", out, re.M)) == 2


def test_mlp_data_parallel_on_4(tmp_path):
    path = tmp_path / "plan.json"
    _plan("mlp:batch=2048,dim_in=32,hidden=64,layers=2,dim_out=32", (4,), path)
    _run_checked(path, steps=2)


@pytest.mark.parametrize("extra", [
    [], ["--stages", "2", "--microbatches", "4"], ["--recompute", "layers"],
    ["--stages", "2", "--microbatches", "4", "--recompute", "layers"],
])
def test_cli_plan_of_repeated_layers_runs_checked(tmp_path, extra):
    """`autoddl plan` captures 3 of the 4 layers and solves one representative; the runtime
    captures all 4, checks the hash and writes the plan out for every layer. With recomputed
    layers the forward collectives run twice, as predicted (the table must agree)."""
    path = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "autoddl.cli", "plan", "--model",
         "gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128", "--cluster",
         "cpu:devices=4,intra_latency_us=1,tflops=0.01", "-o", str(path), *extra],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    plan = json.loads(path.read_text())
    assert plan["model"]["repeat"]["layers"] == 4
    assert any(o["name"].startswith(("mid/", "s0.")) for o in plan["ops"])
    # step 0's gradients agree to ~1e-6; after an Adam update (which divides by the gradient's
    # own magnitude) float32 summation-order noise in tiny gradient entries reaches ~1e-5 in
    # the next step's gradients, steady over steps (not growing: no missing term)
    _run_checked(path, steps=2, tol=3e-5)


def test_check_fails_when_predicted_bytes_are_off(tmp_path):
    """A plan file whose predicted bytes of one (axis, kind) were raised by 10 % (loss and
    gradients still agree): `autoddl run --check` names the pair on a MISMATCH line and exits
    non-zero; without --check the table and the line are printed, and the run succeeds."""
    import json

    spec = parse_model_spec("mlp:batch=64,dim_in=16,hidden=32,layers=1,dim_out=16")
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10)
    path = tmp_path / "plan.json"
    save_plan(plan_graph(graph, c, model_spec=spec.text, meshes=[c.mesh((2,))]), path)
    d = json.loads(path.read_text())
    axis, kinds = next((a, k) for a, k in d["cost"]["per_axis_kind"].items() if k)
    kind = max(kinds, key=lambda k: kinds[k]["bytes"])
    kinds[kind]["bytes"] *= 1.1  # the honest plan is checked by every other runtime test
    path.write_text(json.dumps(d))

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "autoddl.cli", "run", str(path),
                               "--steps", "1", *extra], capture_output=True, text=True,
                              timeout=240)

    proc = run("--check")
    assert proc.returncode != 0, proc.stdout
    out = proc.stdout
    assert re.search(rf"^byte check MISMATCH: {axis}/{kind} executed \d+ B in \d+, predicted "
                     r"\d+ B in \d+ \(-9\.\d\d %\)", out, re.M), out
    assert re.search(rf"^{axis}\s+{kind}\s.*MISMATCH$", out, re.M), out
    assert "check FAILED" in out and "max relative error" in out, out
    assert "autoddl run: failed: --check found a mismatch on rank(s) 0, 1" in proc.stderr, \
        proc.stderr
    plain = run()
    assert plain.returncode == 0, plain.stdout + plain.stderr[-2000:]
    assert f"byte check MISMATCH (not enforced without --check): {axis}/{kind}" in plain.stdout


def test_mlp_data_parallel_over_both_axes_of_2x2_is_nested_and_runs_checked(tmp_path):
    """Plain data parallelism over all 4 ranks of a 2×2 mesh: the batch dim split on both axes
    (``(S(0), S(0))``, nested sharding) and the weights' gradients all-reduced on each axis (the
    two-level all-reduce). The solver picks it; ``--check`` runs it on 4 gloo ranks: loss and
    gradients equal the one-process run, bytes executed equal the plan's."""
    path = tmp_path / "plan.json"
    graph, plan = _plan("mlp:batch=2048,dim_in=32,hidden=64,layers=2,dim_out=32", (2, 2), path)
    lin = [n for n in graph.ops if n.target == "aten.linear.default"]
    both = {a: S(0) for a in plan.axis_names}
    assert all(plan.op(n.name).out == both for n in lin), [plan.op(n.name).out for n in lin]
    out = _run_checked(path, steps=2)
    assert re.search(r"^\S+\s+all_reduce\s", out, re.M), out


def test_weights_stored_in_the_other_nesting_order_run_checked(tmp_path):
    """Weights split on both axes of a 2×2 mesh with axis 1 outer (``(S(0)^1, S(0))``, DTensor's
    ``_StridedShard``), held so and updated so by the optimizer. The first layer reads its
    weight column-parallel on axis 1, ``(B, S(0))``, its batch split on axis 0: one all-gather
    of the inner split (axis 0) forward, one reduce-scatter of the partial gradient into it
    backward. The second reads its weight nested in the
    default order, ``(S(0), S(0))``: a conversion between the two orders (both splits gathered
    and sliced again), forward and backward. The rest is the ILP's choice. ``--check``: loss,
    gradients and bytes per (axis, kind) equal to the plan's."""
    from autoddl.engine.costs import build_problem, edge_steps
    from autoddl.engine.plan import load_plan
    from autoddl.engine.planner import solve_sharding
    from autoddl.engine.workload import load_workload, plan_from_choice

    work = load_workload("mlp:batch=64,dim_in=16,hidden=32,layers=2,dim_out=16",
                         "cpu:devices=4", stages=1)
    costed = work.costed(work.mesh((2, 2)))
    sigs = dict(costed.sigs)
    reversed_ = (S(0, 1), S(0))
    for w, reader, read in [("p_layers_0_weight", "linear", ("B", S(0))),
                            ("p_layers_1_weight", "linear_1", (S(0), S(0)))]:
        sigs[w] = [s for s in sigs[w] if s.out == reversed_ and s.zero == 0]
        sigs[reader] = [s for s in sigs[reader] if s.ins[1] == read
                        and (reader != "linear" or s.out[0] == S(0))]
        assert sigs[w] and sigs[reader]
    restricted = build_problem(costed.graph, costed.mesh, costed.cluster, costed.config,
                               costed.mult, sigs=sigs)
    cand = solve_sharding(restricted, "highs")
    steps = {}
    for w, reader in [("p_layers_0_weight", "linear"), ("p_layers_1_weight", "linear_1")]:
        fwd, bwd = edge_steps(128.0, cand.choice[w].out, cand.choice[reader].ins[1],
                              cand.choice[reader].grads[1], costed.mesh)
        steps[w] = ([(s.axis, s.kind) for s in fwd], [(s.axis, s.kind) for s in bwd])
    assert steps["p_layers_0_weight"] == ([(0, "all_gather")], [(0, "reduce_scatter")])
    assert [k for _, k in steps["p_layers_1_weight"][0]] == [
        "all_gather", "all_gather", "slice", "slice"]
    path = tmp_path / "plan.json"
    save_plan(plan_from_choice(work, restricted, cand.choice, "test", 0.0), path)
    assert load_plan(path).op("p_layers_0_weight").out == {"x": "S(0)^1", "y": "S(0)"}
    _run_checked(path, steps=2)
