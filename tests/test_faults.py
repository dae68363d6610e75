"""Faults at run time, on 2 gloo processes: a rank that raises or is killed mid-run makes
``autoddl run`` exit non-zero within seconds, naming the rank; a job saved with ``--save`` resumes
with ``--resume`` from its last step, exactly as if it had not stopped.

Faults are injected with ``AUTODDL_FAULT_RANK`` / ``AUTODDL_FAULT_STEP`` / ``AUTODDL_FAULT_KIND``
(:func:`autoddl.runtime.worker.inject_fault`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from autoddl.engine.capture import capture
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph
from tests.helpers import cluster

pytestmark = pytest.mark.dist

MODEL = "gpt:layers=1,hidden=32,heads=2,seq=8,batch=4,vocab=64"
FAULT_LIMIT_S = 30


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    """A 2-device plan that shards some weights (so optimizer states are DTensor shards)."""
    spec = parse_model_spec(MODEL)
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, workers=1)
    assert any(o.target == "param" and any(p.startswith("S(") for p in o.out.values())
               for o in plan.ops), "plan shards no weight: the resume test would be weak"
    path = tmp_path_factory.mktemp("faults") / "plan.json"
    save_plan(plan, path)
    return path


def _run(plan, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "autoddl.cli", "run", str(plan), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return proc, time.perf_counter() - t0


def _failure_line(proc: subprocess.CompletedProcess) -> str:
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("autoddl run: failed:")]
    assert line and "Traceback" not in proc.stderr, proc.stdout + proc.stderr[-3000:]
    return line[0]


def test_rank_that_raises_stops_the_job_and_is_named(plan_path):
    proc, took = _run(plan_path, "--steps", "5", AUTODDL_FAULT_RANK="1", AUTODDL_FAULT_STEP="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert took < FAULT_LIMIT_S, took
    assert "step 4" not in proc.stdout  # (rank 0 may be stopped before it prints a step)
    assert "rank 1 (exit code 1): InjectedFault" in _failure_line(proc), proc.stderr[-3000:]


def _losses(out: str) -> dict[int, str]:
    return {int(s): v for s, v in re.findall(r"^step (\d+): loss (\S+)", out, re.M)}


def test_rank_killed_mid_run_stops_the_job_which_resumes_from_its_last_step(plan_path,
                                                                            tmp_path):
    straight, _ = _run(plan_path, "--steps", "3", "--check", "--save", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed, took = _run(plan_path, "--steps", "3", "--check", "--save", str(tmp_path / "b"),
                        AUTODDL_FAULT_RANK="0", AUTODDL_FAULT_STEP="2", AUTODDL_FAULT_KIND="die")
    assert killed.returncode == 1 and took < FAULT_LIMIT_S, (took, killed.stderr[-3000:])
    assert "rank 0 (exit code -9, killed by signal 9)" in _failure_line(killed)
    assert sorted(_losses(killed.stdout)) == [0, 1]
    resumed, _ = _run(plan_path, "--steps", "1", "--check", "--resume", str(tmp_path / "b"),
                      "--save", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "check PASSED" in resumed.stdout
    want = _losses(straight.stdout)
    assert _losses(killed.stdout) == {k: want[k] for k in (0, 1)}
    assert _losses(resumed.stdout) == {2: want[2]}
    for rank in (0, 1):  # weights and optimizer states after 3 steps: equal, bit for bit
        a = torch.load(tmp_path / "a" / f"rank{rank}.pt", weights_only=False)
        b = torch.load(tmp_path / "b" / f"rank{rank}.pt", weights_only=False)
        assert a["step"] == b["step"] == 3
        assert a["params"].keys() == b["params"].keys()
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), k
        for i, st in a["optimizer"]["state"].items():
            for key, v in st.items():
                assert torch.equal(v, b["optimizer"]["state"][i][key]), (i, key)


def test_resume_errors_are_one_line(plan_path, tmp_path):
    proc, _ = _run(plan_path, "--resume", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("autoddl: error: --resume"), proc.stderr
    (tmp_path / "empty").mkdir()
    proc, _ = _run(plan_path, "--resume", str(tmp_path / "empty"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "no checkpoint files" in proc.stderr
