"""Plan files: JSON round trip, documented fields, atomic writes, schema version, summary, diff."""

from __future__ import annotations

import json
import os

import pytest

from autoddl.engine.capture import capture
from autoddl.engine.cluster import parse_cluster
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.formulations.backends import default_backend
from autoddl.engine.plan import SCHEMA_VERSION, Plan, diff, load_plan, save_plan, summary
from autoddl.engine.planner import plan_graph
from autoddl.errors import UserError

MODEL = "mlp:batch=16,dim_in=8,hidden=16,layers=1,dim_out=8"


@pytest.fixture(scope="module")
def graph_and_spec():
    spec = parse_model_spec(MODEL)
    return capture(*build_model(spec, "meta")), spec


@pytest.fixture(scope="module")
def plan(graph_and_spec) -> Plan:
    """The optimal plan on ``cpu:devices=2`` (all candidate meshes)."""
    graph, spec = graph_and_spec
    return plan_graph(graph, parse_cluster("cpu:devices=2"), model_spec=spec.text)


@pytest.fixture(scope="module")
def plan2d(graph_and_spec) -> Plan:
    """The optimal plan on a 2x2 mesh of ``cpu:devices=4``: two named axes."""
    graph, spec = graph_and_spec
    cluster = parse_cluster("cpu:devices=4")
    return plan_graph(graph, cluster, model_spec=spec.text, meshes=[cluster.mesh((2, 2))])


@pytest.fixture(params=["1d", "2d"])
def any_plan(request, plan, plan2d) -> Plan:
    return plan if request.param == "1d" else plan2d


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_dict_round_trip(any_plan):
    again = Plan.from_dict(json.loads(json.dumps(any_plan.to_dict())))
    assert again == any_plan
    assert again.to_dict() == any_plan.to_dict()
    assert [o.name for o in again.ops] == [o.name for o in any_plan.ops]
    assert again.op(any_plan.ops[-1].name) == any_plan.ops[-1]


def test_save_load_round_trip(any_plan, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(any_plan, path)
    assert load_plan(path) == any_plan
    assert load_plan(str(path)) == any_plan
    assert sorted(os.listdir(tmp_path)) == ["plan.json"], "temporary file left behind"


def test_save_overwrites(plan, plan2d, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    save_plan(plan2d, path)
    assert load_plan(path) == plan2d
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]


# ---------------------------------------------------------------------------------------------
# The documented file format
# ---------------------------------------------------------------------------------------------


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_file_fields(any_plan, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(any_plan, path)
    d = json.loads(path.read_text())  # valid JSON
    assert d["schema_version"] == SCHEMA_VERSION == 1
    assert next(iter(d)) == "schema_version", "schema_version should come first"

    axes = d["mesh"]["axes"]
    assert axes, "mesh has no axes"
    for a in axes:
        assert isinstance(a["name"], str) and a["name"]
        assert isinstance(a["size"], int) and a["size"] >= 2
        assert _number(a["bandwidth_gbps"]) and a["bandwidth_gbps"] > 0
    names = [a["name"] for a in axes]
    assert len(set(names)) == len(names)
    assert names == any_plan.axis_names
    n = 1
    for a in axes:
        n *= a["size"]
    assert n == any_plan.num_devices == d["cluster"]["nodes"] * d["cluster"]["devices_per_node"]

    assert d["ops"], "plan has no ops"
    for o in d["ops"]:
        assert isinstance(o["name"], str) and isinstance(o["target"], str)
        assert list(o["out"]) == names, f"{o['name']}: out keyed {list(o['out'])}, not {names}"
        assert all(isinstance(v, str) and v for v in o["out"].values())
        assert isinstance(o["in"], list)
        for i in o["in"]:
            assert list(i) == names, f"{o['name']}: input keyed {list(i)}, not {names}"
        assert isinstance(o["grad"], list)
        for g in o["grad"]:
            assert g is None or list(g) == names
    assert len({o["name"] for o in d["ops"]}) == len(d["ops"])
    assert {o["target"] for o in d["ops"]} >= {"param", "input"}

    cost = d["cost"]
    assert _number(cost["total_s"]) and cost["total_s"] >= 0
    assert set(cost["per_axis"]) == set(names)
    for entry in (*cost["per_axis"].values(), *cost["per_kind"].values()):
        assert _number(entry["seconds"]) and _number(entry["bytes"])
        assert isinstance(entry["count"], int)
    assert isinstance(cost["per_kind"], dict)
    # per (axis, kind): what `autoddl run --check` compares with the bytes the ranks sent
    assert set(cost["per_axis_kind"]) == set(names)
    for axis, kinds in cost["per_axis_kind"].items():
        for kind, entry in kinds.items():
            assert kind in cost["per_kind"]
            assert _number(entry["seconds"]) and _number(entry["bytes"])
            assert isinstance(entry["count"], int)
        assert sum(e["bytes"] for e in kinds.values()) == pytest.approx(
            cost["per_axis"][axis]["bytes"])

    mem = d["memory"]
    assert _number(mem["per_device_bytes"]) and 0 < mem["per_device_bytes"]
    assert mem["per_device_bytes"] <= mem["capacity_bytes"]

    s = d["solver"]
    for key in ("backend", "status", "objective", "bound", "gap"):
        assert key in s, f"solver.{key} missing"
    assert s["backend"].split()[0] in (default_backend(), "highs", "screening")
    # what proved the bound: the ILPs solved, by solver, and the candidates screening ruled out
    assert s["ilps_solved"] == sum(s["ilp_solvers"].values())
    assert 0 <= s["candidates_bounded"] <= len(d["candidates"])
    assert s["status"] == "optimal"
    assert _number(s["objective"]) and _number(s["bound"])
    assert s["gap"] is None or 0 <= s["gap"] <= 1e-6
    assert s["bound"] <= s["objective"] * (1 + 1e-6) + 1e-12
    assert s["objective"] == pytest.approx(cost["total_s"], rel=1e-6, abs=1e-15)
    assert d["model"]["spec"] == MODEL


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


class _Boom(OSError):
    pass


def _fail_serialize(monkeypatch):
    def boom(*a, **k):
        raise _Boom("json.dumps failed")

    monkeypatch.setattr(json, "dumps", boom)


def _fail_mid_write(monkeypatch):
    real = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise _Boom("disk full")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real(fd, *a, **k)))


def _fail_replace(monkeypatch, exc=_Boom("rename failed")):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(os, "replace", boom)


def _interrupt_replace(monkeypatch):
    _fail_replace(monkeypatch, KeyboardInterrupt())


FAILURES = {
    "serialize": (_fail_serialize, _Boom),
    "mid-write": (_fail_mid_write, _Boom),
    "replace": (_fail_replace, _Boom),
    "interrupt": (_interrupt_replace, KeyboardInterrupt),
}


@pytest.mark.parametrize("existing", [False, True], ids=["absent", "existing"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_atomic_write(plan, plan2d, tmp_path, monkeypatch, failure, existing):
    path = tmp_path / "plan.json"
    if existing:
        save_plan(plan2d, path)
    before = path.read_bytes() if existing else None
    inject, exc_type = FAILURES[failure]
    with monkeypatch.context() as m:
        inject(m)
        with pytest.raises(exc_type):
            save_plan(plan, path)
    if existing:
        assert path.read_bytes() == before, "the old plan was changed by a failed write"
        assert load_plan(path) == plan2d
    else:
        assert not path.exists(), "a failed write left a plan file"
    left = sorted(os.listdir(tmp_path))
    assert left == (["plan.json"] if existing else []), f"left behind: {left}"


def test_save_into_missing_folder(plan, tmp_path):
    target = tmp_path / "no-such-dir" / "plan.json"
    with pytest.raises(UserError, match="does not exist"):
        save_plan(plan, target)
    assert not target.parent.exists()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Reading bad files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 99, None, "1"])
def test_wrong_schema_version(plan, tmp_path, version):
    d = plan.to_dict()
    if version is None:
        del d["schema_version"]
    else:
        d["schema_version"] = version
    with pytest.raises(UserError, match="schema_version"):
        Plan.from_dict(d)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match="schema_version"):
        load_plan(path)


def test_bad_files(plan, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        load_plan(tmp_path / "list.json")
    d = plan.to_dict()
    del d["ops"]
    with pytest.raises(UserError, match="malformed"):
        Plan.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Timings: in memory and in the summary, never in the file
# ---------------------------------------------------------------------------------------------


def _keys(data) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(data, dict):
        return set(data) | set().union(*(_keys(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_keys(v) for v in data))
    return set()


def test_timings_stay_out_of_the_file_and_in_the_summary(any_plan, tmp_path):
    t = any_plan.timings
    assert t["total_s"] > 0 and len(t["candidates"]) == len(any_plan.candidates)
    assert any("build_s" in c for c in t["candidates"])
    path = tmp_path / "plan.json"
    save_plan(any_plan, path)
    assert not _keys(json.loads(path.read_text())) & {"time_s", "build_s", "bound_s",
                                                       "mesh_solve_time_s"}
    assert f"{t['total_s']:.2f} s over" in summary(any_plan)
    again = load_plan(path)
    assert again.timings == {} and again == any_plan
    assert " s over " not in summary(again) and "over " in summary(again)


def test_old_plan_files_with_timings_still_load_and_show(any_plan, tmp_path):
    """A file of an older autoddl (solver and candidate timings inside) loads, its timings moved
    out of the records (so it saves without them) and printed by the summary."""
    d = any_plan.to_dict()
    d["solver"] = {**d["solver"], "time_s": 12.5, "mesh_solve_time_s": 3.25}
    d["candidates"] = [{**c, "build_s": 0.5, "bound_s": 0.25, "time_s": 1.0}
                       for c in d["candidates"]]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    old = load_plan(path)
    assert old == any_plan  # the same plan: timings are not part of it
    assert old.timings["total_s"] == 12.5 and old.timings["solve_s"] == 3.25
    assert old.timings["candidates"][0] == {"build_s": 0.5, "bound_s": 0.25, "time_s": 1.0}
    assert "12.50 s over" in summary(old)
    assert old.to_dict() == any_plan.to_dict()
    from autoddl.cli import main

    for file in (path, tmp_path / "new.json"):  # `autoddl show` on the old file and a new one
        save_plan(any_plan, tmp_path / "new.json")
        assert main(["show", str(file)]) == 0


# ---------------------------------------------------------------------------------------------
# summary, diff
# ---------------------------------------------------------------------------------------------


def test_summary_names_every_axis(any_plan):
    text = summary(any_plan)
    assert isinstance(text, str) and text
    for a in any_plan.mesh["axes"]:
        assert f"{a['name']}={a['size']}" in text
        assert f"axis {a['name']}" in text
    assert any_plan.solver["status"] in text
    assert any_plan.model["spec"] in text


def test_diff(plan, plan2d):
    assert diff(plan, plan) == []
    assert diff(plan2d, plan2d) == []
    loaded = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert diff(plan, loaded) == []
