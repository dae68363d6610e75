"""``autoddl run``: launch the planned training with torchrun, one process per device.

:func:`run_ranks` launches any rank module this way (``autoddl calibrate`` uses it too), with
``command`` naming the command in the lines below. A user error any rank reports (``autoddl run:
error: ...``, e.g. a plan for another graph) becomes a :class:`UserError` here: one line, exit
code 2. A rank that raises or dies makes the job fail: torchrun stops the other ranks, and this
prints ``autoddl run: failed: rank R (exit code C): ...`` naming each failed rank and what it
reported, and returns 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from autoddl.engine.plan import load_plan
from autoddl.engine.precision import plan_precision
from autoddl.files import check_output_folder
from autoddl.errors import CHECK_FAILED, Terminated, UserError, raise_on_sigterm
from autoddl.runtime import checkpoint
from autoddl.runtime.rank import JOB_DIR_ENV, die_with_parent

#: one failure block of torchrun's summary: "rank : 1 (local_rank: 1)" then "exitcode : -9"
_RANK_FAIL = re.compile(r"^\s*rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", re.M)
#: what a rank says when it only lost its peers (a consequence, not the cause)
_PEER_LOST = re.compile(r"by peer|Connection refused|remote worker|Broken pipe", re.I)
WORKER = "autoddl.runtime.worker"


def torchrun_command(module: str, nproc: int, args: list[str]) -> list[str]:
    """The torchrun command line that runs ``python -m module args`` on ``nproc`` local
    processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *args]


def launch(plan_path: str, nproc: int | None, steps: int = 1, check: bool = False,
           lr: float | None = None, tol: float | None = None, save: str | None = None,
           resume: str | None = None, precision: str | None = None) -> int:
    """Run a plan on ``nproc`` local processes; returns the job's exit code. ``lr``: None for
    the saved one when resuming, else 1e-3; ``save``: a folder to save the training state into
    after every step; ``resume``: a folder to start from (its newest complete step).
    ``tol``: None for the default of the plan's precision; ``precision``: None, or the plan's
    own (a plan's bytes and memory were predicted in one precision: it runs in that one)."""
    plan = load_plan(plan_path)
    if str(plan.model.get("spec", "")).startswith("python:"):
        raise UserError(f"plan {plan_path!r} was made by autoddl.plan() from a model object, "
                        "which `autoddl run` cannot rebuild: plan a --model spec (or "
                        "file.py:factory) to run it from the command line")
    have = plan_precision(plan.training)
    if precision is not None and precision != have:
        raise UserError(f"plan {plan_path!r} was costed in {have}, not {precision}: re-plan "
                        f"with `autoddl plan --precision {precision}` or run without --precision")
    need = plan.num_devices
    nproc = need if nproc is None else nproc
    if nproc != need:
        raise UserError(f"plan {plan_path!r} is for {need} devices (mesh "
                        f"{'x'.join(map(str, plan.device_mesh_shape))}); got --nproc {nproc}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    args = ["--steps", str(steps)] + ([] if tol is None else ["--tol", repr(tol)])
    if lr is not None:
        args += ["--lr", repr(lr)]
    if check:
        args.append("--check")
    if resume is not None:  # the ranks check again; this fails before starting them
        checkpoint.check_resumable(checkpoint.latest(resume), plan, check)
        args += ["--resume", resume]
    if save is not None:
        if os.path.realpath(save) == os.path.realpath(plan_path):
            raise UserError(f"--save {save!r} is the plan file; give a folder")
        check_output_folder(save, "--save")
        args += ["--save", save]
    return run_ranks(WORKER, nproc, [plan_path, *args], "autoddl run")


def run_ranks(module: str, nproc: int, args: list[str], command: str) -> int:
    """Run ``module`` with ``args`` on ``nproc`` local torchrun processes; returns 0 or 1 (a rank
    failed: reported on stderr by rank, causes first). A user error the ranks report becomes
    one :class:`UserError`; a rank that ends with exit code 0 before its work is done (user
    code calling ``os._exit``) is a failure. Each rank gets ``OMP_NUM_THREADS=1`` unless it is
    set. SIGINT (Ctrl-C) or SIGTERM stops torchrun and every rank before this returns (exit
    130 or 143, via :class:`KeyboardInterrupt` / :class:`Terminated`)."""
    with tempfile.TemporaryDirectory(prefix="autoddl-job-") as job:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"), JOB_DIR_ENV: job}
        returncode, stderr = _supervise(torchrun_command(module, nproc, args), env, job)
        own = [Path(job, f"error-{r}").read_text() for r in range(nproc)
               if Path(job, f"error-{r}").is_file()]
        done = [r for r in range(nproc) if Path(job, f"done-{r}").is_file()]
    if own:  # the same user error on every rank, typically: one line, exit code 2
        raise UserError("; ".join(dict.fromkeys(own)))
    if returncode == 0 and len(done) == nproc:
        return 0
    if returncode == 0:
        missing = ", ".join(str(r) for r in range(nproc) if r not in done)
        print(f"{command}: failed: rank(s) {missing} ended with exit code 0 before finishing "
              "(the model's code or a library called os._exit?)", file=sys.stderr)
        return 1
    lines = [ln.split("]:", 1)[-1].strip() if ln.startswith("[") else ln
             for ln in stderr.splitlines()]
    rank_says = re.compile(re.escape(command) + r": rank (\d+): (.*)$")
    says: dict[int, str] = {}
    for ln in lines:
        m = rank_says.search(ln)
        if m:
            says.setdefault(int(m.group(1)), m.group(2))
    failed = sorted({(int(r), int(c)) for r, c in _RANK_FAIL.findall(stderr)
                     if int(c) != -15})  # -15: a peer stopped by torchrun
    failed += [(r, 1) for r in says if r not in {f for f, _ in failed}]
    if failed and all(code == CHECK_FAILED for _, code in failed):
        print(f"{command}: failed: --check found a mismatch on rank(s) "
              f"{', '.join(str(r) for r, _ in failed)} (see the MISMATCH lines above)",
              file=sys.stderr)
    elif failed:
        print(f"{command}: failed: {_describe_failures(failed, says)}", file=sys.stderr)
    else:
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        print(f"{command}: failed with exit code {returncode}:\n{tail}", file=sys.stderr)
    return 1


def _supervise(cmd: list[str], env: dict[str, str], job: str) -> tuple[int, str]:
    """Run torchrun's ``cmd`` to its end: (exit code, its stderr). On SIGINT or SIGTERM, stop
    torchrun (which stops its ranks), kill whatever of the job is left, then re-raise."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # signals reach it from here only ...
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))  # ... or death
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()

    try:
        with raise_on_sigterm():
            proc.wait()
    except (KeyboardInterrupt, Terminated):
        _stop_job(proc, job)
        raise
    reader.join(timeout=10)
    return proc.returncode, "".join(chunks)


#: seconds torchrun gets to stop its ranks before everything of the job is killed
STOP_GRACE_S = 10.0


def _stop_job(proc: subprocess.Popen, job: str) -> None:
    """SIGTERM to torchrun, which stops its ranks; after :data:`STOP_GRACE_S`, SIGKILL to it and
    to every process still carrying this job's folder in its environment."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    deadline = time.monotonic() + STOP_GRACE_S
    while (left := job_processes(job)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def job_processes(job: str) -> list[int]:
    """PIDs of live processes whose environment names job folder ``job`` (Linux ``/proc``)."""
    needle = f"{JOB_DIR_ENV}={job}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                    pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _describe_failures(failed: list[tuple[int, int]], says: dict[int, str]) -> str:
    """The failed ranks, causes first: a rank killed by a signal or reporting its own error, then
    the ranks that only lost their peers."""
    def one(rank: int, code: int) -> str:
        sig = f", killed by signal {-code}" if code < 0 else ""
        msg = says.get(rank, "")
        return f"rank {rank} (exit code {code}{sig})" + (f": {msg[:160]}" if msg else "")

    def lost(rank: int, code: int) -> bool:
        return code >= 0 and bool(_PEER_LOST.search(says.get(rank, "")))

    causes = [one(r, c) for r, c in sorted(set(failed)) if not lost(r, c)]
    others = [f"rank {r} lost its peers" for r, c in sorted(set(failed)) if lost(r, c)]
    return "; ".join((causes or [one(*failed[0])]) + (["then " + ", ".join(others)]
                                                      if causes and others else []))
