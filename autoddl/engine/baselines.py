"""The plans the field uses, as ordinary plans under autoddl's own cost model.

Each baseline fixes a mesh (and, for PTD-P, a pipeline degree), the placement of every parameter
and input, and lets every operator take the signature that reads them as placed at the least
local cost (:func:`greedy_assign`); the plan is then costed by the functions the ILP uses
(:func:`~autoddl.engine.costs.breakdown`, the pipelined programs' costs) and returned as a
:class:`~autoddl.engine.plan.Plan`. Every baseline's plan lies in the ILP's search space, so the
ILP's optimum is never worse (the tests check it). With Ψ the bytes of the weights and N devices:

* **DDP**: 1-axis mesh of all N devices, the user's inputs split by batch (constant leaves:
  masks, position ids, tables, placed as their readers need), weights replicated. Each weight's
  gradient comes back ``P`` and is all-reduced: 2(N−1)/N · Ψ bytes sent per device per step.
* **ZeRO-1 / ZeRO-2**: as DDP, optimizer states (ZeRO-2: and gradients) divided over the N
  devices. Reduce-scatter + all-gather move the all-reduce's bytes, 2(N−1)/N · Ψ; memory per
  weight 2 + k/N resp. 1 + (1+k)/N copies instead of 2 + k (k optimizer states).
* **ZeRO-3 (FSDP)**: each weight stored split over the N devices (its first divisible dim),
  all-gathered for use in forward, gathered again in backward, its gradient reduce-scattered:
  3(N−1)/N · Ψ, 1.5× DDP, for (2 + k)/N copies.
* **Megatron TP + DP**: mesh (d, t), t within a node. The layers are found structurally, pre-LN
  or post-LN (:mod:`autoddl.engine.megatron`): a transformer layer is the scope of an attention
  op; its linears whose output reaches a residual add (through dropout, views, casts) are
  row-parallel (weight split on its input dim, output ``P``, all-reduced right there), the others
  column-parallel (weight and bias split on the output dim); the vocabulary's embedding table is
  split by rows, an LM head column-parallel (both kept whole when t does not divide the
  vocabulary, which Megatron pads). Per layer forward: two all-reduces of b·s·h elements on the
  t axis (after the attention projection and the second MLP linear); backward: one all-reduce
  per column-parallel reader of the layer's normalized inputs (two with fused QKV, as in the
  paper; separate q, k, v make it four). A fused QKV (GPT-2, ViT) is split contiguously, not by
  heads as Megatron permutes it, so its q, k, v slices are gathered.
* **PTD-P grid** (Megatron-LM SC'21): every (t, p, d) with t·p·d = N, t dividing the GPUs of a
  node, p dividing the layers and at most the micro-batches; mesh (pp=p, d, t), the pipeline
  across nodes first, equal runs of layers per stage (1F1B), tensor and data parallel inside each
  stage as above. The cheapest fitting configuration wins.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autoddl.engine.costs import CostedGraph
from autoddl.engine.graph import OpGraph, OpNode
from autoddl.engine.megatron import (  # noqa: F401 (re-exported)
    LINEAR, NotApplicable, Split, megatron_layout, megatron_roles,
)
from autoddl.engine.placements import B, P, S, Placement
from autoddl.engine.plan import Plan, format_bytes
from autoddl.engine.rules import (
    ZERO_GRADS, ZERO_NONE, ZERO_REGATHER, ZERO_STATES, Signature,
)
from autoddl.engine.workload import Workload, plan_from_choice
from autoddl.formulations.sharding import within_capacity


@dataclass
class Outcome:
    """One method's result: its plan (None when not applicable) and how long it searched."""

    method: str
    config: str = ""
    plan: Plan | None = None
    search_s: float = 0.0
    note: str = ""
    #: other configurations the method evaluated (the PTD-P grid): (config, plan or reason)
    tried: tuple[tuple[str, "Plan | str"], ...] = ()

    @property
    def fits(self) -> bool:
        """Whether the plan fits the devices' memory."""
        return self.plan is not None and fits(self.plan)


def fits(plan: Plan) -> bool:
    """Whether a plan's peak memory per device is within the capacity."""
    m = plan.memory
    return within_capacity(m["per_device_bytes"], m["capacity_bytes"])


def fit_note(plan: Plan) -> str:
    """"" when ``plan`` fits, else "does not fit: needs X per device"."""
    if fits(plan):
        return ""
    return f"does not fit: needs {format_bytes(plan.memory['per_device_bytes'])} per device"


# --------------------------------------------------------------------------- assignment
Allowed = Callable[[OpNode, Signature], bool]


def greedy_assign(costed: CostedGraph, fixed: dict[str, Signature],
                  allowed: Allowed | None = None, preferred: Allowed | None = None
                  ) -> dict[str, Signature]:
    """One signature per node: ``fixed`` ones kept, every operator (in graph order) the allowed
    signature of least local cost — its node cost plus its input edges' costs from the producers
    chosen so far; a producer not yet chosen (a parameter or input) takes the placement cheapest
    for that edge. Edges from producers later in the order (repeated layers) are not seen.
    Among allowed signatures the ``preferred`` ones are taken when there are any."""
    g, prob = costed.graph, costed.problem
    n = len(g.nodes)
    pick = np.full(n, -1)
    for name, s in fixed.items():
        sigs = costed.sigs[name]
        pick[costed.index[name]] = sigs.index(s if s in sigs else dataclasses.replace(s, zero=0))
    in_edges = defaultdict(list)
    for e in prob.edges:
        if e.src != e.dst:
            in_edges[e.dst].append(e)
    for v, node in enumerate(g.nodes):
        if node.kind != "op" or pick[v] >= 0:
            continue
        sigs = costed.sigs[node.name]
        cost = prob.nodes[v].cost_s.astype(float).copy()
        lazy = []
        for e in in_edges[v]:
            if pick[e.src] >= 0:
                cost += e.cost_s[e.src_key[pick[e.src]]][e.dst_key]
            elif g.nodes[e.src].kind != "op":
                per_dst = e.cost_s[:, e.dst_key]  # producer key x consumer signature
                cost += per_dst.min(axis=0)
                lazy.append((e, per_dst.argmin(axis=0)))
        if allowed is not None:
            cost = np.where([allowed(node, s) for s in sigs], cost, np.inf)
        if preferred is not None:
            better = np.where([preferred(node, s) for s in sigs], cost, np.inf)
            if np.isfinite(better).any():
                cost = better
        k = int(np.argmin(cost))
        if not np.isfinite(cost[k]):
            raise NotApplicable(f"no allowed placement for {node.name} ({node.target})")
        pick[v] = k
        for e, best_key in lazy:
            if pick[e.src] < 0:
                pick[e.src] = int(np.flatnonzero(e.src_key == best_key[k])[0])
    pick[pick < 0] = 0
    choice = {nd.name: costed.sigs[nd.name][int(k)] for nd, k in zip(g.nodes, pick)}
    for name, s in fixed.items():  # keep variants the lists lack (ZeRO-1)
        choice[name] = s
    return choice


def leaf(costed: CostedGraph, name: str, placement: Placement, zero: int = ZERO_NONE
         ) -> Signature:
    """The signature of parameter or input ``name`` held as ``placement`` at ``zero``."""
    for s in costed.sigs[name]:
        if s.out == placement and s.zero in (zero, ZERO_NONE):
            return dataclasses.replace(s, zero=zero)
    raise NotApplicable(f"{name} {costed.graph[name].out.shape} cannot be held as "
                        f"{'·'.join(placement)} on mesh {costed.mesh}")


def batch_inputs(costed: CostedGraph, data_axis: int | None) -> dict[str, Signature]:
    """Every user input split along its first dim (the batch) on ``data_axis``. Constant leaves
    (masks, position ids, tables, buffers) define no batch and are not fixed: each takes the
    placement cheapest for its first reader (:func:`greedy_assign`)."""
    out = {}
    for nd in costed.graph.user_inputs:
        pl = [B] * costed.mesh.ndim
        if data_axis is not None and costed.mesh.shape[data_axis] > 1:
            size = costed.mesh.shape[data_axis]
            if not nd.out.shape or nd.out.shape[0] % size:
                raise NotApplicable(f"batch {nd.out.shape[:1]} of {nd.name} is not divisible "
                                    f"by the {size} data-parallel devices")
            pl[data_axis] = S(0)
        out[nd.name] = leaf(costed, nd.name, tuple(pl))
    return out


# --------------------------------------------------------------------------- data parallel
def _data_parallel(work: Workload, zero: int) -> tuple[CostedGraph, dict[str, Signature]]:
    costed = work.costed(work.mesh((work.cluster.num_devices,)))
    fixed = batch_inputs(costed, 0)
    g = costed.graph
    n = costed.mesh.num_devices
    for p in g.params:
        if zero == ZERO_REGATHER and p.requires_grad and n > 1:
            dims = [d for d in range(p.out.ndim) if p.out.shape[d] % n == 0 and p.out.shape[d] > 1]
            if dims:  # stored split on its first divisible dim; the rest stays replicated
                fixed[p.name] = leaf(costed, p.name, (S(dims[0]),), ZERO_REGATHER)
                continue
        z = zero if zero in (ZERO_STATES, ZERO_GRADS) and p.requires_grad and n > 1 else 0
        fixed[p.name] = leaf(costed, p.name, (B,), z)
    gathered = zero == ZERO_REGATHER
    choice = greedy_assign(costed, fixed, reads_params(fixed, gathered), divides(0))
    return costed, choice


def divides(axis: int | None) -> Allowed | None:
    """Signatures that divide the operator's work over mesh axis ``axis`` (an input or the
    output split there): what data parallelism does wherever it can."""
    if axis is None:
        return None

    def ok(node: OpNode, sig: Signature) -> bool:
        return any(p[axis].startswith("S(") for p in (sig.out, *sig.ins))
    return ok


def reads_params(fixed: dict[str, Signature], gathered: bool) -> Allowed:
    """Parameters read as stored, or (``gathered``, ZeRO-3) whole."""
    def ok(node: OpNode, sig: Signature) -> bool:
        for src, pin in zip(node.inputs, sig.ins):
            s = fixed.get(src)
            if s is None or s.ins:  # not a fixed leaf
                continue
            if gathered and s.zero == ZERO_REGATHER:
                if any(p != B for p in pin):
                    return False
            elif pin != s.out:
                return False
        return True
    return ok


ZERO_METHODS = {"DDP": ZERO_NONE, "ZeRO-1": ZERO_STATES, "ZeRO-2": ZERO_GRADS,
                "ZeRO-3 (FSDP)": ZERO_REGATHER}


def data_parallel(work: Workload, method: str = "DDP") -> Outcome:
    """DDP or ZeRO-1/2/3 (``method``: a key of :data:`ZERO_METHODS`) on all devices."""
    t0 = time.perf_counter()
    try:
        costed, choice = _data_parallel(work, ZERO_METHODS[method])
    except NotApplicable as exc:
        return Outcome(method, f"d={work.cluster.num_devices}", None,
                       time.perf_counter() - t0, f"not applicable: {exc}")
    plan = plan_from_choice(work, costed, choice, method, time.perf_counter() - t0)
    return Outcome(method, f"d={costed.mesh.num_devices}", plan, time.perf_counter() - t0,
                   fit_note(plan))


# --------------------------------------------------------------------------- Megatron
def megatron_choice(costed: CostedGraph, data_axis: int | None, tp_axis: int | None
                    ) -> dict[str, Signature]:
    """Megatron's placements on a (d, t) mesh (either axis may be absent)."""
    layout = megatron_layout(costed.graph)
    fixed = batch_inputs(costed, data_axis)
    for p in costed.graph.params:
        split = layout.get(p.name)
        whole = (B,) * costed.mesh.ndim
        if tp_axis is None or split is None:
            fixed[p.name] = leaf(costed, p.name, whole)
            continue
        try:
            fixed[p.name] = leaf(costed, p.name, whole[:tp_axis] + (S(split.dim),)
                                 + whole[tp_axis + 1:])
        except NotApplicable:
            if not split.padded:
                raise
            fixed[p.name] = leaf(costed, p.name, whole)  # a vocabulary t does not divide
    return greedy_assign(costed, fixed, reduced_at_once(costed.graph, fixed, layout, tp_axis),
                         divides(data_axis))


def reduced_at_once(g: OpGraph, fixed: dict[str, Signature], layout: dict[str, Split],
                    tp_axis: int | None) -> Allowed:
    """Parameters read as stored (:func:`reads_params`), and partial sums on the tensor axis
    only out of a row-parallel linear, a vocabulary-parallel embedding or the loss: Megatron
    all-reduces them right there, once, not again at each reader (the residual stream's)."""
    reads = reads_params(fixed, False)
    splitting = {p for p, s in layout.items() if s.role in ("row", "vocab")}

    def ok(node: OpNode, sig: Signature) -> bool:
        if not reads(node, sig):
            return False
        if tp_axis is None or sig.out[tp_axis] != P or node.name == g.loss:
            return True
        return any(i in splitting for i in node.inputs)
    return ok


def _axes(t: int, d: int) -> tuple[int | None, int | None]:
    """(data axis, tensor axis) indices of a mesh (d, t) with size-1 axes dropped."""
    if d > 1 and t > 1:
        return 0, 1
    return (0 if d > 1 else None), (0 if t > 1 else None)


def ptdp(work: Workload, t: int, p: int, d: int, method: str = "Megatron PTD-P",
         v: int = 1) -> Outcome:
    """Megatron's plan for one (t, p, d): tensor parallel t within a node, p pipeline stages of
    equal runs of layers (``v`` interleaved chunks per device), data parallel d."""
    t0 = time.perf_counter()
    config = f"t={t},p={p},d={d}" + (f",v={v}" if v > 1 else "")

    def na(reason: str) -> Outcome:
        return Outcome(method, config, None, time.perf_counter() - t0, f"not applicable: {reason}")

    if t * p * d != work.cluster.num_devices:
        return na(f"t·p·d = {t * p * d} is not the {work.cluster.num_devices} devices")
    data_axis, tp_axis = _axes(t, d)
    try:
        if p == 1:
            costed = work.costed(work.mesh((d, t)))
            choice = megatron_choice(costed, data_axis, tp_axis)
            plan = plan_from_choice(work, costed, choice, method, time.perf_counter() - t0)
            return Outcome(method, config, plan, time.perf_counter() - t0, fit_note(plan))
        if p > work.microbatches:
            return na(f"p={p} exceeds the {work.microbatches} micro-batches")
        shape = tuple(s for s in (d, t) if s > 1) or (1,)
        cands = [c for c in work.stage_candidates(p) if c[2].shape == shape]
        if not cands:
            return na(f"no stage mesh {shape} with {p} stages")
        _, pp, smesh = cands[0]
        try:
            built = work.program(p, smesh, pp, interleave=v)
        except ValueError as exc:
            return na(str(exc))
        if built is None:
            return na(f"pipelining needs repeated layers (four or more) divisible by p={p}")
        prog, costed, problem, bubble = built
        choice = megatron_choice(costed, data_axis, tp_axis)
    except NotApplicable as exc:
        return na(str(exc))
    plan = plan_from_choice(work, costed, choice, method, time.perf_counter() - t0, stages=p,
                            pp=pp, program=prog, problem=problem, bubble_s=bubble)
    return Outcome(method, config, plan, time.perf_counter() - t0, fit_note(plan))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def megatron_tp_dp(work: Workload) -> Outcome:
    """Megatron 1-D tensor parallelism (t > 1, within a node) plus data parallelism: the
    cheapest fitting t."""
    per_node = work.cluster.devices_per_node
    n = work.cluster.num_devices
    tries = [ptdp(work, t, 1, n // t, "Megatron TP+DP") for t in _divisors(per_node)
             if t > 1 and n % t == 0]
    if not tries:
        try:
            megatron_roles(work.sharding_graph)
            reason = f"tensor parallelism stays within a node, and nodes have {per_node} device"
        except NotApplicable as exc:
            reason = str(exc)
        return Outcome("Megatron TP+DP", note=f"not applicable: {reason}")
    return best_of("Megatron TP+DP", tries)


def ptdp_grid(work: Workload) -> Outcome:
    """The PTD-P grid search over (t, p, d): the cheapest fitting configuration."""
    n = work.cluster.num_devices
    tries = []
    for t in _divisors(work.cluster.devices_per_node):
        if n % t:
            continue
        for p in _divisors(n // t):
            if p > 1 and (p > work.microbatches or not work.num_layers
                          or work.num_layers % p):
                continue
            tries.append(ptdp(work, t, p, n // (t * p)))
    return best_of("Megatron PTD-P", tries)


def best_of(method: str, tries: list[Outcome]) -> Outcome:
    """The cheapest fitting outcome (else the leanest), with every try listed."""
    elapsed = sum(o.search_s for o in tries)
    tried = tuple((o.config, o.plan if o.plan is not None else o.note) for o in tries)
    planned = [o for o in tries if o.plan is not None]
    if not planned:
        reasons = "; ".join(dict.fromkeys(o.note.removeprefix("not applicable: ")
                                          for o in tries)) or "no configuration"
        return Outcome(method, "", None, elapsed, f"not applicable: {reasons}", tried)
    ok = [o for o in planned if o.fits]
    if ok:
        best = min(ok, key=lambda o: o.plan.cost["total_s"])
    else:
        best = min(planned, key=lambda o: o.plan.memory["per_device_bytes"])
    return dataclasses.replace(best, method=method, search_s=elapsed, tried=tried)
