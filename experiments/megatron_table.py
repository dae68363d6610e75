"""The Megatron-LM SC'21 GPT table (Narayanan et al., Table 1): its published (t, p, d) beside
autoddl's plan, on DGX-A100 nodes, under one cost model.

For each row: the published plan costed by autoddl's model (tensor parallel t inside a node,
p pipeline stages of equal runs of layers, data parallel d, micro-batches m = batch / (d · b) as
published; interleaved virtual stages are not modelled), the best of the PTD-P grid under the
same model, and the ILP's plan (full activation recomputation, as Megatron; the same m). The ILP
search has a per-case time limit: a plan found within it reports its gap; cases that did not
finish are recorded as such. Writes experiments/results/megatron_table.{md,csv,json}; the rows
run replace their earlier results, the others are kept. Run:

    python experiments/megatron_table.py [--cases gpt-1.7b,gpt-3.6b] [--time-limit 300]
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


def _worker(row: dict[str, str], time_limit_s: float, q) -> None:
    try:
        q.put(run_case(row, time_limit_s))
    except Exception as exc:  # recorded in the table, not fatal to the other rows
        q.put({"model": row["name"], "note": f"{type(exc).__name__}: {str(exc)[:200]}"})


def main() -> None:
    """Run the rows given (default: the first four) and write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="gpt-1.7b,gpt-3.6b,gpt-7.5b,gpt-18.4b")
    ap.add_argument("--time-limit", type=float, default=240.0,
                    help="seconds for the ILP search of each case")
    ap.add_argument("--wall", type=float, default=600.0,
                    help="seconds after which a whole case is stopped and recorded unfinished")
    a = ap.parse_args()
    rows = {r["name"]: r for r in read_table()}
    results = []
    for name in a.cases.split(","):
        q: mp.Queue = mp.Queue()
        proc = mp.Process(target=_worker, args=(rows[name], a.time_limit, q))
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


COLS = ["model", "gpus", "published", "microbatches", "published_cost_s", "published_memory",
        "published_fits", "grid", "grid_cost_s", "grid_fits", "ilp_mesh", "ilp_cost_s",
        "ilp_memory", "ilp_status", "ilp_gap", "ilp_s", "published_over_ilp", "wall_s", "note",
        "published_note", "capture_s"]


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

    def ms(v) -> str:
        return "—" if v is None else f"{1e3 * v:.1f} ms"

    md = ["# Megatron-LM SC'21 table: published (t, p, d) beside autoddl's plan", "",
          "Generated by `python experiments/megatron_table.py`; DGX-A100 (8 × A100 80 GB per "
          "node), full activation recomputation, m = batch / (d · b) micro-batches as published. "
          "Cost per step = bandwidth + redundant compute + pipeline bubble under autoddl's "
          "model; the ILP's mesh is (pp ×) the stage mesh. The objective sums the "
          "communication of every stage of a pipeline (what the ILP minimizes), not the wall "
          "clock: deep pipelines (p = 64 for the 1T row) pay for every stage's collectives. "
          "Under this model Megatron's layers run with sequence parallelism (reduce-scatter + "
          "all-gather around the normalizations instead of all-reduce: the same bytes, the "
          "normalizations' work divided), which the greedy per-op choice finds from the fixed "
          "weight placements. An unpipelined plan keeps the whole per-device batch's activations "
          "(no gradient accumulation), so the 18.4B row's published p = 1 does not fit here; the "
          "1T row's published plan needs 84.3 GiB here (all tensors fp32). Rows beyond the "
          "ILP's time limit report their gap.", "",
          "| model | GPUs | published (t,p,d) | m | published cost | memory | PTD-P grid best "
          "| grid cost | ILP plan | ILP cost | memory | status (gap) | ILP search | published / "
          "ILP | note |", "|" + "---|" * 15]
    for r in results:
        gap = r.get("ilp_gap")
        status = r.get("ilp_status", "—") + ("" if gap is None else f" ({100 * gap:.2g} %)")
        ratio = r.get("published_over_ilp")
        md.append(" | ".join([
            f"| {r['model']}", str(r.get("gpus", "")), r.get("published", ""),
            str(r.get("microbatches", "")), ms(r.get("published_cost_s")),
            r.get("published_memory", "—") + ("" if r.get("published_fits", True)
                                              else " (does not fit)"),
            r.get("grid", "—"), ms(r.get("grid_cost_s")), r.get("ilp_mesh", "—"),
            ms(r.get("ilp_cost_s")), r.get("ilp_memory", "—"), status,
            "—" if "ilp_s" not in r else f"{r['ilp_s']} s",
            "—" if ratio is None else f"{ratio:.3g}",
            (r.get("note", "") + " " + r.get("published_note", "")).strip() + " |"]))
    (out / "megatron_table.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
