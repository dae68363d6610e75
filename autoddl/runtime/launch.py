"""``autoddl run``: launch the planned training with torchrun, one process per device.

:func:`run_ranks` launches any rank module this way (``autoddl calibrate`` uses it too), with
``command`` naming the command in the lines below. A user error any rank reports (``autoddl run:
error: ...``, e.g. a plan for another graph) becomes a :class:`UserError` here: one line, exit
code 2. A rank that raises or dies makes the job fail: torchrun stops the other ranks, and this
prints ``autoddl run: failed: rank R (exit code C): ...`` naming each failed rank and what it
reported, and returns 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from autoddl.engine.plan import load_plan
from autoddl.errors import CHECK_FAILED, UserError

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
           lr: float = 1e-3, tol: float = 1e-5, save: str | None = None,
           resume: str | None = None) -> int:
    """Run a plan on ``nproc`` local processes; returns the job's exit code. ``save``: a folder
    to write the training state to after every step; ``resume``: a folder to start from."""
    plan = load_plan(plan_path)
    need = plan.num_devices
    nproc = need if nproc is None else nproc
    if nproc != need:
        raise UserError(f"plan {plan_path!r} is for {need} devices (mesh "
                        f"{'x'.join(map(str, plan.device_mesh_shape))}); got --nproc {nproc}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    args = ["--steps", str(steps), "--lr", repr(lr), "--tol", repr(tol)]
    if check:
        args.append("--check")
    if resume is not None:
        if not Path(resume).is_dir():
            raise UserError(f"--resume: folder {resume!r} not found; give a folder written by "
                            "`autoddl run --save`")
        if not any(Path(resume).glob("rank*.pt")):
            raise UserError(f"--resume: no checkpoint files (rank*.pt) found in {resume!r}; "
                            "give a folder written by `autoddl run --save`")
        args += ["--resume", resume]
    if save is not None:
        if not Path(save).resolve().parent.is_dir():
            raise UserError(f"--save: folder {str(Path(save).parent)!r} does not exist")
        Path(save).mkdir(exist_ok=True)
        args += ["--save", save]
    return run_ranks(WORKER, nproc, [plan_path, *args], "autoddl run")


def run_ranks(module: str, nproc: int, args: list[str], command: str) -> int:
    """Run ``module`` with ``args`` on ``nproc`` local torchrun processes; returns 0 or 1 (a rank
    failed: reported on stderr by rank, causes first). The ranks report a user error as
    ``<command>: error: ...`` (raised here as one :class:`UserError`) and a fault as ``<command>:
    rank R: ...``; each rank gets ``OMP_NUM_THREADS=1`` unless it is set."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    proc = subprocess.run(torchrun_command(module, nproc, args), env=env,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0:
        return 0
    lines = [ln.split("]:", 1)[-1].strip() if ln.startswith("[") else ln
             for ln in proc.stderr.splitlines()]
    user_error = f"{command}: error: "
    own = list(dict.fromkeys(ln.split(user_error, 1)[1] for ln in lines if user_error in ln))
    if own:  # the same user error on every rank, typically: one line, exit code 2
        raise UserError("; ".join(own))
    rank_says = re.compile(re.escape(command) + r": rank (\d+): (.*)$")
    says: dict[int, str] = {}
    for ln in lines:
        m = rank_says.search(ln)
        if m:
            says.setdefault(int(m.group(1)), m.group(2))
    failed = sorted({(int(r), int(c)) for r, c in _RANK_FAIL.findall(proc.stderr)
                     if int(c) != -15})  # -15: a peer stopped by torchrun
    failed += [(r, 1) for r in says if r not in {f for f, _ in failed}]
    if failed and all(code == CHECK_FAILED for _, code in failed):
        print(f"{command}: failed: --check found a mismatch on rank(s) "
              f"{', '.join(str(r) for r, _ in failed)} (see the MISMATCH lines above)",
              file=sys.stderr)
    elif failed:
        print(f"{command}: failed: {_describe_failures(failed, says)}", file=sys.stderr)
    else:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        print(f"{command}: failed with exit code {proc.returncode}:\n{tail}", file=sys.stderr)
    return 1


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
