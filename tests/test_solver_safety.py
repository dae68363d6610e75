"""Solver safety: a native solver that crashes, solver modules loaded before any fork or thread,
and the edges of the proof (a plan over the memory cap by the solver's tolerance, thresholds at
tiny scales, bounds kept when a solve is cut short, plan files free of timings).

Each check compares with something computed another way: brute force, an unfaulted run, an
independent LP solve.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import autoddl.engine.planner as planner
import autoddl.formulations.solving as solving
from autoddl.engine.capture import capture, microbatch_inputs
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import load_plan
from autoddl.errors import SolverError
from autoddl.formulations.backends import BACKENDS, solve
from autoddl.formulations.backends._isolated import FAULT_ENV
from autoddl.formulations.milp import SolveResult, SolveStatus
from autoddl.formulations.sharding import NodeChoices, ShardingModel, ShardingProblem
from tests.helpers import cluster
from tests.test_backends import make_assignment

ROOT = Path(__file__).resolve().parents[1]
#: a 3-layer MLP whose dims (509, prime) cannot be split: under this cap only 2 stages fit, and
#: the joint pipeline MILP goes to the default MILP backend (ortools-cbc)
PIPE_SPEC = "mlp:batch=2,dim_in=509,hidden=509,layers=3,dim_out=509"
PIPE_CLUSTER = "cpu:devices=2,memory_gb=0.0085"


def _captured(spec: str, m: int = 1):
    s = parse_model_spec(spec)
    model, inputs = build_model(s, "meta")
    graph = capture(model, inputs)
    mb = capture(model, microbatch_inputs(inputs, m)) if m > 1 else None
    return s, graph, mb


@pytest.fixture(scope="module")
def pipe():
    """(spec, graph, micro-batch graph, cluster) of :data:`PIPE_SPEC`."""
    from autoddl.engine.cluster import parse_cluster

    s, graph, mb = _captured(PIPE_SPEC, 2)
    return s, graph, mb, parse_cluster(PIPE_CLUSTER)


def _plan_pipe(pipe, **kw):
    s, graph, mb, c = pipe
    return planner.plan_graph(graph, c, model_spec=s.text, microbatch_graph=mb, microbatches=2,
                              workers=1, **kw)


# ---------------------------------------------------------------------------------------------
# 1. A crash in a native solver never takes the command down
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault, signame", [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
@pytest.mark.parametrize("backend", ["ortools-cbc", "ortools-cpsat"])
def test_a_crashed_solver_process_is_an_error_result_naming_the_signal(monkeypatch, backend,
                                                                       fault, signame):
    inst = make_assignment(2, n_nodes=4)
    monkeypatch.setenv(FAULT_ENV, fault)
    r = solve(inst.milp, backend=backend)
    assert r.status is SolveStatus.ERROR and r.extra["crashed"] and r.x is None
    assert signame in r.message and backend in r.message
    monkeypatch.delenv(FAULT_ENV)
    again = solve(inst.milp, backend=backend)  # a new worker: the crash left nothing broken
    assert again.status is SolveStatus.OPTIMAL
    assert again.objective == pytest.approx(inst.best, rel=1e-6)  # brute force


def test_isolated_and_in_process_solvers_agree():
    """The worker returns what the same backend class returns in this process."""
    inst = make_assignment(5, n_nodes=5)
    for name in ("ortools-cbc", "ortools-scip"):
        isolated, here = solve(inst.milp, backend=name), BACKENDS[name].inner.solve(
            inst.milp, None, 1e-6)
        assert isolated.status is here.status is SolveStatus.OPTIMAL
        assert np.array_equal(isolated.x, here.x) and isolated.objective == here.objective


def test_the_default_search_falls_back_and_keeps_the_optimum(pipe, monkeypatch):
    """The joint pipeline MILP goes to ortools-cbc by default; with its process crashing, highs
    solves it instead, to the same optimum, and the plan says so."""
    clean = _plan_pipe(pipe)
    assert clean.num_stages == 2 and clean.solver["backend"] == "ortools-cbc"
    monkeypatch.setenv(FAULT_ENV, "segv")
    faulted = _plan_pipe(pipe)
    assert faulted.solver["objective"] == pytest.approx(clean.solver["objective"], rel=1e-9)
    assert faulted.solver["status"] == "optimal" and faulted.solver["backend"] == "highs"
    assert "SIGSEGV" in faulted.solver["fallback"] and "highs" in faulted.solver["fallback"]
    assert faulted.num_stages == 2  # a plan of the same cost (ties may place ops otherwise)
    assert max(faulted.memory["per_stage_bytes"]) <= faulted.memory["capacity_bytes"]


def test_a_named_backend_that_crashes_is_a_one_line_user_error(pipe, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "segv")
    with pytest.raises(SolverError, match=r"'ortools-cbc' crashed: .*SIGSEGV.*--backend highs") \
            as info:
        _plan_pipe(pipe, backend="ortools-cbc")
    assert "\n" not in str(info.value)


def _cli(args: list[str], fault: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "autoddl.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_autoddl_plan_survives_a_solver_segfault(tmp_path):
    args = ["plan", "--model", PIPE_SPEC, "--cluster", PIPE_CLUSTER, "--microbatches", "2", "-v"]
    proc = _cli(args + ["-o", "faulted.json"], "segv", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SIGSEGV" in proc.stderr and "solved with highs instead" in proc.stderr
    faulted = load_plan(tmp_path / "faulted.json")
    clean = _cli(args + ["-o", "clean.json"], None, tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    plain = load_plan(tmp_path / "clean.json")
    assert faulted.num_stages == plain.num_stages == 2
    assert faulted.solver["objective"] == pytest.approx(plain.solver["objective"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 2. Solver modules are loaded once, before any fork or thread
# ---------------------------------------------------------------------------------------------


def test_highspy_is_imported_only_by_its_loader():
    """Every import of highspy in the package goes through ``_highs.load_highspy``."""
    import ast

    hits = []
    for path in sorted((ROOT / "autoddl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif (isinstance(node, ast.Call) and node.args
                  and isinstance(node.args[0], ast.Constant)
                  and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                      "import_module", "__import__")):
                names = [str(node.args[0].value)]  # import_module("highspy")
            if any(n.split(".")[0] == "highspy" for n in names):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(hits) == 1 and hits[0].startswith("autoddl/formulations/backends/_highs.py"), hits


_ORDER = textwrap.dedent(
    """
    import sys, threading
    import multiprocessing.pool as mpp
    events, pool = [], []

    def spy(event, args):  # imports really done (a find_spec check is not one)
        top = str(args[0]).split(".")[0] if event == "import" else ""
        if top in ("highspy", "ortools", "pulp"):
            events.append((top, threading.active_count(), bool(pool)))

    sys.addaudithook(spy)
    real = mpp.Pool.__init__
    def spy_init(self, *a, **k):
        pool.append(threading.active_count())
        real(self, *a, **k)
    mpp.Pool.__init__ = spy_init

    from autoddl.engine.capture import capture
    from autoddl.engine.models import build_model, parse_model_spec
    from autoddl.engine.planner import plan_graph
    from tests.helpers import cluster
    s = parse_model_spec("mlp:batch=64,dim_in=32,hidden=64,layers=2,dim_out=32")
    g = capture(*build_model(s, "meta"))
    c = cluster(devices=32, nodes=4, gbps=100, inter_gbps=5, latency_s=1e-6, peak_flops=1e11)
    plan_graph(g, c, model_spec=s.text, workers=2)
    import json
    print(json.dumps({"pool": pool, "events": events}))
    """
)


def test_solver_modules_load_before_the_screening_pool_forks():
    """The screening pool forks once, with this thread alone; highspy and OR-Tools were imported
    before it, never while its threads run beside the seed solve."""
    proc = subprocess.run([sys.executable, "-c", _ORDER], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pools, events = got["pool"], got["events"]
    assert pools == [1], "the pool should fork once, with no other thread running"
    names = {e[0] for e in events}
    assert {"highspy", "ortools"} <= names
    assert all(threads == 1 and not after_pool for _, threads, after_pool in events), events


# ---------------------------------------------------------------------------------------------
# 3a. No plan over the memory cap
# ---------------------------------------------------------------------------------------------


def _lenient(rows: list[int], tolerance: float):
    """A solve that accepts the memory ``rows`` violated by ``tolerance`` (as HiGHS does by
    1e-7)."""
    def solve_fn(milp, time_limit_s):
        return solving.solve_lp_first(solving.tightened(milp, rows, -tolerance), "highs",
                                      time_limit_s, 1e-9, branch=True)
    return solve_fn


@pytest.mark.parametrize("seed", range(6))
def test_a_plan_over_the_cap_by_the_tolerance_is_refused_and_resolved(seed):
    """The cheapest plan needs 5e-8 more than the cap; a solver with a 1e-7 row tolerance returns
    it; the strict check refuses it and the re-solve finds the brute-force optimum under the
    cap, and says what its bound covers."""
    rng = np.random.default_rng(seed)
    nodes = tuple(NodeChoices(f"n{v}", np.array([1.0, 2.0 + rng.uniform()]),
                              np.array([100.0 + rng.integers(50), 10.0 + rng.integers(5)]))
                  for v in range(5))
    fastest = sum(float(n.memory_bytes[0]) for n in nodes)
    cap = fastest / (1 + 5e-8)
    problem = ShardingProblem(nodes, (), cap)
    best, _ = problem.brute_force()
    model = ShardingModel(problem)
    milp = model.milp()
    assert model.memory_rows
    first = _lenient(model.memory_rows, 1e-7)(milp, None)
    assert problem.evaluate(model.choice(first.x))[1] > cap  # the lenient solver goes over
    r = solving.solve_within_capacity(milp, model.memory_rows, cap,
                                      lambda x: problem.evaluate(model.choice(x))[1],
                                      _lenient(model.memory_rows, 1e-7), None)
    cost, mem = problem.evaluate(model.choice(r.x))
    assert mem <= cap and r.status is SolveStatus.OPTIMAL
    assert cost == pytest.approx(best, rel=1e-9)
    assert cap * (1 - 1e-6) < r.extra["proof_capacity_bytes"] < cap


def test_the_issue_plan_stays_within_its_memory_cap():
    """``gpt:layers=2,hidden=512,...`` on ``cpu:devices=4,memory_gb=0.048138243``: HiGHS' plan
    was 1 byte over the cap and reported optimal."""
    from autoddl.engine.cluster import parse_cluster

    s, graph, _ = _captured("gpt:layers=2,hidden=512,heads=8,seq=64,batch=8,vocab=512")
    c = parse_cluster("cpu:devices=4,memory_gb=0.048138243")
    plan = planner.plan_graph(graph, c, model_spec=s.text, stages=1, workers=1)
    m = plan.memory
    assert m["capacity_bytes"] == c.memory_per_device_bytes
    assert m["per_device_bytes"] <= m["capacity_bytes"]  # strictly: no tolerance
    assert plan.solver["status"] == "optimal"
    scope = plan.solver.get("proof_capacity_bytes")
    if scope is not None:  # the tightened solve's bound covers plans up to just under the cap
        assert m["capacity_bytes"] * (1 - 1e-6) < scope < m["capacity_bytes"]


# ---------------------------------------------------------------------------------------------
# 3b. Thresholds are relative; no "time limit" without one
# ---------------------------------------------------------------------------------------------


def test_tiny_objectives_end_optimal_within_the_gap(capsys):
    """The VGG of the issue (a 92 µs objective): it ended "feasible" at gap 1.0000109e-6, with
    "time limit reached" printed and no time limit given."""
    from autoddl.engine.cluster import parse_cluster

    s, graph, _ = _captured("vgg:depth=11,batch=8,image=32,width=8,fc=64,classes=10")
    c = parse_cluster("dgx-a100:nodes=1,memory_gb=0.001902194")
    plan = planner.plan_graph(graph, c, model_spec=s.text, stages=1, workers=1)
    assert plan.solver["objective"] < 1e-3
    assert plan.solver["status"] == "optimal" and plan.solver["gap"] <= 1e-6
    assert plan.solver["bound"] >= plan.solver["objective"] * (1 - 1e-6)  # what the gap says
    for rec in plan.candidates:  # each pruned candidate's bound reaches the threshold exactly
        if rec["status"] == "pruned":
            assert rec["lower_bound"] >= plan.solver["objective"] * (1 - 1e-6)
    assert "time limit" not in capsys.readouterr().err


def test_an_unproven_plan_without_a_time_limit_never_mentions_one(monkeypatch, capsys):
    from tests.helpers import mlp_graph

    real = planner.solve_lp_first

    def short(*args, **kwargs):  # each MILP stops with 80 % of its optimum proven
        r = real(*args, **kwargs)
        if r.status is not SolveStatus.OPTIMAL:
            return r
        return dataclasses.replace(r, status=SolveStatus.FEASIBLE, bound=0.8 * r.objective,
                                   gap=0.2, message="proof cut short")

    monkeypatch.setattr(planner, "solve_lp_first", short)
    plan = planner.plan_graph(mlp_graph(8, 4, 16, 4), cluster(devices=4), model_spec="mlp",
                              screen=False, workers=1)
    err = capsys.readouterr().err
    assert plan.solver["status"] == "feasible"
    assert "time limit" not in err and "warning: the plan is within 20 %" in err, err


# ---------------------------------------------------------------------------------------------
# 3c. A solve cut short keeps the best valid bound
# ---------------------------------------------------------------------------------------------


def _cut_short(milp, backend, **kw) -> SolveResult:
    """A MILP backend stopped by its time limit without a plan or a bound (as OR-Tools' HiGHS
    does)."""
    return SolveResult(backend, SolveStatus.NO_SOLUTION, None, None, None, None, 0.0,
                       "limit reached")


def test_a_cut_short_solve_keeps_the_lp_and_tree_bounds(monkeypatch):
    from tests.test_branching import _knapsack_chain

    problem = _knapsack_chain(10)
    best, _ = problem.brute_force()
    milp = ShardingModel(problem).milp()
    lp = solve(dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality)),
               backend="highs")
    real_bb = solving.branch_and_bound
    monkeypatch.setattr(solving, "solve_or_fall_back", _cut_short)
    for lps in (1, 4):
        monkeypatch.setattr(solving, "branch_and_bound",
                            lambda m, g, t, lps=lps: real_bb(m, g, t, max_lps=lps))
        r = solving.solve_lp_first(milp, "ortools-cbc", 5.0, 1e-9, branch=True)
        assert r.bound is not None
        assert lp.objective * (1 - 1e-9) <= r.bound <= best * (1 + 1e-9)
        if r.has_solution:  # a dive's plan, kept although the backend found none
            assert r.status is SolveStatus.FEASIBLE and milp.is_feasible(r.x)
            assert r.objective >= best * (1 - 1e-9)


def test_a_plan_cut_short_reports_a_bound_not_null(pipe, monkeypatch):
    """The pipeline candidate is never screened (no bound of its own); its MILP cut short used
    to leave the plan's bound null ("within 100 %"). Its LP bound is kept: the plan's bound is
    finite and below the optimum of an uncut run."""
    monkeypatch.setattr(solving, "solve_or_fall_back", _cut_short)
    s, graph, mb, c = pipe
    roomy = dataclasses.replace(c, memory_per_device_bytes=c.memory_per_device_bytes * 2)
    kw = dict(model_spec=s.text, microbatch_graph=mb, microbatches=2, workers=1)
    loose = planner.plan_graph(graph, roomy, time_limit_s=600, **kw)  # unpipelined plans fit
    assert loose.solver["bound"] is not None
    monkeypatch.undo()
    uncut = planner.plan_graph(graph, roomy, **kw)
    assert loose.solver["bound"] <= uncut.solver["objective"] * (1 + 1e-9)
    assert loose.solver["objective"] >= uncut.solver["objective"] * (1 - 1e-9)
