"""The CUDA path: one rank on NCCL, same code as gloo except backend and device.

Skipped without CUDA. Multi-rank NCCL needs one GPU per rank, which one-GPU machines lack.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from autoddl.engine.capture import capture
from autoddl.engine.cluster import parse_cluster
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("spec", ["mlp:batch=64,dim_in=32,hidden=64,layers=2,dim_out=32",
                                  "gpt:layers=2,hidden=64,heads=4,seq=16,batch=8,vocab=128",
                                  "hf-gpt2:layers=2,hidden=64,heads=4,seq=32,batch=8,vocab=256"])
def test_one_rank_nccl_run_matches_reference(tmp_path, spec):
    if spec.startswith("hf-"):
        pytest.importorskip("transformers")
    s = parse_model_spec(spec)
    graph = capture(*build_model(s, "meta"))
    plan = plan_graph(graph, parse_cluster("dgx-h100:nodes=1,gpus_per_node=1"), model_spec=s.text)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    proc = subprocess.run([sys.executable, "-m", "autoddl.cli", "run", str(path), "--steps", "2",
                           "--check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "backend nccl on cuda" in proc.stdout
    assert "check PASSED" in proc.stdout
