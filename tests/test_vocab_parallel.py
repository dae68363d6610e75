"""Vocabulary-parallel cross-entropy (issue 14, item 5): logits split by vocabulary, the loss
computed with three all-reduces of one fp32 value per row instead of gathering the logits.

- the rule offers ``(S(1), B) -> B`` only for what the runtime computes exactly (2-D logits,
  mean or sum, no weights, default ignore_index, no label smoothing);
- the cost model charges the three all-reduces on the node, by hand (a recomputed copy's second
  forward is the recompute groups' to price; the plan's report counts it twice);
- the planner picks it for a small GPT, and the bytes it saves over the same plan under the old
  rules (the loss reading whole logits) are the logits' all-gather less the three all-reduces,
  computed by hand;
- the runtime's function equals ``F.cross_entropy`` of the whole logits on 4 gloo ranks (loss and
  gradient within 1e-5 relative; measured ~1e-7), and ``autoddl run --check`` of the planned GPT
  on 4 ranks (1-D and 2×2 meshes, and a 2-stage pipeline) equals the single-process run, its
  bytes the plan's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from autoddl.engine.capture import capture
from autoddl.engine.costs import Multiplicity, breakdown, build_problem, predicted_collectives
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.placements import B, S
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph
from autoddl.engine.mesh_signatures import axis_signatures
from tests.helpers import cluster, make_pipelined_plan, microbatch_graph, run_checked

GPT = "gpt:layers=2,hidden=64,heads=4,seq=32,batch=8,vocab=8192"
TOKENS, VOCAB = 8 * 32, 8192


def _loss_graph(rows: int = 64, vocab: int = 128, hidden: int = 16, ndim: int = 2,
                args: tuple = (), weight: bool = False,
                target: str = "aten.cross_entropy_loss.default") -> OpGraph:
    """x (rows, hidden) -> linear(W: vocab × hidden) -> cross-entropy against t (rows,)."""
    f = "float32"
    lead = (rows,) if ndim == 2 else (2, rows // 2)
    n = [OpNode("w", "param", "param", TensorMeta((vocab, hidden), f), requires_grad=True,
                fqn="w"),
         OpNode("x", "input", "input", TensorMeta((*lead, hidden), f)),
         OpNode("t", "input", "input", TensorMeta(lead, "int64"))]
    ins = ("logits", "t")
    if weight:
        n.append(OpNode("cw", "input", "input", TensorMeta((vocab,), f)))
        ins = ins + ("cw",)
    n += [OpNode("logits", "op", "aten.linear.default", TensorMeta((*lead, vocab), f), ("x", "w"),
                 (TensorArg(0), TensorArg(1)), flops=2.0 * rows * hidden * vocab,
                 requires_grad=True),
          OpNode("loss", "op", target, TensorMeta((), f), ins,
                 tuple(TensorArg(i) for i in range(len(ins))) + tuple(args),
                 flops=3.0 * rows * vocab, requires_grad=True)]
    return OpGraph(tuple(n), "loss")


def _vocab_sigs(graph: OpGraph) -> list:
    return [s for s in axis_signatures(graph[graph.loss], graph) if s.vocab_parallel]


def test_rule_offers_vocab_split_logits_only_where_exact():
    sigs = _vocab_sigs(_loss_graph())
    assert [(s.ins, s.out) for s in sigs] == [((S(1), B), B)]
    assert _vocab_sigs(_loss_graph(args=(None, 2)))  # reduction sum
    refused = {
        "reduction none": _loss_graph(args=(None, 0)),
        "ignore_index 0": _loss_graph(args=(None, 1, 0)),
        "label smoothing": _loss_graph(args=(None, 1, -100, 0.1)),
        "class weights": _loss_graph(weight=True),
        "3-D logits": _loss_graph(ndim=3),
        "nll_loss": _loss_graph(target="aten.nll_loss.default"),
    }
    for why, g in refused.items():
        assert not _vocab_sigs(g), why


@pytest.mark.parametrize("recomputed", [False, True])
def test_node_is_charged_three_all_reduces_of_its_rows(recomputed):
    rows, vocab, p, gbps, lat = 64, 128, 4, 10.0, 1e-5
    g = _loss_graph(rows, vocab)
    c = cluster(devices=p, gbps=gbps, latency_s=lat)
    mult = Multiplicity(recomputed={"loss": ("layer", 1.0)} if recomputed else {})
    costed = build_problem(g, c.mesh((p,)), c, mult=mult)
    sigs = costed.sigs["loss"]
    vp = next(i for i, s in enumerate(sigs) if s.axes[0].vocab_parallel)
    old = next(i for i, s in enumerate(sigs) if s.ins == ((B,), (B,)))
    # by hand: all-reduce of rows fp32 values on p ranks: 2(p-1)/p · 4·rows bytes, the tree's
    # 2·log2(p)+1 latency steps (5, below the ring's 7); three of them, per forward; no node
    # penalty (work divided)
    one = 2 * (p - 1) / p * 4 * rows / (gbps * 1e9) + (2 * 2 + 1) * lat
    times = 2 if recomputed else 1
    node = costed.problem.nodes[costed.index["loss"]]
    assert node.cost_s[vp] == pytest.approx(3 * one, rel=1e-12)
    choice = {n.name: costed.sigs[n.name][0] for n in g.nodes}
    choice["loss"] = sigs[vp]
    own = [col for col in predicted_collectives(costed, choice) if col.src == col.dst == "loss"]
    assert [(col.kind, col.direction, col.axis, col.copies) for col in own] == \
        [("all_reduce", "forward", c.mesh((p,)).axes[0].name, times)] * 3
    assert all(col.bytes_per_device == 2 * (p - 1) / p * 4 * rows for col in own)
    choice["loss"] = sigs[old]
    assert not [col for col in predicted_collectives(costed, choice) if col.src == col.dst]


def _gpt_plan(shape: tuple[int, ...]):
    s = parse_model_spec(GPT)
    graph = capture(*build_model(s, "meta"))
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e11, overlap=False)
    mesh = c.mesh(shape)
    return s, graph, c, mesh, plan_graph(graph, c, model_spec=s.text, meshes=[mesh])


def _choice(costed, plan) -> dict:
    """The plan's signature of every node, from the costed graph's lists."""
    names = plan.axis_names
    out = {}
    for name, sigs in costed.sigs.items():
        op = plan.op(name)
        ins = tuple(tuple(i[a] for a in names) for i in op.ins)
        outp = tuple(op.out[a] for a in names)
        out[name] = next(s for s in sigs if s.ins == ins and s.out == outp and s.zero == op.zero)
    return out


@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_planner_splits_the_loss_by_vocabulary_and_saves_the_gather(shape):
    _, graph, c, mesh, plan = _gpt_plan(shape)
    loss = plan.op(graph.loss)
    logits = graph[graph.loss].inputs[0]
    head = graph[logits].inputs[0]  # the view's input: the LM head's (8, 32, 8192) output
    vocab_axes = [a for a in plan.axis_names if loss.ins[0][a] == S(1)]
    assert len(vocab_axes) == 1, loss
    va = vocab_axes[0]
    assert loss.out[va] == B and loss.ins[1][va] == B
    assert plan.op(logits).out[va] == S(1) and plan.op(head).out[va] == S(2)  # column-parallel
    # the plan gathers no logits
    costed = build_problem(graph, mesh, c)
    choice = _choice(costed, plan)
    colls = predicted_collectives(costed, choice)
    assert not [x for x in colls if x.dst == graph.loss and x.kind == "all_gather"]
    # the same plan under the old rules: the loss reads the logits whole on that axis
    a = plan.axis_names.index(va)
    new = choice[graph.loss]
    old_ins = (tuple(B if k == a else p for k, p in enumerate(new.ins[0])), new.ins[1])
    old = next(s for s in costed.sigs[graph.loss] if s.ins == old_ins and s.out == new.out)
    assert not old.axes[a].vocab_parallel
    saved = (breakdown(costed, {**choice, graph.loss: old})["bytes_per_device"]
             - breakdown(costed, choice)["bytes_per_device"])
    # by hand: p devices on the vocabulary axis, rows the tokens this device's batch split keeps
    p = mesh.shape[a]
    rows = TOKENS // math.prod(n for n, pl in zip(mesh.shape, new.ins[0]) if pl == S(0))
    gather = (p - 1) / p * rows * VOCAB * 4  # all-gather of the fp32 logits
    all_reduces = 3 * 2 * (p - 1) / p * rows * 4  # max, target logit, sum of exponentials
    assert saved == pytest.approx(gather - all_reduces, rel=1e-12)
    assert saved > 0.9 * gather


def test_function_equals_cross_entropy_of_whole_logits_on_4_ranks(tmp_path):
    """tests/vocab_ranks.py on 4 gloo ranks: world group and both axes of a 2×2 mesh; mean and
    sum; ignored targets; logits offset by 1e4. Loss and logits gradient within 1e-5 (relative,
    the gradient's to its largest entry) of F.cross_entropy on the whole logits; each call logs
    three all-reduces of 4·rows bytes · 2(p−1)/p under its mesh axis."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         "--standalone", "-m", "tests.vocab_ranks", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["cases"] == 6
    assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    rows, p = r["rows"], 2
    for axis in ("x", "y"):
        want = [3, 3 * 2 * (p - 1) / p * 4 * rows]
        assert r["logs"][axis] == {f"forward/{axis}/all_reduce": want}


@pytest.mark.dist
@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_run_check_of_a_vocab_parallel_plan(tmp_path, shape):
    """`autoddl run --check` on 4 gloo ranks: loss and gradients equal the one-process run,
    bytes per (axis, kind) the plan's (three all-reduces per step on the vocabulary axis)."""
    _, graph, _, _, plan = _gpt_plan(shape)
    assert any(v == S(1) for v in plan.op(graph.loss).ins[0].values())
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    run_checked(path, steps=2, require=("all_reduce",))


@pytest.mark.dist
def test_run_check_of_a_pipelined_vocab_parallel_plan(tmp_path):
    """The same on a 2-stage pipeline (2 micro-batches) of 2-device stage meshes: the loss, in
    the last stage, runs vocabulary-parallel once per micro-batch."""
    graph = microbatch_graph(GPT, 2)
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10, overlap=False)
    plan = plan_graph(graph, c, model_spec=GPT, meshes=[c.mesh((2,))])
    assert plan.op(graph.loss).ins[0] == {"x": S(1)}, plan.op(graph.loss)
    path = tmp_path / "plan.json"
    save_plan(make_pipelined_plan(plan, 2, 2, "1F1B", graph=graph), path)
    run_checked(path, steps=2, require=("all_reduce", "p2p"))
