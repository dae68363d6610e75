"""Mixture of experts: the ``moe-gpt`` preset, its operators' sharding rules, expert
parallelism chosen by the planner, and a checked 4-rank run.

- every signature of the MoE operators' rules (:mod:`autoddl.engine.rules_moe`) runs on shards
  of random tensors and is reassembled into the whole operator's result (and the checker is
  shown to catch a wrong signature);
- the routing of :class:`~autoddl.engine.moe.MoE` equals a token-by-token loop (top-k, slots in
  order, tokens past the capacity dropped, gates renormalized);
- the captured model has a rule for every operator and its layers fold;
- on a hand-sized layer whose experts' weights dominate, the planner splits the experts (all-to-
  alls in its bytes), and its step beats the best plan without expert parallelism by exactly the
  gradient all-reduces saved less the four all-to-alls paid;
- ``autoddl run --check`` of an expert-parallel plan on 4 gloo ranks.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from autoddl.engine.capture import capture, tensor_meta
from autoddl.engine.costs import build_problem, grad_sync_share, step_seconds
from autoddl.engine.graph import OpNode, TensorArg
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.moe import MoE, expert_capacity
from autoddl.engine.placements import B, P, S, Step, collective_cost, split_dim
from autoddl.engine.planner import plan_graph, solve_sharding
from autoddl.engine.plan import save_plan
from autoddl.engine.repeat import find_blocks
from autoddl.engine.mesh_signatures import check_rules
from autoddl.engine.rules import RULES, AxisSig
from autoddl.errors import UserError
from tests.helpers import cluster, run_checked


# --------------------------------------------------------------------------- rules on shards
def _aten(target: str):
    _, name, overload = target.split(".")
    return getattr(getattr(torch.ops.aten, name), overload)


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _tensors(a)
    return out


def _swap(args, values: list[torch.Tensor]):
    """``args`` with its tensors replaced, in order, by ``values`` (consumed)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(values.pop(0))
        elif isinstance(a, (list, tuple)):
            out.append(type(a)(_swap(a, values)))
        else:
            out.append(a)
    return out


def _plain(args, counter: list[int]):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(TensorArg(counter[0]))
            counter[0] += 1
        elif isinstance(a, (list, tuple)):
            out.append(tuple(_plain(a, counter)))
        else:
            out.append(a)
    return tuple(out)


def _pieces(x: torch.Tensor, pl: str, p: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The p devices' local pieces of ``x`` held ``pl`` (random addends for P)."""
    if pl == B:
        return [x] * p
    if pl == P:
        noise = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(p - 1)]
        return noise + [x - sum(noise)]
    return list(x.chunk(p, dim=split_dim(pl)))


def _assemble(outs: list[torch.Tensor], pl: str) -> torch.Tensor:
    if pl == B:
        assert all(torch.equal(o, outs[0]) for o in outs), "replicated outputs differ"
        return outs[0]
    if pl == P:
        return sum(outs)
    return torch.cat(outs, dim=split_dim(pl))


def _exact(target: str, args: tuple, sig: AxisSig, p: int = 2) -> bool:
    """Whether running ``target`` on each of p devices' pieces under ``sig`` and reassembling
    the output gives the whole operator's result."""
    op, gen = _aten(target), torch.Generator().manual_seed(0)
    whole = op(*args)
    tensors = _tensors(args)
    pieces = [_pieces(t, pl, p, gen) for t, pl in zip(tensors, sig.ins)]
    outs = [op(*_swap(args, [pc[j] for pc in pieces])) for j in range(p)]
    got = _assemble(outs, sig.out)
    return got.shape == whole.shape and torch.allclose(got.double(), whole.double(), atol=1e-9)


def _sigs(target: str, args: tuple) -> list[AxisSig]:
    tensors = _tensors(args)
    out = _aten(target)(*args)
    node = OpNode("n", "op", target, tensor_meta(out), tuple(f"t{i}" for i in range(len(tensors))),
                  _plain(args, [0]))
    return RULES[target](node, [tensor_meta(t) for t in tensors])


_G = torch.Generator().manual_seed(1)
_X = torch.randn(4, 6, 8, generator=_G, dtype=torch.float64)
_D = (torch.rand(4, 6, 4, 2, generator=_G) < 0.3).double()
_Y = torch.randn(4, 4, 2, 8, generator=_G, dtype=torch.float64)
_M = torch.randn(8, 4, generator=_G, dtype=torch.float64)
_K = torch.randn(4, 8, 2, generator=_G, dtype=torch.float64)
CASES = [
    ("aten.argmax.default", (_X, 2)),
    ("aten.argmax.default", (_X, 1, True)),
    ("aten.argmin.default", (_X, 0)),
    ("aten.cumsum.default", (_X, 1)),
    ("aten.cumsum.default", (torch.randint(0, 3, (4, 6, 2), generator=_G), 2)),
    ("aten.one_hot.default", (torch.randint(0, 5, (4, 6), generator=_G), 5)),
    ("aten.lt.Scalar", (_X, 0.1)),
    ("aten.ge.Tensor", (_X, _X[0, 0])),
    ("aten.rsub.Scalar", (_X, 1.0)),
    ("aten.einsum.default", ("gsec,gsd->egcd", [_D, _X])),  # dispatch
    ("aten.einsum.default", ("gsec,egcd->gsd", [_D, _Y])),  # combine
    ("aten.einsum.default", ("ij,j->i", [_X[0], _X[0, 0]])),
    ("aten.einsum.default", ("ij,jk", [_X[0], _M])),  # implicit output
    ("aten.einsum.default", ("bij,bjk->bik", [_X[:1], _K])),  # b broadcast from 1
]


@pytest.mark.parametrize("target, args", CASES, ids=[f"{t}-{i}" for i, (t, _) in
                                                      enumerate(CASES)])
def test_every_signature_of_the_moe_rules_is_exact_on_shards(target, args):
    sigs = _sigs(target, args)
    assert len(sigs) > 1, "only the replicated signature"
    for sig in sigs:
        assert _exact(target, args, sig), sig


def test_the_shard_checker_catches_a_wrong_signature():
    """A running sum split along its own dim, a product of two partial sums, a comparison of a
    partial sum: same shapes, wrong values; the rules do not offer them."""
    wrong = [("aten.cumsum.default", (_X, 1), AxisSig((S(1),), S(1))),
             ("aten.einsum.default", CASES[11][1], AxisSig((P, P), P)),
             ("aten.lt.Scalar", (_X, 0.1), AxisSig((P,), P))]
    for target, args, sig in wrong:
        assert sig not in _sigs(target, args)
        assert not _exact(target, args, sig), sig


def test_einsum_forms_the_rule_does_not_split_run_replicated():
    """Ellipsis, a letter twice in one term, one tensor as two operands: replicated only."""
    x = tensor_meta(_X[0])
    forms = [("i...,i...->...", 2), ("ii->i", 1), ("ij,ij->", 1)]
    for eq, n_inputs in forms:
        operands = (TensorArg(0), TensorArg(n_inputs - 1))[:len(eq.split("->")[0].split(","))]
        node = OpNode("n", "op", "aten.einsum.default", x, tuple(f"t{i}" for i in range(n_inputs)),
                      (eq, operands))
        sigs = RULES["aten.einsum.default"](node, [x] * n_inputs)
        assert [s.out for s in sigs] == [B], eq


# --------------------------------------------------------------------------- routing semantics
def _loop_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The layer token by token: each group's tokens take their k best experts in rounds, each
    round in token order, an expert's slots filled in that order and tokens past its capacity
    dropped; (output, load-balancing loss, tokens dropped)."""
    b, s, h = x.shape
    e, k = moe.experts, moe.top_k
    xs = x.reshape(moe.groups, -1, h)
    t = xs.shape[1]
    cap = expert_capacity(t, e, k, moe.capacity_pct)
    probs = torch.softmax(xs @ moe.router.weight.T, dim=-1)
    out = torch.zeros_like(xs)
    dropped = 0
    for g in range(moe.groups):
        order = [sorted(range(e), key=lambda j: (-probs[g, i, j].item(), j))[:k]
                 for i in range(t)]
        count = [0] * e
        for r in range(k):
            for i in range(t):
                j = order[i][r]
                slot, count[j] = count[j], count[j] + 1
                if slot >= cap:
                    dropped += 1
                    continue
                gate = probs[g, i, j] / (sum(probs[g, i, c] for c in order[i]) if k > 1 else 1)
                hid = xs[g, i] @ moe.w1[j]
                hid = (torch.nn.functional.silu(hid) * (xs[g, i] @ moe.w3[j]) if moe.glu
                       else torch.nn.functional.gelu(hid))
                out[g, i] += gate * (hid @ moe.w2[j])
    first = torch.zeros(e, dtype=x.dtype)
    for g, i in itertools.product(range(moe.groups), range(t)):
        first[int(torch.argmax(probs[g, i]))] += 1
    aux = e * (first / (moe.groups * t) * probs.mean(dim=(0, 1))).sum()
    return out.reshape(b, s, h), aux, dropped


@pytest.mark.parametrize("top_k, capacity, glu", [(2, 50, 0), (1, 100, 1), (2, 200, 0)])
def test_routing_equals_a_token_loop(top_k, capacity, glu):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, top_k, capacity, groups=2, glu=bool(glu)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y, aux = moe(x)
    want, want_aux, dropped = _loop_moe(moe, x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(aux, want_aux)
    if capacity == 50:  # half the slots tokens need: the dropping path runs
        assert dropped > 0
    if capacity == 200:  # a slot for every token of the group in every expert: none dropped
        assert dropped == 0


# --------------------------------------------------------------------------- capture and plans
#: a hand-sized layer whose experts' weights (2 · 4 · 32 · 512 floats) dwarf its activations
LAYER = "moe-gpt:layers=1,hidden=32,heads=2,kv_heads=2,ffn=512,experts=4,top_k=2,batch=4," \
        "seq=8,vocab=64"


@pytest.fixture(scope="module")
def layer_graph():
    return capture(*build_model(parse_model_spec(LAYER), "meta"))


def test_specs_resolve_groups_and_refuse_bad_shapes():
    spec = parse_model_spec("mixtral-8x7b")
    assert spec.name == "moe-gpt" and spec.get("groups") == spec.get("batch") == 256
    assert (spec.get("experts"), spec.get("top_k"), spec.get("kv_heads")) == (8, 2, 8)
    assert parse_model_spec("moe-gpt:groups=2").get("groups") == 2
    for bad, words in [("moe-gpt:top_k=5,experts=4", "top_k=5"),
                       ("moe-gpt:groups=3", "groups=3"), ("moe-gpt:kv_heads=3", "kv_heads=3"),
                       ("moe-gpt:glu=2", "glu=2")]:
        with pytest.raises(UserError, match=words):
            parse_model_spec(bad)


def test_captured_layers_have_rules_fold_and_cost_the_einsums():
    """Every operator of a 3-layer model has a rule (strict), the layers are found as repeated,
    and the dispatch einsum is costed at 2·G·T·E·C·d FLOPs."""
    spec = parse_model_spec("moe-gpt:layers=3,hidden=16,heads=2,kv_heads=1,ffn=32,batch=2,"
                            "seq=8,experts=4,top_k=1")
    graph = capture(*build_model(spec, "meta"))
    assert not check_rules(graph, strict=True)
    blocks = find_blocks(graph)
    assert blocks is not None and blocks.count == 3
    dispatch = next(n for n in graph.ops if n.target == "aten.einsum.default")
    cap = expert_capacity(8, 4, 1, 125)
    assert dispatch.flops == 2 * 2 * 8 * 4 * cap * 16


def test_planner_splits_the_experts_and_saves_exactly_the_hand_formula(layer_graph):
    """On 4 devices without overlap the plan splits the experts (weights S(0) by expert) and
    its per-kind bytes hold four all-to-alls (dispatch and combine, forward and backward) of
    (p−1)/p of the local expert input. The best plan with the experts whole (the expert matmuls
    read their weights B) costs exactly the experts' gradient all-reduces more, less those
    all-to-alls."""
    g, p = layer_graph, 4
    c = cluster(devices=p, latency_s=1e-6, peak_flops=1e10, overlap=False)
    mesh = c.mesh((p,))
    free = build_problem(g, mesh, c)
    experts = [n.name for n in g.params if n.fqn.endswith(("moe.w1", "moe.w2"))]
    sigs = dict(free.sigs)
    for w in experts:
        sigs[w] = [s for s in sigs[w] if s.out == (B,) and s.zero == 0]
    for n in g.ops:
        for i in (i for i, src in enumerate(n.inputs) if src in experts):
            sigs[n.name] = [s for s in sigs[n.name] if s.ins[i] == (B,)]
    ep, dp = solve_sharding(free), solve_sharding(build_problem(g, mesh, c, sigs=sigs))
    assert all(ep.choice[w].out == (S(0),) for w in experts)
    expert_in = next(n for n in g.ops if n.target == "aten.einsum.default").out
    sent, lat = collective_cost("all_to_all", p, expert_in.nbytes / p)
    a2a_s = step_seconds(Step(0, S(1), S(0), "all_to_all", sent, lat), mesh)
    saved_s = sum(step_seconds(Step(0, P, B, "all_reduce",
                                    *collective_cost("all_reduce", p, g[w].out.nbytes)),
                               mesh, grad_sync_share(g, w, (B,), (p,))) for w in experts)
    assert saved_s > 4 * a2a_s
    assert math.isclose(dp.result.objective - ep.result.objective, saved_s - 4 * a2a_s,
                        rel_tol=1e-9)
    plan = plan_graph(g, c, model_spec=LAYER, meshes=[mesh], workers=1)
    a2a = plan.cost["per_axis_kind"]["x"]["all_to_all"]
    assert a2a["count"] == 4 and math.isclose(a2a["bytes"], 4 * sent)
    assert math.isclose(plan.cost["total_s"], ep.result.objective, rel_tol=1e-9)


@pytest.mark.dist
def test_expert_parallel_plan_runs_checked_on_4_ranks(layer_graph, tmp_path):
    """A 2 × 2 plan: experts split by expert on one axis (all-to-alls) and by their hidden
    width on the other; loss, every gradient and the bytes per (axis, kind) match the plan."""
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10, overlap=False)
    plan = plan_graph(layer_graph, c, model_spec=LAYER, meshes=[c.mesh((2, 2))], workers=1)
    w1 = next(o for o in plan.ops if o.name.endswith("moe_w1"))
    assert S(0) in w1.out.values(), w1.out
    assert any("all_to_all" in kinds for kinds in plan.cost["per_axis_kind"].values())
    path = tmp_path / "moe.json"
    save_plan(plan, path)
    run_checked(path, steps=2, require=("all_to_all",))
