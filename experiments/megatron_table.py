"""The Megatron-LM SC'21 GPT table (Narayanan et al., Table 1): the published step time beside
the one autoddl predicts for the published plan, then the ILP's plan, on DGX-A100 nodes.

For each row: the published step time (the paper's FLOPs per step over the GPUs at the
published TFLOP/s per GPU), the published plan (tensor parallel t inside a node, p pipeline
stages of equal runs of layers, data parallel d, m = batch / (d · b) micro-batches, v
interleaved chunks) costed by autoddl's step-time model with the `dgx-a100` preset's figures (no
per-row tuning), the best of the PTD-P grid under the same model, and the ILP's plan (full
activation recomputation, as Megatron; the same m). The ILP search has a per-case time limit: a
plan found within it reports its gap; cases that did not finish are recorded as such. Writes
experiments/results/megatron_table.{md,csv,json}; the rows run replace their earlier results,
the others are kept. Run:

    python experiments/megatron_table.py [--cases gpt-1.7b,gpt-3.6b] [--time-limit 300] [--no-ilp]
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

from autoddl.engine import baselines as bl
from autoddl.engine.compare import ilp_outcomes
from autoddl.engine.plan import format_bytes
from autoddl.engine.workload import load_workload

HERE = Path(__file__).parent
TABLE = HERE.parent.parent / "shared" / "reference" / "megatron_sc21_table1.csv"
PRESET = {"gpt-1008b": "gpt-1t"}
SEQ, VOCAB = 2048, 51200  # the table's sequence length and vocabulary


def read_table() -> list[dict[str, str]]:
    """The published rows."""
    lines = [ln for ln in TABLE.read_text().splitlines() if ln and not ln.startswith("#")]
    return list(csv.DictReader(lines))


def published_step_s(row: dict[str, str]) -> float:
    """The published step time: FLOPs per step (Narayanan et al.'s formula, full recomputation)
    / (GPUs × published TFLOP/s per GPU)."""
    b, s, v = int(row["batch"]), SEQ, VOCAB
    l, h = int(row["layers"]), int(row["hidden"])
    flops = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return flops / (int(row["gpus"]) * float(row["tflops_per_gpu"]) * 1e12)


def run_case(row: dict[str, str], time_limit_s: float, ilp: bool = True) -> dict:
    """The published plan (with its interleaving) costed by autoddl beside the published step
    time, the PTD-P grid's best and the ILP's plan of one table row."""
    t, p, d = int(row["t"]), int(row["p"]), int(row["d"])
    v = int(row["interleave_v"])
    gpus, batch, b = int(row["gpus"]), int(row["batch"]), int(row["b"])
    m = batch // (d * b)
    name = PRESET.get(row["name"], row["name"])
    t0 = time.perf_counter()
    work = load_workload(name, f"dgx-a100:nodes={gpus // 8}", recompute="layers",
                         microbatches=m if m > 1 else None)
    out: dict = {"model": row["name"], "gpus": gpus,
                 "published": f"t={t},p={p},d={d}" + (f",v={v}" if v > 1 else ""),
                 "microbatches": work.microbatches, "capture_s": round(time.perf_counter() - t0, 1),
                 "published_step_s": published_step_s(row)}
    pub = bl.ptdp(work, t, p, d, v=v)
    if pub.plan is not None:
        out.update(predicted_step_s=pub.plan.cost["total_s"],
                   published_memory=format_bytes(pub.plan.memory["per_device_bytes"]),
                   published_fits=pub.fits)
        out["predicted_over_published"] = out["predicted_step_s"] / out["published_step_s"]
    else:
        out["published_note"] = pub.note
    if not ilp:
        return out
    grid = bl.ptdp_grid(work)
    if grid.plan is not None:
        out.update(grid=grid.config, grid_cost_s=grid.plan.cost["total_s"],
                   grid_fits=grid.fits)
    t1 = time.perf_counter()
    best, _ = ilp_outcomes(work, None, time_limit_s)
    plan = best.plan
    out.update(ilp_mesh=best.config, ilp_cost_s=plan.cost["total_s"],
               ilp_memory=format_bytes(plan.memory["per_device_bytes"]),
               ilp_status=plan.solver["status"], ilp_gap=plan.solver["gap"],
               ilp_s=round(time.perf_counter() - t1, 1))
    if "predicted_step_s" in out:
        out["published_over_ilp"] = out["predicted_step_s"] / plan.cost["total_s"]
    return out


def _worker(row: dict[str, str], time_limit_s: float, ilp: bool, q) -> None:
    try:
        q.put(run_case(row, time_limit_s, ilp))
    except Exception as exc:  # recorded in the table, not fatal to the other rows
        q.put({"model": row["name"], "note": f"{type(exc).__name__}: {str(exc)[:200]}"})


def main() -> None:
    """Run the rows given (default: all) and write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="all", help="comma-separated row names, or all")
    ap.add_argument("--no-ilp", action="store_true",
                    help="only the published plans' predicted step times")
    ap.add_argument("--time-limit", type=float, default=240.0,
                    help="seconds for the ILP search of each case")
    ap.add_argument("--wall", type=float, default=600.0,
                    help="seconds after which a whole case is stopped and recorded unfinished")
    a = ap.parse_args()
    rows = {r["name"]: r for r in read_table()}
    results = []
    for name in (list(rows) if a.cases == "all" else a.cases.split(",")):
        q: mp.Queue = mp.Queue()
        proc = mp.Process(target=_worker, args=(rows[name], a.time_limit, not a.no_ilp, q))
        t0 = time.perf_counter()
        proc.start()
        proc.join(a.wall)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            res = {"model": name, "gpus": rows[name]["gpus"],
                   "published": f"t={rows[name]['t']},p={rows[name]['p']},d={rows[name]['d']}",
                   "note": f"not finished within {a.wall:.0f} s"}
        else:
            res = q.get()
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(res, file=sys.stderr, flush=True)
    write(results)


COLS = ["model", "gpus", "published", "microbatches", "published_step_s", "predicted_step_s",
        "predicted_over_published", "published_memory", "published_fits", "grid", "grid_cost_s",
        "grid_fits", "ilp_mesh", "ilp_cost_s", "ilp_memory", "ilp_status", "ilp_gap", "ilp_s",
        "published_over_ilp", "wall_s", "note", "published_note", "capture_s"]


def _ms(v) -> str:
    return "—" if v is None else f"{1e3 * v:,.0f} ms"


def _md_row(r: dict) -> str:
    gap = r.get("ilp_gap")
    status = r.get("ilp_status", "—") + ("" if gap is None else f" ({100 * gap:.2g} %)")
    ratio, pred = r.get("published_over_ilp"), r.get("predicted_over_published")
    saving = (None if ratio is None else
              f"{1e3 * (r['predicted_step_s'] - r['ilp_cost_s']):,.0f} ms ({100 * (1 - 1 / ratio):.1f} %)")
    return " | ".join([
        f"| {r['model']}", str(r.get("gpus", "")), r.get("published", ""),
        str(r.get("microbatches", "")), _ms(r.get("published_step_s")),
        _ms(r.get("predicted_step_s")), "—" if pred is None else f"{pred:.2f}",
        r.get("published_memory", "—") + ("" if r.get("published_fits", True)
                                          else " (does not fit)"),
        r.get("ilp_mesh", "—"), _ms(r.get("ilp_cost_s")), r.get("ilp_memory", "—"), status,
        "—" if "ilp_s" not in r else f"{r['ilp_s']} s", "—" if saving is None else saving,
        (r.get("note", "") + " " + r.get("published_note", "")).strip() + " |"])


def write(new: list[dict]) -> None:
    """megatron_table.json, .csv and .md under experiments/results/ (earlier rows kept)."""
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    saved = out / "megatron_table.json"
    by_model = {r["model"]: r for r in (json.loads(saved.read_text()) if saved.exists() else [])}
    by_model.update({r["model"]: r for r in new})
    order = [r["name"] for r in read_table()]
    results = sorted(by_model.values(), key=lambda r: order.index(r["model"]))
    saved.write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "megatron_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    md = ["# Megatron-LM SC'21 table: predicted step time beside the published one, and the "
          "ILP's plan", "",
          "Generated by `python experiments/megatron_table.py`; DGX-A100 (8 × A100 80 GB per "
          "node, the `dgx-a100` preset's compute figures, one set for every row), bf16 with "
          "fp32 master weights and Adam states, full activation recomputation, m = batch / (d "
          "· b) micro-batches and the interleaving v as published. *Published step* = the "
          "paper's FLOPs per step (96·B·s·l·h²·(1 + s/6h + V/16lh)) ÷ (GPUs × published "
          "TFLOP/s per GPU). *Predicted* = autoddl's step time of the published (t, p, d, v) "
          "plan. *ILP plan* = the planner's optimum under the same model (its proof: status "
          "and gap); *saving* = predicted published step − ILP step.", "",
          "| model | GPUs | published (t,p,d,v) | m | published step | predicted | predicted "
          "/ published | memory | ILP plan | ILP step | memory | status (gap) | ILP search "
          "| saving | note |", "|" + "---|" * 15]
    md += [_md_row(r) for r in results]
    (out / "megatron_table.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
