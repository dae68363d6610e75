"""Mixed precision (``--precision bf16``): bytes on the wire, memory per parameter, defaults, plan
files, and a checked bf16 run on gloo.

Every expected number is counted by hand (ZeRO paper, Rajbhandari et al. 2020: bf16 weight 2 B +
bf16 gradient 2 B + fp32 master weight 4 B + Adam's two fp32 moments 8 B = 16 B per parameter;
ring all-reduce 2(d−1)/d · T bytes per device), not read back from the cost model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from autoddl.engine.baselines import data_parallel
from autoddl.engine.cluster import parse_cluster
from autoddl.engine.costs import TrainingConfig, build_problem, node_memory_bytes
from autoddl.engine.graph import TensorMeta
from autoddl.engine.plan import load_plan, save_plan, summary
from autoddl.engine.precision import (
    default_precision, plan_precision, resolve_precision, tensor_bytes,
)
from autoddl.engine.rules import ZERO_GRADS, ZERO_STATES
from autoddl.engine.workload import Workload, load_workload
from autoddl.errors import UserError
from tests.helpers import check_byte_table, cluster, mlp_graph

D = 4  # data-parallel devices
BATCH, D_IN, HIDDEN, D_OUT = 64, 16, 32, 8
N_PARAMS = HIDDEN * D_IN + D_OUT * HIDDEN  # w1, w2 (no bias)


def _workload(precision: str, optimizer: str = "adam") -> Workload:
    g = mlp_graph(BATCH, D_IN, HIDDEN, D_OUT)
    return Workload("mlp", g, cluster(devices=D), TrainingConfig(optimizer, "none", precision))


def _replicated_param_sig(costed, name: str):
    return next(s for s in costed.sigs[name] if s.out == ("B",) and s.zero == 0)


@pytest.mark.parametrize("optimizer,states", [("adam", 2), ("momentum", 1), ("sgd", 0)])
def test_weight_memory_per_parameter_by_hand(optimizer, states):
    """A replicated trained weight keeps 2 + 2 + 4 + 4k bytes per element under bf16 (16 with
    Adam) and 4 · (2 + k) under fp32 (weight, gradient, k states)."""
    for precision, per_param in (("bf16", 2 + 2 + 4 + 4 * states), ("fp32", 4 * (2 + states))):
        work = _workload(precision, optimizer)
        costed = work.costed(work.mesh((D,)))
        for name in ("w1", "w2"):
            n = costed.graph[name]
            got = node_memory_bytes(n, _replicated_param_sig(costed, name), costed.mesh,
                                    work.config)
            assert got == per_param * n.out.numel, (precision, name)
    assert 2 + 2 + 4 + 4 * 2 == 16  # the Megatron/DeepSpeed count the brief names


def test_zero_divides_master_and_states_then_gradient():
    """ZeRO-1 divides the fp32 master weight and Adam's states over the d devices, ZeRO-2 also
    the bf16 gradient: 2 + 2 + 12/d and 2 + 14/d bytes per parameter (fp32: 4 + 4 + 8/d and
    4 + 12/d). Both the signature's memory and a whole ZeRO plan's weight memory."""
    hand = {("bf16", ZERO_STATES): 2 + 2 + (4 + 8) / D, ("bf16", ZERO_GRADS): 2 + (2 + 4 + 8) / D,
            ("fp32", ZERO_STATES): 4 + 4 + 8 / D, ("fp32", ZERO_GRADS): 4 + (4 + 8) / D}
    for (precision, zero), per_param in hand.items():
        work = _workload(precision)
        costed = work.costed(work.mesh((D,)))
        n = costed.graph["w1"]
        sig = dataclasses.replace(_replicated_param_sig(costed, "w1"), zero=zero)
        assert node_memory_bytes(n, sig, costed.mesh, work.config) == pytest.approx(
            per_param * n.out.numel)
        method = "ZeRO-1" if zero == ZERO_STATES else "ZeRO-2"
        plan = data_parallel(work, method).plan
        assert plan.memory["weights_bytes"] == pytest.approx(per_param * N_PARAMS), method


def test_activations_halved_integers_kept():
    """Float activations count 2 bytes per element under bf16 (saved outputs halve); integer
    tensors (token ids, targets) keep their size; fp32 keeps every captured size."""
    ids = TensorMeta((8, 16), "int64")
    act = TensorMeta((8, 16, 64), "float32")
    assert tensor_bytes(ids, "bf16") == tensor_bytes(ids, "fp32") == 8 * 16 * 8
    assert tensor_bytes(act, "bf16") == 8 * 16 * 64 * 2
    assert tensor_bytes(act, "fp32") == 8 * 16 * 64 * 4
    mems = {}
    for precision in ("fp32", "bf16"):
        work = _workload(precision)
        costed = work.costed(work.mesh((D,)))
        h = costed.graph["h"]
        sig = next(s for s in costed.sigs["h"] if s.out == ("S(0)",))
        mems[precision] = node_memory_bytes(h, sig, costed.mesh, work.config)
    assert mems["fp32"] == BATCH * HIDDEN * 4 / D
    assert mems["bf16"] == BATCH * HIDDEN * 2 / D


def test_data_parallel_all_reduce_bytes_halved():
    """Data parallel on d devices: every weight's gradient and the loss are all-reduced, each
    device sending 2(d−1)/d · T: T = 2 · (params + 1 loss scalar) bytes under bf16, 4 · (...)
    under fp32. Nothing else moves."""
    got = {}
    for precision, size in (("bf16", 2), ("fp32", 4)):
        plan = data_parallel(_workload(precision), "DDP").plan
        kinds = plan.cost["per_axis_kind"][plan.axis_names[0]]
        assert set(kinds) == {"all_reduce"}, kinds
        got[precision] = kinds["all_reduce"]["bytes"]
        assert got[precision] == pytest.approx(2 * (D - 1) / D * size * (N_PARAMS + 1))
        assert kinds["all_reduce"]["count"] == 3  # w1, w2, loss
        assert plan.training["precision"] == precision
    assert got["bf16"] == pytest.approx(got["fp32"] / 2)


def test_default_precision_follows_the_device_type():
    """bf16 on cuda clusters, fp32 on cpu, decided in one place; an explicit choice wins; an
    unknown one is a user error naming the choices."""
    assert default_precision("cuda") == "bf16" and default_precision("cpu") == "fp32"
    assert resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(UserError, match="choose one of fp32, bf16"):
        resolve_precision("fp16", "cuda")
    with pytest.raises(UserError, match="unknown precision"):
        TrainingConfig(precision="fp8")
    assert parse_cluster("dgx-a100:nodes=1").device_type == "cuda"
    model = "mlp:batch=8,dim_in=8,hidden=8,layers=1,dim_out=8"
    assert load_workload(model, "dgx-a100:nodes=1").config.precision == "bf16"
    assert load_workload(model, "cpu:devices=4").config.precision == "fp32"
    assert load_workload(model, "cpu:devices=4", precision="bf16").config.precision == "bf16"


def test_plan_file_records_precision_and_old_files_read_as_fp32(tmp_path):
    """The plan file's ``training.precision`` round-trips and ``show`` prints it; a file written
    before precisions (no such key) loads as fp32; a bad value is a user error."""
    plan = data_parallel(_workload("bf16"), "DDP").plan
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    d = json.loads(path.read_text())
    assert d["training"]["precision"] == "bf16"
    loaded = load_plan(path)
    assert plan_precision(loaded.training) == "bf16"
    assert "precision bf16" in summary(loaded)
    del d["training"]["precision"]
    path.write_text(json.dumps(d))
    old = load_plan(path)
    assert plan_precision(old.training) == "fp32"
    assert "precision fp32" in summary(old)
    d["training"]["precision"] = "fp16"
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match="training.precision"):
        load_plan(path)


def test_cli_flags():
    """``--precision`` on plan, compare and run; argparse refuses other values."""
    from autoddl.cli import build_parser

    ap = build_parser()
    for cmd in (["plan", "--model", "mlp", "--cluster", "cpu"],
                ["compare", "--model", "mlp", "--cluster", "cpu"], ["run", "p.json"]):
        assert ap.parse_args(cmd).precision is None
        assert ap.parse_args(cmd + ["--precision", "bf16"]).precision == "bf16"
        with pytest.raises(SystemExit):
            ap.parse_args(cmd + ["--precision", "fp16"])


GPT = "gpt:layers=2,hidden=64,heads=4,seq=16,batch=8,vocab=128"


@pytest.mark.dist
def test_run_check_bf16_on_4_gloo_ranks(tmp_path):
    """A small GPT planned in bf16 on a 2x2 mesh runs on 4 gloo ranks with ``--check``: loss and
    gradients within bf16's tolerance (5e-2, ``worker.BF16_TOL``, used by default under bf16
    only) of the fp32 single-process reference, and every (axis, kind)'s executed bytes equal
    the plan's bf16 prediction. Asking to run it in fp32 is a user error."""
    from autoddl.engine.capture import capture
    from autoddl.engine.models import build_model, parse_model_spec
    from autoddl.engine.planner import plan_graph

    spec = parse_model_spec(GPT)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    config = TrainingConfig(precision="bf16")
    plan = plan_graph(capture(*build_model(spec, "meta")), c, model_spec=spec.text,
                      meshes=[c.mesh((2, 2))], config=config)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    cmd = [sys.executable, "-m", "autoddl.cli", "run", str(path), "--steps", "3", "--check"]
    proc = subprocess.run(cmd + ["--precision", "bf16"], capture_output=True, text=True,
                          timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "precision bf16" in out
    verdict = re.search(r"check PASSED: 3 step\(s\), worst relative error (\S+) over loss and "
                        r"gradients \(tolerance 5e-02\)", out)
    assert verdict, out
    assert 0 < float(verdict.group(1)) < 5e-2  # bf16 rounding shows, within the bound
    check_byte_table(out, path)  # executed bytes = the plan's bf16 bytes, per (axis, kind)
    wrong = subprocess.run(cmd + ["--precision", "fp32"], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "costed in bf16, not fp32" in wrong.stderr, wrong.stderr


@pytest.mark.dist
def test_pipelined_bf16_accumulates_and_reduces_in_bf16(tmp_path):
    """Two stages of a data-parallel MLP (2 devices each) in bf16: p2p sends carry bf16 pieces
    and the weight gradients, summed over the 4 micro-batches, are all-reduced once per step in
    bf16 before reaching the fp32 master weights. Executed bytes equal the plan's (p2p bytes =
    half the fp32 count: pieces of 2-byte elements)."""
    from autoddl.engine.planner import plan_graph
    from tests.helpers import make_pipelined_plan, microbatch_graph, run_checked

    spec = "mlp:batch=4096,dim_in=32,hidden=64,layers=2,dim_out=32"
    graph = microbatch_graph(spec, 4)
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10)
    p2p = {}
    for precision in ("fp32", "bf16"):
        plan = plan_graph(graph, c, model_spec=spec, meshes=[c.mesh((2,))],
                          config=TrainingConfig(precision=precision))
        piped = make_pipelined_plan(plan, 2, 4, "1F1B", graph=graph)
        p2p[precision] = piped.cost["per_kind"]["p2p"]["bytes"]
    assert p2p["bf16"] == p2p["fp32"] / 2 > 0
    path = tmp_path / "plan.json"
    save_plan(piped, path)
    out = run_checked(path, 2, require=("all_reduce", "p2p"), tol=5e-2)
    assert "precision bf16" in out
