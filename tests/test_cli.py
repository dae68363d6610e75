"""The ``autoddl`` command through its real entry point (``python -m autoddl.cli``).

Every user error must exit with code 2 and print exactly one line, ``autoddl: error: ...``, that
names the problem, and never a traceback. Each process imports torch (1-2 s), so all commands are
started at once by one module-scoped fixture; the tests only inspect the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TIMEOUT_S = 120
MESH = "x=2"  # the mesh of the success plan: 2 CPU devices -> one axis "x" of size 2
SUCCESS_MODEL = "mlp:batch=16,dim_in=8,hidden=16,layers=1,dim_out=8"
CPU2 = "cpu:devices=2"


def _plan(model: str = "gpt", cluster: str = CPU2, *extra: str) -> list[str]:
    return ["plan", "--model", model, "--cluster", cluster, *extra]


# id -> (argv after `autoddl`, a fragment the error line must contain). "{tmp}" is the work folder.
ERROR_CASES: dict[str, tuple[list[str], str]] = {
    "unknown-model": (_plan("bert"), "unknown model 'bert'"),
    "unknown-model-key": (_plan("gpt:layerz=2"), "'layerz'"),
    "malformed-number": (_plan("gpt:layers=two"), "layers='two'"),
    "zero-number": (_plan("gpt:layers=0"), "layers=0"),
    "hidden-not-divisible": (_plan("gpt:hidden=10,heads=4"), "not divisible by heads"),
    "unknown-cluster-preset": (_plan(cluster="tpu-v9"), "unknown cluster 'tpu-v9'"),
    "unknown-cluster-key": (_plan(cluster="cpu:gpus=2"), "'gpus'"),
    "malformed-cluster-number": (_plan(cluster="cpu:devices=two"), "devices='two'"),
    "missing-cluster-file": (_plan(cluster="nope.toml"), "'nope.toml' not found"),
    "malformed-toml": (_plan(cluster="{tmp}/bad.toml"), "malformed TOML"),
    "unknown-backend": (_plan("gpt", CPU2, "--backend", "gurobi"),
                        "unknown solver backend 'gurobi'"),
    "negative-time-limit": (_plan("gpt", CPU2, "--time-limit=-1"), "--time-limit"),
    "output-folder-missing": (_plan(SUCCESS_MODEL, CPU2, "-o", "{tmp}/no-such-dir/plan.json"),
                              "does not exist"),
    "run-missing-plan": (["run", "{tmp}/missing.json"], "not found"),
    "run-not-json": (["run", "{tmp}/not-json.json"], "not valid JSON"),
    "show-missing-plan": (["show", "{tmp}/missing.json"], "not found"),
    "cluster-file-zero-bandwidth": (_plan(SUCCESS_MODEL, "{tmp}/zero-bw.toml"),
                                    "[intra_node]: bandwidth_gbps=0.0 must be positive"),
    "cluster-file-contradictory": (_plan(SUCCESS_MODEL, "{tmp}/two-memories.toml"),
                                   "not both"),
    "stages-not-dividing-devices": (_plan(SUCCESS_MODEL, "cpu:devices=4", "--stages", "3"),
                                    "must divide the 4 devices"),
    "no-plan-fits": (_plan(SUCCESS_MODEL, "cpu:devices=2,memory_gb=0.000001"),
                     "per device; largest consumers: "),
    "time-limit-nothing-found": (_plan(SUCCESS_MODEL, "cpu:devices=4", "--time-limit", "1e-9"),
                                 "no plan found within the time limit"),
}

# Cases that need the plan written by the success command; run after it.
PLAN_CASES: dict[str, tuple[list[str], str]] = {
    "run-wrong-schema-version": (["run", "{tmp}/v99.json"], "schema_version 99"),
    "run-wrong-nproc": (["run", "{tmp}/ok.json", "--nproc", "3"], "--nproc 3"),
    "run-too-few-nproc": (["run", "{tmp}/ok.json", "--nproc", "1"], "--nproc 1"),
    "run-other-model": (["run", "{tmp}/other-model.json"],
                        "plan was made for a different graph of this model (graph hash differs)"),
}


def _cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    argv = [a.replace("{tmp}", str(cwd)) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "autoddl.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _run_all(jobs: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    workers = max(2, min(len(jobs), 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        futures = {k: pool.submit(_cli, argv, cwd) for k, argv in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every command's CompletedProcess by case id, and the work folder under key ``tmp``."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bad.toml").write_text("nodes = 1\ndevices_per_node = [\n")
    (tmp / "not-json.json").write_text("this is {not JSON\n")
    cluster_file = ('name = "c"\nnodes = 1\ndevices_per_node = 2\nmemory_per_device_gb = 16\n'
                    'peak_tflops = 10\ndevice_type = "cpu"\n[intra_node]\nbandwidth_gbps = {bw}\n'
                    'latency_us = 5\n')
    (tmp / "zero-bw.toml").write_text(cluster_file.format(bw=0))
    (tmp / "two-memories.toml").write_text(
        cluster_file.format(bw=10).replace("nodes = 1\n", "nodes = 1\nmemory_per_device_bytes = 9\n"))
    jobs = {k: argv for k, (argv, _) in ERROR_CASES.items()}
    jobs["plan-ok"] = ["plan", "--model", SUCCESS_MODEL, "--cluster", CPU2, "-o", "{tmp}/ok.json"]
    out: dict = _run_all(jobs, tmp)
    ok = tmp / "ok.json"
    if out["plan-ok"].returncode == 0 and ok.is_file():
        data = json.loads(ok.read_text())
        data["schema_version"] = 99
        (tmp / "v99.json").write_text(json.dumps(data))
        data["schema_version"] = 1
        # a plan made for this model, presented as one for another: the graph hashes differ
        data["model"]["spec"] = SUCCESS_MODEL.replace("hidden=16", "hidden=32")
        (tmp / "other-model.json").write_text(json.dumps(data))
        later = {k: argv for k, (argv, _) in PLAN_CASES.items()}
        later["show-ok"] = ["show", "{tmp}/ok.json"]
        out.update(_run_all(later, tmp))
    out["tmp"] = tmp
    return out


def _describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}"


def _check_user_error(p: subprocess.CompletedProcess, fragment: str) -> None:
    assert p.returncode == 2, _describe(p)
    assert "Traceback" not in p.stdout + p.stderr, _describe(p)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line\n{_describe(p)}"
    assert lines[0].startswith("autoddl: error: "), _describe(p)
    assert fragment in lines[0], f"error line does not name the problem ({fragment!r})\n" \
                                 + _describe(p)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_error(results, case):
    _check_user_error(results[case], ERROR_CASES[case][1].replace("{tmp}", str(results["tmp"])))


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_user_error_with_plan(results, case):
    if case not in results:
        pytest.skip("the success plan was not written (see test_plan_success)")
    _check_user_error(results[case], PLAN_CASES[case][1])


def test_failed_write_leaves_no_file(results):
    folder = results["tmp"] / "no-such-dir"
    assert not folder.exists()
    assert not list(results["tmp"].glob("**/plan.json")), "a plan was written somewhere"
    assert not list(results["tmp"].glob(".plan.json.*")), "a temporary file was left behind"


def test_plan_success(results):
    p = results["plan-ok"]
    assert p.returncode == 0, _describe(p)
    assert "Traceback" not in p.stdout + p.stderr
    assert MESH in p.stdout and "optimal" in p.stdout, p.stdout
    data = json.loads((results["tmp"] / "ok.json").read_text())
    assert data["schema_version"] == 1
    assert data["solver"]["status"] == "optimal"
    assert [(a["name"], a["size"]) for a in data["mesh"]["axes"]] == [("x", 2)]


def test_show_success(results):
    if "show-ok" not in results:
        pytest.skip("the success plan was not written (see test_plan_success)")
    p = results["show-ok"]
    assert p.returncode == 0, _describe(p)
    assert "Traceback" not in p.stdout + p.stderr
    assert MESH in p.stdout and "optimal" in p.stdout, p.stdout


def test_option_choices_match_the_engine():
    """The parser lists its choices without importing the engine: they must be the engine's."""
    from autoddl.cli import PRECISION_CHOICES, RECOMPUTE_CHOICES
    from autoddl.engine.costs import RECOMPUTE
    from autoddl.engine.precision import PRECISIONS

    assert set(RECOMPUTE_CHOICES) == set(RECOMPUTE)
    assert set(PRECISION_CHOICES) == set(PRECISIONS)
