"""Every Hugging Face causal- and masked-LM family at a tiny size: does ``hf:MODEL_TYPE`` build,
capture and plan?

For each model type of transformers' causal-LM and masked-LM auto mappings: build
``hf:TYPE:layers=2,hidden=32,heads=4,seq=16,batch=2,vocab=64`` from its config on the meta
device (fake tensors), capture it, and plan it on a 2×2 mesh of a synthetic 4-device cluster.
Records per type: the head, status (``ok`` or the one-line reason it fails), operators, the
operators run replicated for want of a sharding rule, and the seconds taken. The families
``tests/test_hf_zoo.py`` runs under ``run --check`` are marked. Writes
experiments/results/hf_families.{csv,md}.

    python experiments/hf_families.py [--types gpt2,llama,...] [--limit-s 120]
"""

from __future__ import annotations

import argparse
import csv
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
TINY = "layers=2,hidden=32,heads=4,seq=16,batch=2,vocab=64"
FIELDS = ["model_type", "head", "tested", "status", "ops", "fallback_ops", "seconds"]


class _Late(BaseException):
    """The time limit of one type (not an Exception: capture's handlers let it through)."""


def _one(model_type: str, limit_s: int) -> dict:
    """Build, capture and plan one type; its row."""
    from autoddl.engine.capture import capture
    from autoddl.engine.cluster import Cluster, Link
    from autoddl.engine.compute import ComputeFigures
    from autoddl.engine.models import build_model, parse_model_spec
    from autoddl.engine.planner import plan_graph
    from autoddl.engine.mesh_signatures import fallback_ops
    from autoddl.errors import first_line

    row = {"model_type": model_type, "head": "", "status": "ok", "ops": "", "fallback_ops": ""}
    start = time.time()

    def late(signum, frame):
        raise _Late()

    signal.signal(signal.SIGALRM, late)
    signal.alarm(limit_s)
    try:
        spec = parse_model_spec(f"hf:{model_type}:{TINY}")
        from autoddl.engine.hf_zoo import hf_config
        row["head"] = hf_config(model_type, dict(spec.params))[1]
        graph = capture(*build_model(spec, "meta"))
        row["ops"] = len(graph.ops)
        row["fallback_ops"] = " ".join(f"{k.removeprefix('aten.')}×{v}"
                                       for k, v in sorted(fallback_ops(graph).items()))
        c = Cluster("test", 1, 4, Link(10.0, 1e-6), Link(10.0, 1e-6), 2**40, 1e10, "cpu",
                    "test", compute=ComputeFigures())
        plan_graph(graph, c, model_spec=spec.text, meshes=[c.mesh((2, 2))], workers=1)
    except _Late:
        row["status"] = f"not done in {limit_s} s"
    except Exception as exc:  # the reason, in one line
        text = f"{type(exc).__name__}: {first_line(exc)}" if not isinstance(exc, ValueError) \
            else first_line(exc)
        row["status"] = text.replace("|", "/")[:300]
    finally:
        signal.alarm(0)
    row["seconds"] = f"{time.time() - start:.1f}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="", help="comma-separated model types (default: all; "
                    "given: their rows replace those in the existing results)")
    ap.add_argument("--limit-s", type=int, default=120, help="seconds per type")
    a = ap.parse_args()
    from autoddl.hf_specs import lm_model_types
    from tests.test_hf_zoo import FAMILIES

    types = lm_model_types()
    assert types is not None
    every = sorted(set(types[0]) | set(types[1]))
    chosen = a.types.split(",") if a.types else every
    rows = []
    for t in chosen:
        row = _one(t, a.limit_s)
        row["tested"] = "run --check" if t in FAMILIES else ""
        print(f"{t:28} {row['status'][:100]}", flush=True)
        rows.append(row)
    out = HERE / "results"
    if a.types and (out / "hf_families.csv").is_file():
        with open(out / "hf_families.csv", newline="") as f:
            old = {r["model_type"]: r for r in csv.DictReader(f)}
        rows = sorted({**old, **{r["model_type"]: r for r in rows}}.values(),
                      key=lambda r: r["model_type"])
    with open(out / "hf_families.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# Hugging Face LM families at a tiny size (`hf:TYPE:{TINY}`)", "",
             f"{ok} of {len(rows)} model types build, capture and plan (2×2 mesh); "
             "`run --check` on 4 gloo ranks: the types marked (tests/test_hf_zoo.py).", "",
             "| model type | head | tested | status | ops | replicated (no rule) | s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model_type']} | {r['head']} | {r['tested']} | {r['status']} | {r['ops']} "
              f"| {r['fallback_ops']} | {r['seconds']} |" for r in rows]
    (out / "hf_families.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
