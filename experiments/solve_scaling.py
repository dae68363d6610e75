"""Planning time and quality on the Megatron-LM SC'21 GPT table and GPT-3 175B.

For each case: capture, build and solve seconds, variables, status, gap, peak memory of the
process; CSV and a log-log plot under experiments/results/. Run:

    python experiments/solve_scaling.py [--cases gpt-1.7b,gpt3-175b] [--time-limit 60]

Each case runs `plan_graph` on the preset (3 layers captured, repeated layers solved once) with
the DGX-A100 cluster of the published GPU count and the plain command's defaults (recomputation
decided by the planner, the default gap); with --time-limit, the best plan of that time and its
proven gap. The whole `autoddl plan` command with no flags is timed beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoddl.engine.capture import capture, default_microbatches, microbatch_inputs
from autoddl.engine.cluster import parse_cluster
from autoddl.engine.costs import TrainingConfig
from autoddl.engine.models import GPT_PRESETS, build_model, parse_model_spec, with_layers
from autoddl.engine.planner import plan_graph
from autoddl.errors import UserError

GPUS = {"gpt-1.7b": 32, "gpt-3.6b": 64, "gpt-7.5b": 128, "gpt-18.4b": 256, "gpt-39.1b": 512,
        "gpt-76.1b": 1024, "gpt-145.6b": 1536, "gpt-310.1b": 1920, "gpt-529.6b": 2520,
        "gpt-1t": 3072, "gpt3-175b": 1024}



def run_case(name: str, time_limit_s: float | None) -> dict:
    """Plan one preset on its published GPU count; what it cost and what it found."""
    t0 = time.perf_counter()
    spec = parse_model_spec(name)
    layers = dict(spec.params)["layers"]
    model, inputs = build_model(with_layers(spec, 3), "meta")
    graph = capture(model, inputs)
    m = default_microbatches(inputs)
    mb = capture(model, microbatch_inputs(inputs, m))
    capture_s = time.perf_counter() - t0
    cluster = parse_cluster(f"dgx-a100:nodes={GPUS[name] // 8}")
    row = {"case": name, "gpus": GPUS[name], "layers": layers, "capture_s": round(capture_s, 2)}
    t1 = time.perf_counter()
    try:
        plan = plan_graph(graph, cluster, model_spec=name, microbatch_graph=mb, microbatches=m,
                          layers=layers, time_limit_s=time_limit_s,
                          config=TrainingConfig("adam", recompute="auto",
                                                precision="bf16"))  # the CLI's defaults
        cands = plan.candidates
        times = plan.timings.get("candidates") or [{} for _ in cands]  # same order
        row.update(status=plan.solver["status"], gap=plan.solver["gap"],
                   objective_s=plan.solver["objective"], bound_s=plan.solver["bound"],
                   mesh="x".join(map(str, plan.device_mesh_shape)), stages=plan.num_stages,
                   candidates=len(cands),
                   ilps_solved=sum(c["variables"] is not None for c in cands),
                   pruned=sum(c["status"] in ("pruned", "dominated") for c in cands),
                   build_s=round(sum(t.get("build_s") or 0.0 for t in times), 2),
                   screen_s=round(sum(t.get("bound_s") or 0.0 for t in times), 2),
                   milp_s=round(sum(t.get("time_s") or 0.0 for t in times), 2),
                   variables=max((c["variables"] or 0 for c in cands), default=0))
    except UserError as exc:  # no plan, or none within the time limit
        row.update(status="no plan", note=str(exc)[:160])
    row["plan_s"] = round(time.perf_counter() - t1, 2)
    row["total_s"] = round(time.perf_counter() - t0, 2)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return row


def run_command(name: str) -> dict:
    """The whole ``autoddl plan`` command on the case, as a user runs it: its wall time (Python's
    start and torch's import included) and the peak memory of its main process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "autoddl.cli", "plan", "--model", name,
               "--cluster", f"dgx-a100:nodes={GPUS[name] // 8}",
               "-o", str(Path(tmp) / "plan.json")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode() if proc.stderr else ""
        proc.stderr.close()
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"command_s": round(wall, 2) if ok else None,
            "command_peak_gb": round(usage.ru_maxrss / 1e6, 2),
            **({} if ok else {"command_error": err.strip()[-160:]})}


def write_markdown(rows: list[dict], path: Path) -> None:
    """The rows as a markdown table."""
    cols = [("case", "model"), ("gpus", "GPUs"), ("status", "status"), ("gap", "gap"),
            ("objective_s", "cost/step (s)"), ("mesh", "mesh"), ("stages", "stages"),
            ("candidates", "candidates"), ("ilps_solved", "ILPs solved"),
            ("screen_s", "bounding (s, CPU)"), ("milp_s", "MILP (s)"),
            ("variables", "largest ILP (vars)"), ("total_s", "total (s)"),
            ("peak_rss_gb", "peak memory (GB)"), ("command_s", "`autoddl plan` (s)"),
            ("command_peak_gb", "its peak memory (GB)")]

    def fmt(k, v):
        if v is None or v == "":
            return ""
        if k == "gap":
            return f"{100 * v:.2g} %"
        if k == "objective_s":
            return f"{v:.4g}"
        return str(v)

    lines = ["# Planning time on the Megatron-LM SC'21 table and GPT-3 175B", "",
             "Generated by `python experiments/solve_scaling.py`; each case in its own process on "
             "a 2-core machine; DGX-A100 clusters of the published GPU counts; the plain "
             "command's defaults (bf16, recomputation decided by the planner, the default gap); "
             "objective: the predicted step time. `total` is the whole planning call (capture, "
             "screening, ILPs); `autoddl plan` is the whole command as a user runs it "
             "(`autoddl plan --model CASE --cluster dgx-a100:nodes=N`, no flags), Python's "
             "start and torch's import included.", "",
             "| " + " | ".join(h for _, h in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    """Run the cases given (default: all), each in its own process (its own peak memory), and
    write the results after each case."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(GPUS))
    ap.add_argument("--time-limit", type=float, default=None, help="per case, seconds")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print its row
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_case(a.one, a.time_limit)))
        return
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for name in a.cases.split(","):
        if name not in GPT_PRESETS:
            raise SystemExit(f"unknown case {name!r}; choose from {', '.join(GPUS)}")
        cmd = [sys.executable, __file__, "--one", name]
        if a.time_limit:
            cmd += ["--time-limit", str(a.time_limit)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append({"case": name, "gpus": GPUS[name], "status": "error",
                         "note": done.stderr.strip().splitlines()[-1][:160]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if not a.time_limit:
                rows[-1].update(run_command(name))
        print(rows[-1], file=sys.stderr, flush=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "solve_scaling.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        write_markdown(rows, out / "solve_scaling.md")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        rows = [r for r in rows if r.get("total_s")]
        xs = [r["gpus"] for r in rows]
        ax.loglog(xs, [r["total_s"] for r in rows], "o-")
        for r in rows:
            ax.annotate(r["case"], (r["gpus"], r["total_s"]), fontsize=7)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("autoddl plan, seconds (2-core box)")
        fig.tight_layout()
        fig.savefig(out / "solve_scaling.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
