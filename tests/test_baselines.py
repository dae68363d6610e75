"""Baselines and ``autoddl compare`` (issue 5), in tiers that can each fail on their own:

1. hand formulas, computed here from parameter shapes: data parallel all-reduces 2(d−1)/d · Ψ
   bytes per device, ZeRO-1/2 the same bytes for less memory, ZeRO-3 1.5× that; Megatron's
   tensor parallelism all-reduces b·s·h elements twice per layer in forward;
2. the ILP's plan costs no more than any baseline that fits, on every model × cluster below
   (also under memory pressure); the searches (coordinate descent, greedy, Alpa-style) are
   never better than it;
3. the command line: ``compare --json --plot`` and ``show --plot``;
4. the runtime executes a ZeRO-3 plan truthfully (gathered again in backward), checked against
   one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache

import pytest

from autoddl.engine import baselines as bl
from autoddl.engine.compare import ILP, compare
from autoddl.engine.costs import predicted_collectives
from autoddl.engine.plan import load_plan, save_plan
from autoddl.engine.search import balanced_cuts
from autoddl.engine.workload import Workload, load_workload, plan_from_choice
from autoddl.engine.zoo import ensure_torchvision_importable
from tests.helpers import cluster, run_checked

MLP = "mlp:batch=64,dim_in=64,hidden=256,layers=2,dim_out=64"
GPT = "gpt:layers=2,hidden=64,heads=4,seq=16,batch=8,vocab=128"


@lru_cache(maxsize=None)
def _work(spec: str, devices: int = 4, nodes: int = 1, memory_bytes: int = 2**40,
          microbatches: int | None = None) -> Workload:
    c = cluster(devices=devices, nodes=nodes, gbps=100, inter_gbps=10, latency_s=1e-6,
                peak_flops=1e12, memory_bytes=memory_bytes)
    return load_workload(spec, c, microbatches=microbatches)


def _mlp_param_bytes(dim_in: int = 64, hidden: int = 256, layers: int = 2, dim_out: int = 64):
    dims = [dim_in] + [hidden] * layers + [dim_out]
    return 4 * sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))  # weights and biases


# --------------------------------------------------------------------------- 1. hand formulas
@pytest.mark.parametrize("d", [2, 4])
def test_data_parallel_and_zero_move_the_hand_computed_bytes(d):
    psi = _mlp_param_bytes()
    work = _work(MLP, devices=d)
    loss_bytes = 2 * (d - 1) / d * 4  # the scalar loss made whole
    plans = {m: bl.data_parallel(work, m).plan for m in bl.ZERO_METHODS}
    for name in ("DDP", "ZeRO-1", "ZeRO-2"):
        kinds = plans[name].cost["per_kind"]
        assert set(kinds) == {"all_reduce"}, name
        assert kinds["all_reduce"]["bytes"] == pytest.approx(2 * (d - 1) / d * psi + loss_bytes)
    z3 = plans["ZeRO-3 (FSDP)"].cost["per_kind"]
    assert z3["all_gather"]["bytes"] == pytest.approx(2 * (d - 1) / d * psi)  # forward, again
    assert z3["reduce_scatter"]["bytes"] == pytest.approx((d - 1) / d * psi)
    ddp_grads = plans["DDP"].cost["bytes_per_device"] - loss_bytes
    z3_total = plans["ZeRO-3 (FSDP)"].cost["bytes_per_device"] - loss_bytes
    assert z3_total == pytest.approx(1.5 * ddp_grads)
    # memory of weight states with Adam (k = 2): 4, 2 + 2/d, 1 + 3/d, 4/d copies of Ψ
    copies = {"DDP": 4, "ZeRO-1": 2 + 2 / d, "ZeRO-2": 1 + 3 / d, "ZeRO-3 (FSDP)": 4 / d}
    for name, k in copies.items():
        assert plans[name].memory["weights_bytes"] == pytest.approx(k * psi), name
    assert plans["ZeRO-3 (FSDP)"].memory["converted_inputs_bytes"] == 0  # nothing kept gathered


def test_megatron_all_reduces_b_s_h_twice_per_layer_each_way():
    """Megatron-LM's volume per transformer layer: 2 all-reduces of b·s·h elements forward
    (after attention and after the MLP) and 2 backward (the gradients of the fused QKV's and
    fc1's inputs), each 2(t-1)/t of the tensor per device."""
    b, s, h, t = 8, 16, 64, 2
    work = _work(GPT, devices=t)
    costed = work.costed(work.mesh((t,)))
    choice = bl.megatron_choice(costed, None, 0)
    g = costed.graph
    layer = {n.name: n.scope for n in g.ops}
    per_layer_bytes = 2 * (t - 1) / t * b * s * h * 4
    for direction, expected in (("forward", 2), ("backward", 2)):
        colls = [c for c in predicted_collectives(costed, choice)
                 if c.direction == direction and layer.get(c.dst, "").startswith("blocks.")]
        for scope in ("blocks.0", "blocks.1"):
            mine = [c for c in colls if layer[c.dst] == scope]
            big = [c for c in mine if c.bytes_per_device == pytest.approx(per_layer_bytes)]
            assert [c.kind for c in big] == ["all_reduce"] * expected, (direction, mine)
            # besides: the row-parallel biases, added on one coordinate of the partial sums,
            # get their (h-element) gradients all-reduced
            small = [c for c in mine if c not in big]
            assert len(small) == (2 if direction == "backward" else 0), small
            assert all(c.kind == "all_reduce" and c.bytes_per_device == pytest.approx(
                2 * (t - 1) / t * h * 4) for c in small)
    # forward: after the attention projection and the second MLP linear (row parallel); backward:
    # one per column-parallel reader of a normalized input: the paper's 2 with fused QKV, 4 here
    roles = bl.megatron_roles(g)
    assert sorted(roles[n.inputs[1]] for n in g.ops if n.target == bl.LINEAR
                  and n.scope == "blocks.0") == ["col"] * 2 + ["row"] * 2
    assert roles["p_tok_emb_weight"] == "vocab" and roles["p_head_weight"] == "col"


#: per library model: the layer-0 weights Megatron splits row-parallel (those feeding the
#: residual add, through dropout in BERT's post-LN and ViT's layers), by fully qualified name
REAL_ROWS = {
    "hf-bert": ("layer.0.attention.output.dense.weight", "layer.0.output.dense.weight"),
    "hf-gpt2": ("h.0.attn.c_proj.weight", "h.0.mlp.c_proj.weight"),
    "hf-llama": ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"),
    "timm-vit": ("blocks.0.attn.proj.weight", "blocks.0.mlp.fc2.weight"),
}


def _real_work(name: str, devices: int = 4, nodes: int = 1) -> Workload:
    """A small library model (the configurations of ``tests/test_zoo.py``) on 4 devices."""
    ensure_torchvision_importable()
    for lib in ("transformers", "timm"):
        pytest.importorskip(lib)
    from tests.test_zoo import SMALL

    return _work(SMALL[name], devices, nodes, 2**40, microbatches=2)


@pytest.mark.parametrize("name", sorted(REAL_ROWS))
def test_megatron_finds_pre_and_post_ln_layers_of_library_models(name):
    """Row-parallel: exactly the two linears per layer that feed the residual add (split on
    their input features); every other linear of the layer column-parallel with its bias."""
    g = _real_work(name).sharding_graph
    layout = bl.megatron_layout(g)
    fqn = {n.name: n.fqn for n in g.params}
    layer0 = {fqn[p]: s for p, s in layout.items() if ".0." in fqn[p]}
    rows = sorted(f for f, s in layer0.items() if s.role == "row")
    assert rows == sorted(f for f in layer0 if f.endswith(REAL_ROWS[name])), layer0
    assert len(rows) == 2
    for f, s in layer0.items():
        in_dim = 0 if name == "hf-gpt2" else 1  # GPT-2's Conv1D weights are (in, out)
        assert s.dim == (in_dim if s.role == "row" else 1 - in_dim if f.endswith("weight")
                         else 0), (f, s)
        assert s.role in ("row", "col") and not s.padded
    assert len(layer0) >= 4 + (name != "hf-llama")  # LLaMA's linears have no biases


def test_constant_leaves_do_not_define_the_batch():
    """BERT's (1, s) position ids and its mask are constants: DDP splits the user's tokens and
    targets over the batch and lets the constants be placed as their readers need."""
    work = _real_work("hf-bert")
    g = work.sharding_graph
    consts = [n for n in g.nodes if n.target == "const"]
    assert any(n.out.shape[0] == 1 for n in consts)  # would not divide the 4 devices
    costed = work.costed(work.mesh((4,)))
    fixed = bl.batch_inputs(costed, 0)
    assert set(fixed) == {n.name for n in g.user_inputs} == {"tokens", "targets"}
    assert all(s.out == ("S(0)",) for s in fixed.values())
    assert bl.data_parallel(work).plan is not None


@pytest.mark.parametrize("name", sorted(REAL_ROWS))
def test_every_baseline_applies_to_library_transformers(name):
    """Every baseline row of ``compare`` applies to BERT, GPT-2, LLaMA and ViT, and costs no
    less than the ILP's plan (its space contains them)."""
    rows, _ = compare(_real_work(name))
    ilp = rows[0]
    assert ilp.method == ILP and ilp.fits
    for r in rows[1:]:
        assert r.applicable and r.fits, (r.method, r.note)
        assert ilp.total_s <= r.total_s * (1 + 1e-9) + 1e-15, (r.method, r.config)
    mega = {r.method: r.config for r in rows if r.method.startswith("Megatron")}
    assert mega["Megatron TP+DP"].startswith(("t=2", "t=4")), mega


def test_megatron_does_not_apply_without_attention():
    o = bl.megatron_tp_dp(_work(MLP, devices=4, nodes=2))
    assert o.plan is None and o.note.startswith("not applicable: no attention")


def test_balanced_cuts_minimize_the_largest_stage():
    assert balanced_cuts([1, 1, 1, 1, 4], 2, set()) == [4]
    assert balanced_cuts([1, 1, 1, 1], 2, {2}) in ([1], [3])
    assert balanced_cuts([1, 1], 3, set()) is None


# --------------------------------------------------------------------------- 2. ILP <= all
CASES = [
    (MLP, 4, 1, 2**40),
    (GPT, 4, 2, 2**40),
    ("gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128", 4, 2, 2**40),  # reduced, pipelines
    # memory pressure: neither DDP nor ZeRO-1 fits
    ("mlp:batch=16,dim_in=512,hidden=512,layers=2,dim_out=512", 4, 1, 6_000_000),
]


@pytest.mark.parametrize("spec,devices,nodes,memory", CASES)
def test_ilp_is_no_worse_than_any_baseline(spec, devices, nodes, memory):
    work = _work(spec, devices, nodes, memory, microbatches=4)
    rows, outcomes = compare(work)
    ilp = rows[0]
    assert ilp.method == ILP and ilp.fits and ilp.ratio == 1
    for r in rows[1:]:
        if r.applicable and r.fits:
            assert ilp.total_s <= r.total_s * (1 + 1e-9) + 1e-15, (r.method, r.config)
            assert r.ratio >= 1 - 1e-9
        elif not r.applicable:
            assert r.note.startswith("not applicable"), r
        else:
            assert r.note.startswith("does not fit: needs"), r
    assert len(rows) == 10
    if memory < 2**40:
        assert not outcomes["DDP"].fits and not outcomes["ZeRO-1"].fits
        assert outcomes["ZeRO-2"].fits and outcomes["ZeRO-3 (FSDP)"].fits


# --------------------------------------------------------------------------- 3. command line
def test_cli_compare_and_show_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out_json, png = tmp_path / "rows.json", tmp_path / "bars.png"
    proc = subprocess.run(
        [sys.executable, "-m", "autoddl.cli", "compare", "--model",
         "mlp:batch=16,dim_in=8,hidden=16,layers=1,dim_out=8", "--cluster", "cpu:devices=2",
         "--json", str(out_json), "--plot", str(png)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out_json.read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == ILP and "DDP" in methods and "ZeRO-3 (FSDP)" in methods
    assert rows[0]["ratio"] == 1
    assert all(r["ratio"] is None or r["ratio"] >= 1 - 1e-9 for r in rows)
    mega = next(r for r in rows if r["method"] == "Megatron TP+DP")
    assert mega["total_s"] is None and "no attention" in mega["note"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ILP (autoddl)" in proc.stdout and "× ILP" in proc.stdout

    plan_path, show_png = tmp_path / "plan.json", tmp_path / "plan.png"
    work = _work("gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128", 4, 2)
    save_plan(bl.ptdp(work, 2, 1, 2).plan, plan_path)
    proc = subprocess.run([sys.executable, "-m", "autoddl.cli", "show", str(plan_path),
                           "--plot", str(show_png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "layers 1–2 (one shown, 2 alike)" in proc.stdout
    assert "all_reduce" in proc.stdout
    assert show_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compare_reports_a_missing_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "autoddl.cli", "compare", "--model", "mlp", "--cluster",
         "cpu:devices=2", "--json", str(tmp_path / "no" / "rows.json")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


# --------------------------------------------------------------------------- 4. runtime
@pytest.mark.dist
def test_zero3_plan_runs_gathered_again_in_backward(tmp_path):
    """The ZeRO-3 plan's all-gathers run twice (forward, and again in backward) and its
    gradients are reduce-scattered; counts and bytes equal the prediction, gradients equal one
    process's."""
    work = load_workload("mlp:batch=16,dim_in=8,hidden=16,layers=1,dim_out=8", "cpu:devices=2")
    plan = bl.data_parallel(work, "ZeRO-3 (FSDP)").plan
    assert {o.zero for o in plan.ops if o.target == "param"} == {3}
    path = tmp_path / "zero3.json"
    save_plan(plan, path)
    assert load_plan(path).ops == plan.ops
    out = run_checked(path, steps=2, require=("all_gather", "reduce_scatter"))
    assert plan.cost["per_kind"]["all_gather"]["count"] == 2 * plan.cost["per_kind"][
        "reduce_scatter"]["count"], out


@pytest.mark.dist
def test_vgg_channel_parallel_convolutions_run_checked(tmp_path):
    """Convolutions alternately split by output channels (weight and bias) and by input channels
    (partial sums, the bias added once), pooling on split channels: gloo ranks equal one process."""
    work = load_workload("vgg:depth=11,width=4,image=32,fc=16,classes=10,batch=4",
                         "cpu:devices=2", stages=1)
    costed = work.costed(work.mesh((2,)))
    g = costed.graph
    fixed = bl.batch_inputs(costed, None)
    convs = [n for n in g.ops if n.target == "aten.conv2d.default"]
    for p in g.params:
        fixed[p.name] = bl.leaf(costed, p.name, ("B",))
    for k, n in enumerate(convs):
        fixed[n.inputs[1]] = bl.leaf(costed, n.inputs[1], ("S(0)",) if k % 2 == 0 else ("S(1)",))
        if k % 2 == 0:
            fixed[n.inputs[2]] = bl.leaf(costed, n.inputs[2], ("S(0)",))
    choice = bl.greedy_assign(costed, fixed, bl.reads_params(fixed, False))
    assert {choice[n.name].out for n in convs} == {("S(1)",), ("P",)}
    pools = [n for n in g.ops if n.target == "aten.max_pool2d.default"]
    assert any(choice[n.name].out == ("S(1)",) for n in pools)
    plan = plan_from_choice(work, costed, choice, "test", 0.0)
    path = tmp_path / "vgg.json"
    save_plan(plan, path)
    run_checked(path, steps=2, require=("all_reduce",))


@pytest.mark.dist
def test_megatron_ptdp_plan_runs_checked(tmp_path):
    """A PTD-P baseline (t=2 inside each of p=2 stages of repeated layers) is an ordinary
    pipelined plan: `autoddl run --check` executes it as predicted."""
    work = load_workload("gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128",
                         "cpu:devices=4", microbatches=4)
    out = bl.ptdp(work, 2, 2, 1)
    assert out.plan is not None and out.plan.num_stages == 2, out.note
    path = tmp_path / "ptdp.json"
    save_plan(out.plan, path)
    run_checked(path, steps=2, require=("all_reduce", "p2p"))


@pytest.mark.dist
def test_megatron_plan_of_bert_runs_checked(tmp_path):
    """Megatron TP+DP (t=2, d=2) on a small post-LN BERT, 4 gloo ranks: `autoddl run --check`
    executes it as predicted (losses, gradients, bytes per axis and kind)."""
    work = _real_work("hf-bert")
    out = bl.ptdp(load_workload(work.spec_text, "cpu:devices=4"), 2, 1, 2, "Megatron TP+DP")
    assert out.plan is not None, out.note
    split = {o.name for o in out.plan.ops if o.target == "param"
             and any(p.startswith("S(") for p in o.out.values())}
    assert any("output_dense_weight" in n for n in split), split  # row-parallel, post-LN
    path = tmp_path / "megatron_bert.json"
    save_plan(out.plan, path)
    run_checked(path, steps=2, require=("all_reduce",))
