"""Users' files and processes: outputs never written over inputs, non-regular files or folders;
Ctrl-C and SIGTERM leave no process behind; the user's model code cannot end the command with
exit code 0 and no output, hang it or print a traceback; absurd sizes and bad plan files get one
line. Data-loss and orphan tests check the filesystem and the process table, not messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoddl.engine.plan import format_seconds

TIMEOUT_S = 300
MODEL = '''
import os, sys, torch
from pathlib import Path

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)
    def forward(self, x):
        return self.l(x).pow(2).mean()

def ok():
    Path(os.environ.get("MARK", os.devnull)).write_text("built")  # the work has started
    return Net(), (torch.randn(4, 8),)
def sysexit(): sys.exit(0)
def osexit(): os._exit(0)
def raises(): raise ValueError("bad config")
def recurse(): return recurse()
def booly(): return Net(), (True,)
def forever():
    while True:
        pass
class IntLoss(Net):
    def forward(self, x):
        return (self.l(x) > 0).sum()
def intloss(): return IntLoss(), (torch.randn(4, 8),)
class ExitsWhenTraining(Net):
    def forward(self, x):
        from torch._subclasses.fake_tensor import FakeTensor
        if not isinstance(x, FakeTensor):  # a real step, not the capture
            os._exit(0)
        return super().forward(x)
def exits_when_training(): return ExitsWhenTraining(), (torch.randn(4, 8),)
'''


def _cli(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoddl.cli", *argv], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture()
def cli(monkeypatch, capsys):
    """The command line in this process (no start-up per call): ``cli(argv, cwd, **env)``."""
    from autoddl.cli import main

    def call(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
        with monkeypatch.context() as m:
            m.chdir(cwd)
            for k, v in env.items():
                m.setenv(k, v)
            rc = main(argv)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, rc, out.out, out.err)
    return call


def _one_line_error(p: subprocess.CompletedProcess, fragment: str = "") -> str:
    """The command failed with exit code 2 and exactly one line on stderr (no traceback)."""
    msg = f"exit {p.returncode}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}"
    assert p.returncode == 2, msg
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoddl: error: "), msg
    assert "Traceback" not in p.stderr, msg
    assert fragment in lines[0], msg
    return lines[0]


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "m.py").write_text(MODEL)
    (tmp_path / "c.toml").write_text(
        'name = "c"\nnodes = 1\ndevices_per_node = 2\nmemory_per_device_gb = 4\n'
        'peak_tflops = 1\ndevice_type = "cpu"\n[intra_node]\nbandwidth_gbps = 5\n'
        'latency_us = 50\n')
    return tmp_path


# --- outputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["m.py", "c.toml", "link-to-model"])
def test_plan_never_writes_over_its_inputs(cli, work, target):
    (work / "link-to-model").symlink_to(work / "m.py")
    before = {p: p.read_bytes() for p in (work / "m.py", work / "c.toml")}
    p = cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", target], work,
             MARK=str(work / "mark"))
    _one_line_error(p, "input of this command")
    assert {p: p.read_bytes() for p in before} == before
    assert (work / "link-to-model").is_symlink()
    assert not (work / "mark").exists()  # refused before the model was built


def test_outputs_that_are_folders_devices_empty_or_read_only_are_refused_first(cli, work):
    os.mkfifo(work / "fifo")
    (work / "folder").mkdir()
    cases = {"folder": "is a folder", "fifo": "not a regular file", "": "empty file name",
             "/proc/autoddl-plan.json": "cannot write in folder",
             "no-such/plan.json": "does not exist"}
    for out, fragment in cases.items():
        p = cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", out], work,
                 MARK=str(work / "mark"))
        _one_line_error(p, fragment)
        assert not (work / "mark").exists(), out  # checked before any work
    assert (work / "fifo").is_fifo() and (work / "folder").is_dir()
    assert sorted(x.name for x in (work / "folder").iterdir()) == []


def test_compare_and_show_outputs_are_checked(cli, work):
    p = cli(["compare", "--model", "m.py:ok", "--cluster", "c.toml", "--json", "m.py"], work,
             MARK=str(work / "mark"))
    _one_line_error(p, "input of this command")
    p = cli(["compare", "--model", "m.py:ok", "--cluster", "c.toml", "--json", "r.json",
              "--plot", "r.json"], work, MARK=str(work / "mark"))
    _one_line_error(p, "give two files")
    assert not (work / "mark").exists() and not (work / "r.json").exists()
    assert cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", "p.json"],
                work).returncode == 0
    plan_bytes = (work / "p.json").read_bytes()
    _one_line_error(cli(["show", "p.json", "--plot", "p.json"], work), "input of this command")
    assert (work / "p.json").read_bytes() == plan_bytes


# --- the user's code ---------------------------------------------------------------------------

@pytest.mark.parametrize("factory,fragment", [
    ("sysexit", "called sys.exit(0)"), ("osexit", "called os._exit(0)"),
    ("raises", "raised ValueError: bad config"), ("recurse", "recursed without end"),
    ("booly", "every example input must be a tensor"), ("intloss", "floating-point loss"),
    ("forever", "took more than 3 s"),
])
def test_model_code_cannot_end_hang_or_crash_the_planner(cli, work, factory, fragment):
    p = cli(["plan", "--model", f"m.py:{factory}", "--cluster", "c.toml", "-o", "p.json"],
             work, AUTODDL_CAPTURE_TIMEOUT_S="3")
    _one_line_error(p, fragment)
    assert not (work / "p.json").exists()


@pytest.mark.dist
def test_run_never_exits_0_when_a_rank_ended_early(cli, work):
    assert cli(["plan", "--model", "m.py:exits_when_training", "--cluster", "c.toml", "-o",
                 "p.json", "--stages", "1"], work).returncode == 0
    p = _cli(["run", "p.json", "--steps", "2", "--check"], work)  # the check calls forward
    assert p.returncode == 1, p.stderr
    assert "ended with exit code 0 before finishing" in p.stderr
    plan = json.loads((work / "p.json").read_text())
    plan["model"]["spec"] = "m.py:sysexit"  # a plan file naming a model that exits
    (work / "q.json").write_text(json.dumps(plan))
    _one_line_error(_cli(["run", "q.json"], work), "called sys.exit(0)")


# --- processes ---------------------------------------------------------------------------------

def _tagged(tag: str, but: int) -> list[int]:
    """Live processes (not zombies) carrying ``AUTODDL_TEST_TAG=tag``, other than ``but``."""
    needle = f"AUTODDL_TEST_TAG={tag}".encode()
    out = []
    for e in Path("/proc").glob("[0-9]*"):
        try:
            if int(e.name) != but and needle in (e / "environ").read_bytes().split(b"\0"):
                if (e / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(e.name))
        except (OSError, ValueError):
            continue
    return out


def _gone(tag: str, but: int, within_s: float) -> list[int]:
    end = time.monotonic() + within_s
    while (left := _tagged(tag, but)) and time.monotonic() < end:
        time.sleep(0.2)
    return left


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT delivered and handled by default, as for a command
    started from a shell (an ignored or blocked SIGINT is inherited across exec, and Python
    then installs no Ctrl-C handler; the test process's state depends on what ran before)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.dist
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_run_leaves_no_process(cli, work, how):
    assert cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", "p.json",
                 "--stages", "1"], work).returncode == 0
    tag = f"{os.getpid()}-{how}"
    proc = subprocess.Popen([sys.executable, "-m", "autoddl.cli", "run", "p.json", "--steps",
                             "1000000", "--save", "ck"], cwd=work, start_new_session=True,
                            env={**os.environ, "AUTODDL_TEST_TAG": tag, "OMP_NUM_THREADS": "1"},
                            # files, not pipes: nobody reads them until the end
                            stdout=(work / "out.txt").open("w"),
                            stderr=(work / "err.txt").open("w"),
                            preexec_fn=_as_from_a_terminal)
    try:
        end = time.monotonic() + 120
        while not any((work / "ck").glob("step-*")) and time.monotonic() < end:
            time.sleep(0.2)  # the ranks train and save
        assert len(_tagged(tag, proc.pid)) >= 3  # torchrun and two ranks
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
        else:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        try:  # torchrun gets 10 s to stop its ranks, then 10 s of SIGKILLs (launch.py)
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"autoddl run did not stop (this process: SIGINT handler "
                        f"{signal.getsignal(signal.SIGINT)}, blocked "
                        f"{signal.pthread_sigmask(signal.SIG_BLOCK, [])}): "
                        f"{(work / 'err.txt').read_text()[-2000:]}")
        assert code == {"ctrl-c": 130, "sigterm": 143, "sigkill": -9}[how]
        assert _gone(tag, proc.pid, 30) == []
        files = {p: p.stat().st_mtime_ns for p in (work / "ck").rglob("*")}
        time.sleep(2)  # nothing writes checkpoints any more
        assert {p: p.stat().st_mtime_ns for p in (work / "ck").rglob("*")} == files
    finally:
        for pid in _tagged(tag, proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- absurd numbers and bad plan files ---------------------------------------------------------

@pytest.mark.parametrize("model,cluster,fragment", [
    ("gpt:hidden=1000000000,heads=1", "cpu:devices=2", "too large"),
    ("gpt:batch=1000000000000000000", "cpu:devices=2", "too large"),
    ("mlp", "cpu:devices=2,memory_gb=1e300", "plausible maximum"),
    ("mlp", "cpu:devices=2,tflops=1e-300", "must be >="),
    ("mlp", "cpu:devices=2,tflops=1e300", "plausible maximum"),
    ("mlp", "dgx-a100:nodes=100000", "more than 131,072"),
    ("mlp", "dup.yaml", "given twice"),
])
def test_absurd_numbers_get_one_line(cli, work, model, cluster, fragment):
    (work / "dup.yaml").write_text("name: a\nnodes: 1\nnodes: 2\ndevices_per_node: 2\n")
    _one_line_error(cli(["plan", "--model", model, "--cluster", cluster, "-o", "p.json"],
                         work), fragment)
    assert not (work / "p.json").exists()


def test_seconds_stay_short_whatever_their_size():
    assert format_seconds(1.8935e292) == "1.893e+292 s"
    assert len(format_seconds(3e9)) < 12 and format_seconds(2.5) == "2.500 s"


def _edited(plan: dict, edit) -> dict:
    data = json.loads(json.dumps(plan))
    edit(data)
    return data


def _set_first_param(data: dict, placement: str) -> None:
    axis = data["mesh"]["axes"][0]["name"]
    next(o for o in data["ops"] if o["target"] == "param")["out"][axis] = placement


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


PLAN_EDITS = {
    "mesh-0": (lambda d: d["mesh"]["axes"][0].update(size=0), "below 1"),
    "mesh-negative": (lambda d: d["mesh"]["axes"][0].update(size=-4), "below 1"),
    "optimizer-lion": (lambda d: d["training"].update(optimizer="lion"), "'lion'"),
    "placement-garbage": (lambda d: _set_first_param(d, "S(x)"), "a placement is"),
    "nan-cost": (lambda d: d["cost"].update(total_s=float("nan")), "not a finite number"),
    "text-cost": (lambda d: d["cost"].update(step_time_s="fast"), "not a number"),
    "text-stage": (lambda d: d["ops"][0].update(stage="one"), "not an integer"),
    "stage-out-of-range": (lambda d: d["ops"][0].update(stage=7), "1 stage(s)"),
}


@pytest.mark.parametrize("case", list(PLAN_EDITS))
def test_bad_plan_files_are_refused_by_show_and_run_before_launch(cli, work, case):
    assert cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", "p.json",
                 "--stages", "1"], work).returncode == 0
    edit, fragment = PLAN_EDITS[case]
    (work / "bad.json").write_text(json.dumps(_edited(json.loads((work / "p.json").read_text()),
                                                      edit)))
    for argv in (["show", "bad.json"], ["run", "bad.json"]):
        p = cli(argv, work)
        _one_line_error(p, fragment)
        assert "rank" not in p.stderr  # refused before launch, not as a crashed rank


def test_deeply_nested_plan_file_is_one_line(cli, work):
    (work / "deep.json").write_text(_nested(100_000))
    _one_line_error(cli(["show", "deep.json"], work), "nests too deeply")


@pytest.mark.parametrize("edit,fragment", [
    ("out-P", "not a legal placement"), ("out-S9", "a split dim is missing"),
    ("drop-op", "do not place"),
])
def test_plans_are_checked_against_the_models_graph(cli, work, monkeypatch, edit, fragment):
    """What each rank checks once it has captured the model, before any step runs."""
    from autoddl.engine.capture import capture
    from autoddl.engine.models import build_model, parse_model_spec
    from autoddl.engine.plan import load_plan
    from autoddl.engine.repeat import match_plan
    from autoddl.errors import UserError

    assert cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", "p.json",
                "--stages", "1"], work).returncode == 0
    monkeypatch.chdir(work)
    graph = capture(*build_model(parse_model_spec("m.py:ok"), "meta"))
    data = json.loads((work / "p.json").read_text())
    match_plan(load_plan(work / "p.json"), graph)  # the plan as made passes
    linear = next(o for o in data["ops"] if o["target"] == "aten.linear.default")
    axis = data["mesh"]["axes"][0]["name"]
    if edit == "out-P":
        linear["out"][axis] = "P"
        for p in linear["in"]:
            p[axis] = "B"
    elif edit == "out-S9":
        linear["out"][axis] = "S(9)"
    else:
        data["ops"].remove(linear)
    (work / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=fragment):
        match_plan(load_plan(work / "bad.json"), graph)


def test_json_and_save_into_read_only_places_are_refused_first(cli, work):
    p = cli(["compare", "--model", "m.py:ok", "--cluster", "c.toml", "--json",
             "/proc/autoddl-rows.json"], work, MARK=str(work / "mark"))
    _one_line_error(p, "cannot write in folder")
    assert not (work / "mark").exists()
    assert cli(["plan", "--model", "m.py:ok", "--cluster", "c.toml", "-o", "p.json",
                "--stages", "1"], work).returncode == 0
    for folder, fragment in (("/proc/autoddl-ck", "cannot create folder"),
                             ("p.json", "is the plan file"), ("m.py", "is not a folder")):
        _one_line_error(cli(["run", "p.json", "--save", folder], work), fragment)
    assert (work / "m.py").read_text() == MODEL
