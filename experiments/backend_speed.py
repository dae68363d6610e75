"""Solve the same sharding ILPs with every solver backend; record time, status and objective.

Writes experiments/results/backends.csv and backends.md. Run: python experiments/backend_speed.py
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from autoddl.engine.capture import capture
from autoddl.engine.cluster import parse_cluster
from autoddl.engine.costs import build_problem
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.formulations.backends import available_backends, solve
from autoddl.formulations.sharding import ShardingModel

CASES = [
    ("mlp:batch=64,dim_in=64,hidden=256,layers=2,dim_out=64", "cpu:devices=4"),
    ("gpt:layers=2,hidden=256,heads=8,seq=64,batch=16,vocab=512", "cpu:devices=4"),
    ("gpt:layers=2,hidden=256,heads=8,seq=64,batch=16,vocab=512", "dgx-a100:nodes=1"),
]
TIME_LIMIT_S = 60.0


def main() -> None:
    """Run every case with every backend and write the tables."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for spec, cspec in CASES:
        s = parse_model_spec(spec)
        graph = capture(*build_model(s, "meta"))
        c = parse_cluster(cspec)
        for mesh in c.meshes():
            milp = ShardingModel(build_problem(graph, mesh, c).problem).milp()
            for backend in available_backends():
                t0 = time.perf_counter()
                r = solve(milp, backend=backend, time_limit_s=TIME_LIMIT_S)
                wall = time.perf_counter() - t0
                rows.append({
                    "model": spec, "cluster": cspec, "mesh": str(mesh), "backend": backend,
                    "variables": milp.num_cols, "constraints": milp.num_rows,
                    "status": r.status.value, "objective_s": r.objective, "gap": r.gap,
                    "wall_s": round(wall, 3),
                })
                print(rows[-1], file=sys.stderr, flush=True)
    with open(out / "backends.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Solver backends on the same sharding ILPs", "",
             f"Machine: 2 cores (this repo's dev box); time limit {TIME_LIMIT_S:.0f} s per solve. "
             "Written by `experiments/backend_speed.py`.", "",
             "| model | cluster | mesh | vars | rows | backend | status | objective (s) | gap | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        obj = "—" if r["objective_s"] is None else f"{r['objective_s']:.6g}"
        gap = "—" if r["gap"] is None else f"{r['gap']:.2g}"
        lines.append(f"| {r['model']} | {r['cluster']} | {r['mesh']} | {r['variables']} | "
                     f"{r['constraints']} | {r['backend']} | {r['status']} | {obj} | {gap} | "
                     f"{r['wall_s']} |")
    (out / "backends.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
