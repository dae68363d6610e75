"""Property tests (hypothesis): the sharding ILP, plan files and spec parsing on random input.

- random small DAGs with random signature and edge costs: every backend's optimum equals brute
  force, and every valid assignment costs at least the ILP's plan;
- planning is deterministic: the same input gives the same plan file, byte for byte;
- plan files round-trip through save/load;
- random malformed ``--model``/``--cluster`` specs and cluster files raise :class:`UserError`,
  never anything else.

Kept small (a few nodes, modest ``max_examples``) so the file runs in seconds.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoddl.engine.cluster import parse_cluster
from autoddl.engine.models import parse_model_spec
from autoddl.engine.plan import OpPlacement, Plan, load_plan, save_plan
from autoddl.errors import UserError
from autoddl.formulations.backends import available_backends, solve
from autoddl.formulations.milp import SolveStatus
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingModel, ShardingProblem
from tests.helpers import cluster, mlp_graph

BACKENDS = available_backends()
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw) -> ShardingProblem:
    """A random DAG (2-5 nodes, each node 1-3 signatures, edges from earlier nodes) with random
    signature costs, edge conversion costs (some forbidden) and memory, under an optional cap."""
    n = draw(st.integers(2, 5))
    cost = st.floats(0, 2, allow_nan=False).map(lambda x: round(x, 3))
    mem = st.floats(0, 5, allow_nan=False).map(lambda x: round(x, 1))
    sizes = [draw(st.integers(1, 3)) for _ in range(n)]
    nodes = tuple(NodeChoices(f"n{v}", np.array([draw(cost) for _ in range(sizes[v])]),
                              np.array([draw(mem) for _ in range(sizes[v])]))
                  for v in range(n))
    edges = []
    for v in range(1, n):
        preds = draw(st.sets(st.integers(0, v - 1), min_size=1, max_size=min(v, 2)))
        for u in sorted(preds):
            src_key = np.array([draw(st.integers(0, sizes[u] - 1)) for _ in range(sizes[u])])
            dst_key = np.array([draw(st.integers(0, sizes[v] - 1)) for _ in range(sizes[v])])
            ks, kd = int(src_key.max()) + 1, int(dst_key.max()) + 1
            c = np.array([[draw(cost) for _ in range(kd)] for _ in range(ks)])
            forbid = np.array([[draw(st.booleans()) and draw(st.booleans())
                                for _ in range(kd)] for _ in range(ks)])
            c[forbid] = np.inf
            m = np.array([[draw(mem) for _ in range(kd)] for _ in range(ks)])
            edges.append(EdgeChoices(u, v, src_key, dst_key, c, m))
    cap = draw(st.sampled_from([np.inf, 8.0, 15.0]))
    return ShardingProblem(nodes, tuple(edges), cap)


def _all_choices(problem: ShardingProblem) -> list[np.ndarray]:
    sizes = [len(nd.cost_s) for nd in problem.nodes]
    grids = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
    return [np.array(c) for c in zip(*(g.ravel() for g in grids))]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(problem=problems())
def test_ilp_optimum_equals_brute_force(backend, problem):
    best, _ = problem.brute_force()
    model = ShardingModel(problem)
    result = solve(model.milp(), backend=backend)
    if not np.isfinite(best):
        assert result.status is SolveStatus.INFEASIBLE, result
        return
    assert result.status is SolveStatus.OPTIMAL, result
    assert result.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
    cost, memory = problem.evaluate(model.choice(result.x))
    assert cost == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert memory <= problem.memory_capacity_bytes + 1e-6


@SETTINGS
@given(problem=problems(), data=st.data())
def test_any_valid_plan_costs_at_least_the_ilp_plan(problem, data):
    result = solve(ShardingModel(problem).milp())
    feasible = [c for c in _all_choices(problem)
                if np.isfinite(problem.evaluate(c)[0])
                and problem.evaluate(c)[1] <= problem.memory_capacity_bytes + 1e-9]
    if not feasible:
        assert result.status is SolveStatus.INFEASIBLE
        return
    assert result.status is SolveStatus.OPTIMAL
    for _ in range(5):
        choice = data.draw(st.sampled_from(feasible))
        assert problem.evaluate(choice)[0] >= result.objective - 1e-9 * (1 + result.objective)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(batch=st.sampled_from([4, 8, 16]), hidden=st.sampled_from([8, 16]),
       devices=st.sampled_from([2, 4]), memory_fraction=st.sampled_from([None, 0.6]))
def test_plans_are_deterministic(tmp_path_factory, batch, hidden, devices, memory_fraction):
    """The same graph and cluster give the same plan file, byte for byte (timings are not in
    it)."""
    from autoddl.engine.planner import plan_graph

    graph = mlp_graph(batch=batch, d_in=4, hidden=hidden, d_out=4)
    mem = 2**40
    if memory_fraction is not None:  # press on memory: the ILP has to choose
        loose = plan_graph(graph, cluster(devices=devices), model_spec="mlp", workers=1)
        mem = int(loose.memory["per_device_bytes"] / memory_fraction * 0.9)
    texts = []
    tmp = tmp_path_factory.mktemp("det")
    for k in range(2):
        try:
            plan = plan_graph(graph, cluster(devices=devices, memory_bytes=mem),
                              model_spec="mlp", workers=1)
        except UserError:
            return  # fits no plan at all: nothing to compare
        path = tmp / f"p{k}.json"
        save_plan(plan, path)
        texts.append(path.read_bytes())
    assert texts[0] == texts[1]


_names = st.text(string.ascii_letters + string.digits + "_./", min_size=1, max_size=12)
_number = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)


def _placements(axes: list[str]):
    """A placement per mesh axis, keyed by the axes in order."""
    return st.tuples(*[st.sampled_from(["B", "P", "S(0)", "S(1)"]) for _ in axes]).map(
        lambda ps: dict(zip(axes, ps)))


@st.composite
def plans(draw) -> Plan:
    """A random well-formed plan: random ops with random placements, stages and ZeRO levels."""
    axes = draw(st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=3, unique=True))
    pipeline = draw(st.one_of(st.none(), st.fixed_dictionaries(
        {"stages": st.integers(1, 4), "microbatches": st.integers(1, 8),
         "schedule": st.sampled_from(["1F1B", "GPipe"]),
         "axis": st.fixed_dictionaries({"name": st.just("pp"), "bandwidth_gbps": _number})})))
    stages = pipeline["stages"] if pipeline else 1
    names = draw(st.lists(_names, min_size=1, max_size=6, unique=True))
    pl = _placements(axes)
    ops = tuple(OpPlacement(nm, draw(st.sampled_from(["param", "input", "aten.mm.default"])),
                            draw(pl), tuple(draw(st.lists(pl, max_size=2))),
                            tuple(draw(st.lists(st.one_of(st.none(), pl), max_size=2))),
                            draw(st.integers(0, stages - 1)), draw(st.integers(0, 3)))
                for nm in names)
    row = st.fixed_dictionaries({"seconds": _number, "bytes": _number,
                                 "count": st.integers(0, 100)})
    cost = {k: draw(_number) for k in ("total_s", "bandwidth_s", "redundant_compute_s",
                                      "step_time_s", "bytes_per_device")}
    cost.update(per_axis={a: draw(row) for a in axes},
                per_kind=draw(st.dictionaries(st.sampled_from(["all_reduce", "all_gather"]),
                                              row, max_size=2)))
    return Plan(model={"spec": draw(_names), "graph_hash": draw(st.text(min_size=1)),
                       "num_ops": len(ops), "num_params": draw(st.integers(0, 10**9))},
                cluster={"name": draw(st.text(max_size=10))},
                mesh={"axes": [{"name": a, "size": draw(st.integers(1, 8)),
                                "bandwidth_gbps": draw(_number)} for a in axes]},
                training={"optimizer": draw(st.sampled_from(["adam", "sgd"]))}, ops=ops,
                cost=cost,
                memory={k: draw(_number) for k in ("weights_bytes", "activations_bytes",
                                                   "converted_inputs_bytes",
                                                   "per_device_bytes", "capacity_bytes")},
                solver={"backend": "highs", "objective": draw(_number),
                        "status": draw(st.sampled_from(["optimal", "feasible"])),
                        "gap": draw(st.one_of(st.none(), _number))},
                candidates=tuple(draw(st.lists(st.fixed_dictionaries(
                    {"mesh": _names, "objective": st.one_of(st.none(), _number)}), max_size=3))),
                pipeline=pipeline)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans())
def test_plan_files_round_trip(tmp_path, plan):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    again = load_plan(path)
    assert again == plan
    assert again.to_dict() == plan.to_dict()


_spec_chars = string.ascii_letters + string.digits + ":=,.-_ \t/"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(_spec_chars, max_size=30),
                      st.builds(lambda n, k, v: f"{n}:{k}={v}",
                                st.sampled_from(["mlp", "gpt", "vgg", "gpt-1.7b", "x"]),
                                st.sampled_from(["layers", "hidden", "heads", "batch", "depth",
                                                 "seq", "vocab", "image", "foo", ""]),
                                st.text(string.digits + "-.e", max_size=6))))
def test_malformed_model_specs_raise_user_errors(text):
    try:
        parse_model_spec(text)
    except UserError:
        pass


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(_spec_chars.replace("/", ""), max_size=30),
                      st.builds(lambda n, k, v: f"{n}:{k}={v}",
                                st.sampled_from(["cpu", "dgx-a100", "dgx-h100", "tpu"]),
                                st.sampled_from(["devices", "nodes", "memory_gb", "intra_gbps",
                                                 "inter_gbps", "intra_latency_us", "tflops",
                                                 "gpus_per_node", "x"]),
                                st.text(string.digits + "-.einf", max_size=6))))
def test_malformed_cluster_specs_raise_user_errors(text):
    if Path(text.strip()).exists():  # an existing file or folder is read, not parsed
        return
    try:
        parse_cluster(text)
    except UserError:
        pass


_toml_values = st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2))
_toml_keys = st.sampled_from(["name", "nodes", "devices_per_node", "memory_per_device_gb",
                              "peak_tflops", "device_type", "bandwidth_gbps", "latency_us",
                              "extra"])


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=st.dictionaries(_toml_keys, _toml_values, max_size=7),
       intra=st.one_of(st.none(), st.dictionaries(_toml_keys, _toml_values, max_size=3)),
       garbage=st.one_of(st.just(""), st.text(max_size=8)), yaml=st.booleans())
def test_malformed_cluster_files_raise_user_errors(tmp_path, top, intra, garbage, yaml):
    """Random (often contradictory) cluster files: a cluster or a UserError, nothing else."""
    data = dict(top)
    if intra is not None:
        data["intra_node"] = intra
    if yaml:
        import yaml as pyyaml
        text = pyyaml.safe_dump(data) + garbage
        path = tmp_path / "c.yaml"
    else:
        text = json.dumps(data) + garbage  # not TOML at all: the malformed-file path
        path = tmp_path / "c.toml"
    path.write_text(text)
    try:
        parse_cluster(str(path))
    except UserError:
        pass
