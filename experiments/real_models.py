"""Plans of models people train, from their own libraries, at their published sizes.

Hugging Face GPT-2 (124M), BERT-base, a LLaMA-2-7B-shaped decoder, torchvision ResNet-50 and
VGG-16, timm ViT-B/16, each captured from its configuration (no weights) and planned with
``autoddl plan`` on DGX-A100 nodes, in its own process. Records per model: capture and total
seconds, peak memory, status and gap, the plan's mesh (and stages), cost per step, and the
operators run replicated for want of a rule. Writes experiments/results/real_models.{csv,md}.

    python experiments/real_models.py [--models hf-gpt2,...] [--time-limit 120]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
CASES = {
    "hf-gpt2": ("hf-gpt2:layers=12,hidden=768,heads=12,seq=1024,batch=64,vocab=50257",
                "dgx-a100:nodes=1"),
    "hf-bert": ("hf-bert:layers=12,hidden=768,heads=12,seq=512,batch=128,vocab=30522",
                "dgx-a100:nodes=1"),
    "hf-llama": ("hf-llama:layers=32,hidden=4096,heads=32,kv_heads=32,ffn=11008,seq=2048,"
                 "batch=256,vocab=32000", "dgx-a100:nodes=4"),
    "tv-resnet50": ("tv-resnet50:batch=256,image=224,classes=1000", "dgx-a100:nodes=1"),
    "tv-vgg16": ("tv-vgg16:batch=256,image=224,classes=1000", "dgx-a100:nodes=1"),
    "timm-vit": ("timm-vit:batch=256,image=224,patch=16,hidden=768,heads=12,layers=12,"
                 "classes=1000", "dgx-a100:nodes=1"),
}
FIELDS = ["model", "spec", "cluster", "params", "ops", "capture_s", "total_s", "peak_rss_gb",
          "status", "gap", "mesh", "stages", "cost_s", "step_time_s", "fallback_ops"]


def run_case(name: str, time_limit: float) -> dict:
    """Plan one model in a child process; its numbers."""
    spec, cluster = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        log = Path(tmp) / "log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            child = subprocess.Popen(
                [sys.executable, "-m", "autoddl.cli", "plan", "--model", spec, "--cluster",
                 cluster, "--time-limit", str(time_limit), "--gap", "0.001", "-o", str(out)],
                stdout=f, stderr=subprocess.STDOUT, text=True)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
        total = time.perf_counter() - t0
        text = log.read_text()
        row = {"model": name, "spec": spec, "cluster": cluster, "total_s": round(total, 1),
               "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
        if os.waitstatus_to_exitcode(status) != 0:
            row["status"] = "error: " + (text.strip().splitlines() or ["?"])[-1]
            return row
        plan = json.loads(out.read_text())
    m = re.search(r"capture ([\d.]+) s", text)
    axes = plan["mesh"]["axes"]
    row.update({
        "params": plan["model"]["num_params"], "ops": plan["model"]["num_ops"],
        "capture_s": float(m.group(1)) if m else None, "status": plan["solver"]["status"],
        "gap": plan["solver"].get("gap"),
        "mesh": "×".join(f"{a['name']}{a['size']}" for a in axes),
        "stages": (plan.get("pipeline") or {}).get("stages", 1),
        "cost_s": plan["cost"]["total_s"], "step_time_s": plan["cost"].get("step_time_s"),
        "fallback_ops": sum((plan["model"].get("fallback_ops") or {}).values()),
    })
    return row


def markdown(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["| model | cluster | parameters | ops | capture | planning total | peak memory | "
             "status (gap) | mesh, stages | cost / step | replicated ops |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "params" not in r:
            lines.append(f"| {r['model']} | {r['cluster']} | | | | {r['total_s']} s | | "
                         f"{r['status']} | | | |")
            continue
        gap = "" if r["gap"] is None else f" ({100 * r['gap']:.2g} %)"
        lines.append(
            f"| {r['model']} | {r['cluster']} | {r['params'] / 1e6:.1f} M | {r['ops']} | "
            f"{r['capture_s']} s | {r['total_s']} s | {r['peak_rss_gb']} GB | "
            f"{r['status']}{gap} | {r['mesh']}, {r['stages']} | {1e3 * r['cost_s']:.1f} ms | "
            f"{r['fallback_ops']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Plan each model given and write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--time-limit", type=float, default=120.0)
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        rows.append(run_case(name, a.time_limit))
        print(rows[-1], flush=True)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    with open(res / "real_models.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    head = ("# Library models planned at published sizes\n\n`python experiments/real_models.py`"
            " on the 2-core development machine; each model in its own process, `--gap 0.001`,"
            " a 120 s search limit; cost per step is the planner's objective (communication +"
            " redundant compute + pipeline bubble).\n\n")
    (res / "real_models.md").write_text(head + markdown(rows))


if __name__ == "__main__":
    main()
