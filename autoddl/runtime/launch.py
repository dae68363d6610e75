"""``autoddl run``: launch the planned training with torchrun, one process per device."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from autoddl.engine.plan import load_plan
from autoddl.errors import UserError

_RANK_FAIL = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def torchrun_command(plan_path: str, nproc: int, worker_args: list[str]) -> list[str]:
    """The torchrun command line that runs the worker on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "autoddl.runtime.worker", plan_path, *worker_args]


def launch(plan_path: str, nproc: int | None, steps: int = 1, check: bool = False,
           lr: float = 1e-3, tol: float = 1e-5) -> int:
    """Run a plan on ``nproc`` local processes; returns the job's exit code."""
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
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    proc = subprocess.run(torchrun_command(plan_path, nproc, args), env=env,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        own = [ln for ln in proc.stderr.splitlines() if "autoddl run: error:" in ln]
        for ln in dict.fromkeys(own):
            print(ln.split("]", 1)[-1].strip() if ln.startswith("[") else ln, file=sys.stderr)
        failed = sorted({(int(r), int(c)) for r, c in _RANK_FAIL.findall(proc.stderr)
                         if int(c) not in (-15,)})
        if failed:
            desc = ", ".join(f"rank {r} (exit code {c})" for r, c in failed)
            print(f"autoddl run: failed: {desc}", file=sys.stderr)
        elif not own:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            print(f"autoddl run: failed with exit code {proc.returncode}:\n{tail}",
                  file=sys.stderr)
        codes = {c for _, c in failed}
        return 2 if own or codes == {2} else 1
    return 0
