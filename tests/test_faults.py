"""Faults at run time, on 2 gloo processes: a rank that raises or is killed mid-run makes
``autoddl run`` exit non-zero within seconds, naming the rank; a job saved with ``--save`` resumes
with ``--resume`` from its last complete step, exactly as if it had not stopped, also when it was
killed while saving (the step being written is lost, the one before is kept), at the saved lr
unless ``--lr`` changes it, and under another plan of the same model (the state resharded); a
checkpoint of another optimizer or model is refused in one line.

Faults are injected with ``AUTODDL_FAULT_RANK`` / ``AUTODDL_FAULT_STEP`` / ``AUTODDL_FAULT_KIND``
(:func:`autoddl.runtime.worker.inject_fault`), into a save with ``AUTODDL_FAULT_SAVE``
(:mod:`autoddl.runtime.checkpoint`). The saved runs train at ``--lr 0.01`` and resume without
``--lr``: a resume at the default lr would not match them bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from autoddl.engine import baselines as bl
from autoddl.engine.capture import capture
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph
from autoddl.engine.workload import load_workload
from tests.helpers import cluster

pytestmark = pytest.mark.dist

MODEL = "gpt:layers=1,hidden=32,heads=2,seq=8,batch=4,vocab=64"
FAULT_LIMIT_S = 90  # far below the 300 s collective timeout a hang would wait for
LR = "0.01"


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    """A 2-device plan that shards some weights (so optimizer states are DTensor shards)."""
    spec = parse_model_spec(MODEL)
    graph = capture(*build_model(spec, "meta"))
    # memory between the leanest plan's 206 KiB and data parallel's 344 KiB: weights split
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10, memory_bytes=230_000)
    plan = plan_graph(graph, c, model_spec=spec.text, workers=1)
    assert any(o.target == "param" and any(p.startswith("S(") for p in o.out.values())
               for o in plan.ops), "plan shards no weight: the resume test would be weak"
    path = tmp_path_factory.mktemp("faults") / "plan.json"
    save_plan(plan, path)
    return path


@pytest.fixture(scope="module")
def baseline_plans(tmp_path_factory):
    """Plans of the same model placed otherwise: data parallel (every weight whole), Megatron
    tensor parallel (weights split), and data parallel with another optimizer (momentum)."""
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10)
    folder = tmp_path_factory.mktemp("baselines")
    plans = {"dp": bl.data_parallel(load_workload(MODEL, c, stages=1), "DDP").plan,
             "tp": bl.megatron_tp_dp(load_workload(MODEL, c, stages=1)).plan,
             "momentum": bl.data_parallel(load_workload(MODEL, c, stages=1,
                                                        optimizer="momentum"), "DDP").plan}
    assert all(o.out == {"x": "B"} for o in plans["dp"].ops if o.target == "param")
    assert any(o.out["x"].startswith("S(") for o in plans["tp"].ops if o.target == "param")
    for name, plan in plans.items():
        save_plan(plan, folder / f"{name}.json")
    return {name: folder / f"{name}.json" for name in plans}


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




def _references(out: str) -> dict[int, str]:
    return {int(s): v for s, v in re.findall(r"^step (\d+): loss \S+\s+reference (\S+)", out,
                                             re.M)}


def _read_step(folder, scratch) -> dict[str, torch.Tensor]:
    """Every entry of a saved step folder as a whole tensor, read in this one process by DCP
    (whatever the sharding it was saved with)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{folder.parent.name}-{folder.name}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    """Parameters, optimizer states and reference equal, bit for bit."""
    assert a.keys() == b.keys()
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in a), sorted(a)[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(plan_path, tmp_path_factory):
    """An uninterrupted run of 3 steps at lr 0.01: (its stdout, the folder it saved into)."""
    folder = tmp_path_factory.mktemp("straight") / "ck"
    proc, _ = _run(plan_path, "--steps", "3", "--check", "--lr", LR, "--save", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(folder)) == ["latest.json", "step-3"]
    return proc.stdout, folder


@pytest.fixture(scope="module")
def killed(plan_path, tmp_path_factory):
    """The same run with rank 0 killed at the start of step 2: (process, seconds, its folder)."""
    folder = tmp_path_factory.mktemp("killed") / "ck"
    proc, took = _run(plan_path, "--steps", "3", "--check", "--lr", LR, "--save", str(folder),
                      AUTODDL_FAULT_RANK="0", AUTODDL_FAULT_STEP="2", AUTODDL_FAULT_KIND="die")
    return proc, took, folder


def test_rank_killed_mid_run_stops_the_job_which_resumes_from_its_last_step(
        plan_path, straight, killed, tmp_path):
    proc, took, saved = killed
    assert proc.returncode == 1 and took < FAULT_LIMIT_S, (took, proc.stderr[-3000:])
    assert "rank 0 (exit code -9, killed by signal 9)" in _failure_line(proc)
    assert sorted(_losses(proc.stdout)) == [0, 1]
    folder = tmp_path / "b"
    shutil.copytree(saved, folder)
    resumed, _ = _run(plan_path, "--steps", "1", "--check", "--resume", str(folder),
                      "--save", str(folder))  # no --lr: the saved 0.01
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "check PASSED" in resumed.stdout
    assert "lr changed" not in resumed.stdout and "resharded" not in resumed.stdout
    want = _losses(straight[0])
    assert _losses(proc.stdout) == {k: want[k] for k in (0, 1)}
    assert _losses(resumed.stdout) == {2: want[2]}
    assert sorted(os.listdir(folder)) == ["latest.json", "step-3"]  # step 2 went once 3 was in
    _assert_same_state(_read_step(straight[1] / "step-3", tmp_path),
                       _read_step(folder / "step-3", tmp_path))


@pytest.mark.parametrize("where, rank", [("write", "1"), ("commit", "0")])
def test_kill_while_saving_keeps_the_step_before_which_resumes_bit_exactly(
        plan_path, straight, tmp_path, where, rank):
    """``write``: rank 1 dies once its part of step 3 is written, before DCP's ``.metadata``;
    ``commit``: rank 0 dies after DCP's save, before the rename. Either way step 2 is the latest
    complete step on disk, and resuming from it gives the uninterrupted run's state."""
    folder = tmp_path / "c"
    proc, took = _run(plan_path, "--steps", "3", "--check", "--lr", LR, "--save", str(folder),
                      AUTODDL_FAULT_SAVE=where, AUTODDL_FAULT_RANK=rank, AUTODDL_FAULT_STEP="2")
    assert proc.returncode == 1 and took < FAULT_LIMIT_S, (took, proc.stderr[-3000:])
    assert f"rank {rank} (exit code -9, killed by signal 9)" in _failure_line(proc)
    want = _losses(straight[0])
    assert _losses(proc.stdout) == want  # all 3 steps ran; the save of the last one was cut
    assert sorted(os.listdir(folder)) == [".step-3.partial", "latest.json", "step-2"]
    assert json.loads((folder / "latest.json").read_text())["latest"] == "step-2"
    partial = folder / ".step-3.partial"
    assert any(partial.glob("*.distcp"))
    assert (partial / ".metadata").is_file() == (where == "commit")
    kept = _read_step(folder / "step-2", tmp_path)  # complete and loadable
    final = _read_step(straight[1] / "step-3", tmp_path)
    assert kept.keys() == final.keys()
    assert not all(torch.equal(kept[k], final[k]) for k in kept if k.startswith("param/"))
    resumed, _ = _run(plan_path, "--steps", "1", "--check", "--resume", str(folder),
                      "--save", str(folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder / 'step-2'} (2 steps done)" in resumed.stdout
    assert _losses(resumed.stdout) == {2: want[2]}
    assert sorted(os.listdir(folder)) == ["latest.json", "step-3"]  # the partial one swept
    _assert_same_state(final, _read_step(folder / "step-3", tmp_path))


def test_resume_with_lr_uses_it_and_says_so(plan_path, straight, killed, tmp_path):
    """(Resuming without ``--lr`` takes the saved one: the tests above resume bit for bit.)"""
    folder = tmp_path / "d"
    shutil.copytree(killed[2], folder)
    proc, _ = _run(plan_path, "--steps", "1", "--lr", "0.05", "--resume", str(folder),
                   "--save", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [ln for ln in proc.stdout.splitlines() if "lr" in ln.split()]
    assert said == ["lr changed from 0.01 to 0.05 (--lr; the checkpoint was saved with 0.01)"]
    assert _losses(proc.stdout) == {2: _losses(straight[0])[2]}  # (before step 2's update)
    assert json.loads((folder / "step-3" / "autoddl.json").read_text())["lr"] == 0.05
    before = _read_step(killed[2] / "step-2", tmp_path)
    slow = _read_step(straight[1] / "step-3", tmp_path)
    fast = _read_step(folder / "step-3", tmp_path)
    for k in (k for k in before if k.startswith("param/")):  # AdamW's update is linear in lr
        torch.testing.assert_close(fast[k] - before[k], 5 * (slow[k] - before[k]),
                                   rtol=1e-3, atol=1e-6, msg=k)


def test_resume_under_another_plan_reshards_the_state(baseline_plans, straight, tmp_path):
    """Saved under data parallelism (every weight whole), resumed under Megatron tensor
    parallelism (weights split): the state is resharded, and the step matches the
    single-process reference and the uninterrupted run of another plan up to rounding (the
    reference takes each run's weights before each checked step, so it follows the plan's
    summation order)."""
    folder = tmp_path / "e"
    saved, _ = _run(baseline_plans["dp"], "--steps", "2", "--check", "--lr", LR,
                    "--save", str(folder))
    assert saved.returncode == 0, saved.stderr[-3000:]
    proc, _ = _run(baseline_plans["tp"], "--steps", "1", "--check", "--resume", str(folder),
                   "--save", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check PASSED" in proc.stdout and "resharded to this plan" in proc.stdout
    want = _references(straight[0])
    got_refs = {**_references(saved.stdout), **_references(proc.stdout)}
    assert got_refs.keys() == {0, 1, 2}
    assert all(abs(float(got_refs[k]) - float(want[k])) <= 1e-5 * abs(float(want[k]))
               for k in got_refs), (got_refs, want)
    got = _read_step(folder / "step-3", tmp_path)
    ref = _read_step(straight[1] / "step-3", tmp_path)
    assert got.keys() == ref.keys()
    for prefix in ("param/", "ref"):  # another plan sums in another order: equal up to rounding
        keys = [k for k in ref if k.startswith(prefix) and not k.endswith("step")]
        scale = max(float(ref[k].double().norm()) for k in keys)
        for k in keys:
            diff = float((got[k].double() - ref[k].double()).norm())
            assert diff <= 1e-4 * max(float(ref[k].double().norm()), scale), k


def test_resume_errors_are_one_line(plan_path, baseline_plans, killed, tmp_path):
    def refused(plan, folder, *args: str) -> str:
        proc, _ = _run(plan, "--resume", str(folder), *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
        assert proc.stderr.startswith("autoddl: error: --resume"), proc.stderr
        assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
        return proc.stderr

    assert "not found" in refused(plan_path, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".step-1.partial").mkdir()
    assert "no checkpoint files" in refused(plan_path, tmp_path / "empty")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "rank0.pt").write_bytes(b"")
    assert "older autoddl" in refused(plan_path, tmp_path / "old")
    msg = refused(baseline_plans["momentum"], killed[2])
    assert "optimizer 'adam'" in msg and "'momentum'" in msg and "--optimizer adam" in msg
    for key, value, says in [("graph_hash", "0" * 16, "another model"),
                             ("reference", False, "saved without --check")]:
        folder = tmp_path / key
        shutil.copytree(killed[2], folder)
        info = json.loads((folder / "step-2" / "autoddl.json").read_text())
        (folder / "step-2" / "autoddl.json").write_text(json.dumps({**info, key: value}))
        assert says in refused(plan_path, folder, "--check")
