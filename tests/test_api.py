"""``autoddl.plan``: the library call plans a model object as the command line plans its spec."""

from __future__ import annotations

import subprocess
import sys

import pytest

import autoddl
from autoddl.engine.models import build_model
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph
from autoddl.engine.workload import load_workload
from autoddl.errors import UserError
from autoddl.model_specs import parse_model_spec

SPEC = "gpt:layers=2,hidden=32,heads=2,seq=8,batch=8,vocab=64"
CLUSTER = "cpu:devices=4"


def _spec_plan(stages):
    w = load_workload(SPEC, CLUSTER, recompute="auto", stages=stages)
    return plan_graph(w.graph, w.cluster, model_spec=SPEC, config=w.config,
                      microbatch_graph=w.microbatch_graph, microbatches=w.microbatches,
                      stages=stages, layers=w.layers, workers=1)


@pytest.mark.parametrize("stages", [1, None])
def test_plan_of_a_model_object_equals_the_spec_plan(stages):
    """The built-in GPT built as a module and planned through the API costs what its spec
    costs through the command line's path, with the same mesh and placements."""
    model, inputs = build_model(parse_model_spec(SPEC), "meta")
    got = autoddl.plan(model, inputs, CLUSTER, stages=stages, workers=1)
    want = _spec_plan(stages)
    assert got.cost["total_s"] == pytest.approx(want.cost["total_s"], rel=1e-9)
    assert got.device_mesh_shape == want.device_mesh_shape
    def rows(plan):
        return [(o.name, o.out, o.ins, o.stage) for o in plan.ops]
    assert rows(got) == rows(want)
    assert got.model["spec"] == "python:GPT"


def test_bad_inputs_are_one_line_errors():
    model, inputs = build_model(parse_model_spec(SPEC), "meta")
    with pytest.raises(UserError, match="torch.nn.Module"):
        autoddl.plan(lambda x: x, inputs, CLUSTER)
    with pytest.raises(UserError, match="non-empty tuple"):
        autoddl.plan(model, (), CLUSTER)
    with pytest.raises(UserError, match="cpu:devices"):
        autoddl.plan(model, inputs, 4)


def test_run_refuses_an_api_plan_in_one_line(tmp_path):
    model, inputs = build_model(parse_model_spec(SPEC), "meta")
    path = tmp_path / "api.json"
    save_plan(autoddl.plan(model, inputs, "cpu:devices=2", stages=1, workers=1), path)
    out = subprocess.run([sys.executable, "-m", "autoddl.cli", "run", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "autoddl.plan()" in out.stderr


def test_import_autoddl_stays_light():
    code = "import sys, autoddl; print('torch' in sys.modules, callable(autoddl.plan))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]
