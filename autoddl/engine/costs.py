"""Costs of signatures and edges on one mesh: seconds, bytes, memory per device.

* **Edge** ``u -> v`` (argument i), producer output placement ``a``, consumer signature reading
  ``in`` and returning gradient ``g``: forward the collectives of ``a -> in``, backward those of
  ``g -> grad_target(a)`` (only when the tensor carries a gradient), each step costing
  ``bytes / axis bandwidth + latency steps × axis latency`` (:mod:`autoddl.engine.placements`).
  A weight's gradient synchronisation is the backward of its edges: a ``B`` weight read by
  batch-split work returns a ``P`` gradient, all-reduced; a split weight gathered for its consumer
  gets its gradient reduce-scattered (ZeRO-3/FSDP).
* **Node**: the redundant-compute charge. Replicating every op moves no bytes, so a bare bandwidth
  objective would make "every device computes everything" optimal. A signature whose work is
  divided over ``D`` of the mesh's ``N`` devices (``D`` = product of the axes on which its output
  is not ``B``) is charged ``3 · flops · (1/D − 1/N) / peak`` seconds (forward + backward); zero
  when split over every axis. Among plans that divide the work the objective is exactly the
  bandwidth cost.
* **Memory per device**: each weight's piece × (weight + gradient + optimizer states); each op's
  output piece (kept for backward); and a consumer that saves its inputs (matmuls, attention)
  keeps its own copy of an input that had to be converted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from autoddl.engine.cluster import Cluster, Mesh
from autoddl.engine.graph import OpGraph
from autoddl.engine.placements import Placement, Step, grad_target, local_fraction, reshard_steps
from autoddl.engine.rules import Signature, signatures
from autoddl.errors import UserError
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingProblem

OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}

SAVES_INPUTS = {
    "aten.linear.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default",
    "aten.addmm.default", "aten.scaled_dot_product_attention.default",
}


@dataclass(frozen=True)
class TrainingConfig:
    """What a training step keeps in memory besides activations."""

    optimizer: str = "adam"
    #: "none", or "layers": repeated layers keep only their inputs and are recomputed in
    #: backward (Megatron-LM's full activation recomputation)
    recompute: str = "none"

    def __post_init__(self) -> None:
        if self.recompute not in ("none", "layers"):
            raise UserError(f"unknown recompute {self.recompute!r}; choose none or layers")
        if self.optimizer not in OPTIMIZER_STATES:
            raise UserError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}"
            )

    @property
    def state_copies(self) -> int:
        """Copies of each weight kept per device: weight, gradient, optimizer states."""
        return 2 + OPTIMIZER_STATES[self.optimizer]


def step_seconds(step: Step, mesh: Mesh) -> float:
    """Time of one step under the α-β model of its mesh axis."""
    if step.bytes_per_device == 0 and step.latency_steps == 0:
        return 0.0
    ax = mesh.axes[step.axis]
    return step.bytes_per_device / (ax.bandwidth_gbps * 1e9) + step.latency_steps * ax.latency_s


def steps_seconds(steps: Sequence[Step], mesh: Mesh) -> float:
    """Total time of a list of steps."""
    return sum(step_seconds(s, mesh) for s in steps)


@dataclass(frozen=True, eq=False)
class CostedGraph:
    """A graph's signatures on one mesh and the :class:`ShardingProblem` they define."""

    graph: OpGraph
    mesh: Mesh
    cluster: Cluster
    config: TrainingConfig
    sigs: dict[str, list[Signature]]
    problem: ShardingProblem
    index: dict[str, int] = field(default_factory=dict)
    mult: "Multiplicity | None" = None


def _keys(items: list) -> tuple[np.ndarray, list]:
    """Map each item to the index of its distinct value (first-seen order)."""
    seen: dict = {}
    idx = np.array([seen.setdefault(it, len(seen)) for it in items], dtype=np.int64)
    return idx, list(seen)


def work_divisor(sig: Signature, mesh: Mesh) -> int:
    """Devices an op's work is divided over: the axes on which its output or an input is split.

    A ``P`` output made from ``P`` inputs (linearity) is *not* divided work: every device runs
    the whole operator on its addend.
    """
    d = 1
    for axis, ax in enumerate(mesh.axes):
        pls = [sig.out[axis]] + [p[axis] for p in sig.ins]
        if any(p.startswith("S(") for p in pls):
            d *= ax.size
    return d


def node_compute_penalty_s(flops: float, sig: Signature, mesh: Mesh, peak_flops: float) -> float:
    """Seconds of forward+backward work a signature repeats instead of dividing."""
    return 3.0 * flops * (1.0 / work_divisor(sig, mesh) - 1.0 / mesh.num_devices) / peak_flops


def node_memory_bytes(node, sig: Signature, mesh: Mesh, config: TrainingConfig) -> float:
    """Per-device bytes a node's signature keeps: weight states, or its saved output."""
    piece = node.out.nbytes * local_fraction(sig.out, mesh.shape)
    if node.kind == "param":
        return piece * (config.state_copies if node.requires_grad else 1)
    if node.kind == "op" and node.requires_grad:
        return piece
    return 0.0


def edge_steps(nbytes: float, src_out: Placement, dst_in: Placement, dst_grad: Placement | None,
               mesh: Mesh) -> tuple[list[Step] | None, list[Step]]:
    """Forward and backward steps of one edge (forward None when forbidden)."""
    fwd = reshard_steps(src_out, dst_in, nbytes, mesh.shape)
    bwd: list[Step] = []
    if dst_grad is not None and fwd is not None:
        target = tuple(grad_target(p) for p in src_out)
        bwd = reshard_steps(dst_grad, target, nbytes, mesh.shape) or []
    return fwd, bwd


def loss_steps(graph: OpGraph, placement: Placement, mesh: Mesh) -> list[Step]:
    """Steps that make the loss whole (``B``) on every device, forward only."""
    steps = reshard_steps(placement, ("B",) * len(placement), graph[graph.loss].out.nbytes,
                          mesh.shape)
    assert steps is not None
    return steps


@dataclass(frozen=True)
class Multiplicity:
    """How many real copies each node and edge of a reduced graph stands for.

    ``extra_edges`` are edges the reduced graph does not hold: (src, dst, index, copies), e.g. a
    repeated layer's output feeding the next copy of the same layer.
    """

    nodes: dict[str, int] = field(default_factory=dict)
    edges: dict[tuple[str, str, int], int] = field(default_factory=dict)
    extra_edges: tuple[tuple[str, str, int, int], ...] = ()
    #: memory copies where they differ from the cost copies (activation recomputation keeps
    #: only layer inputs, and one layer's activations while it is recomputed)
    node_mem: dict[str, float] = field(default_factory=dict)
    edge_mem: dict[tuple[str, str, int], float] = field(default_factory=dict)
    #: ops whose forward runs twice (recomputed in backward): 4 passes of FLOPs instead of 3,
    #: forward conversions of their inputs twice
    recomputed: frozenset[str] = frozenset()

    def node(self, name: str) -> int:
        """Copies of node ``name``."""
        return self.nodes.get(name, 1)

    def node_memory(self, name: str) -> float:
        """Memory copies of node ``name``."""
        return self.node_mem.get(name, self.node(name))

    def edge_memory(self, src: str, dst: str, index: int, copies: int) -> float:
        """Memory copies of an edge (its consumer's saved converted input)."""
        return self.edge_mem.get((src, dst, index), copies)

    def edge(self, src: str, dst: str, index: int) -> int:
        """Copies of an edge."""
        return self.edges.get((src, dst, index), 1)

    def all_edges(self, graph: OpGraph) -> list[tuple[str, str, int, int]]:
        """Every (src, dst, index, copies), the graph's edges and the extra ones."""
        out = [(src, n.name, i, self.edge(src, n.name, i))
               for n in graph.nodes for i, src in enumerate(n.inputs)]
        return out + [e for e in self.extra_edges if e[3] > 0]


class _EdgeCoster:
    """Edge cost and memory matrices. Time is linear in the tensor's bytes plus latency, so each
    (placements) pair is costed once per unit byte, and whole matrices are cached by their
    placement lists: the identical tensors of repeated layers are costed once."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.pairs: dict[tuple, tuple[float, float, float, float, float]] = {}
        self.matrices: dict[tuple, tuple[np.ndarray, ...]] = {}

    def unit(self, pa: Placement, pin: Placement, pgrad: Placement | None,
             ) -> tuple[float, float, float, float, float]:
        """(fwd s/byte, fwd latency s, bwd s/byte, bwd latency s, memory fraction) of a pair;
        inf when the conversion is forbidden."""
        key = (pa, pin, pgrad)
        hit = self.pairs.get(key)
        if hit is None:
            fwd, bwd = edge_steps(1.0, pa, pin, pgrad, self.mesh)
            if fwd is None:
                hit = (np.inf, np.inf, 0.0, 0.0, 0.0)
            else:
                def split(steps):
                    per_byte = sum(st.bytes_per_device / (self.mesh.axes[st.axis].bandwidth_gbps
                                                          * 1e9) for st in steps)
                    return per_byte, steps_seconds(steps, self.mesh) - per_byte
                fb, fl = split(fwd)
                bb, bl = split(bwd)
                frac = local_fraction(pin, self.mesh.shape) if pa != pin else 0.0
                hit = (fb, fl, bb, bl, frac)
            self.pairs[key] = hit
        return hit

    def choices(self, graph: OpGraph, sigs: dict[str, list[Signature]], index: dict[str, int],
                src: str, dst: str, i: int, copies: int, mem_copies: float = -1.0,
                fwd_times: int = 1) -> EdgeChoices:
        src_key, src_vals = _keys([s.out for s in sigs[src]])
        dst_key, dst_vals = _keys([(s.ins[i], s.grads[i]) for s in sigs[dst]])
        nbytes = graph[src].out.nbytes
        saves = graph[dst].target in SAVES_INPUTS
        mkey = (tuple(src_vals), tuple(dst_vals))
        mats = self.matrices.get(mkey)
        if mats is None:
            units = np.array([[self.unit(pa, pin, pg) for pin, pg in dst_vals]
                              for pa in src_vals], dtype=float).reshape(
                                  len(src_vals), len(dst_vals), 5)
            mats = tuple(units[..., k] for k in range(5))
            self.matrices[mkey] = mats
        fb, fl, bb, bl, frac = mats
        # a forbidden pair is inf in fwd; the backward of a tensor with no gradient is empty
        cost = fwd_times * (fb * nbytes + fl) + (bb * nbytes + bl)
        mem = frac * nbytes if saves else np.zeros_like(cost)
        mem_copies = copies if mem_copies < 0 else mem_copies
        return EdgeChoices(index[src], index[dst], src_key, dst_key, cost * copies,
                           mem * mem_copies)


def build_problem(graph: OpGraph, mesh: Mesh, cluster: Cluster,
                  config: TrainingConfig = TrainingConfig(),
                  mult: Multiplicity | None = None) -> CostedGraph:
    """Signatures and costs of every node and edge of ``graph`` on ``mesh`` (times ``mult``)."""
    mult = mult or Multiplicity()
    sig_cache: dict[tuple, list[Signature]] = {}
    sigs = {}
    for n in graph.nodes:  # identical nodes of repeated layers share their signature lists
        key = (n.kind, n.target, n.out, tuple(graph[i].out for i in n.inputs),
               tuple(graph[i].requires_grad for i in n.inputs), n.args, n.kwargs)
        if key not in sig_cache:
            sig_cache[key] = signatures(n, graph, mesh.shape)
        sigs[n.name] = sig_cache[key]
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = []
    for n in graph.nodes:
        ss = sigs[n.name]
        if not ss:
            raise UserError(f"{n.name} ({n.target}) has no legal signature on mesh {mesh}")
        redo = 4.0 / 3.0 if n.name in mult.recomputed else 1.0  # forward once more
        cost = np.array([redo * node_compute_penalty_s(n.flops, s, mesh, cluster.peak_flops)
                         if n.kind == "op" else 0.0 for s in ss])
        if n.name == graph.loss:  # the loss value is made whole on every device
            cost += [steps_seconds(loss_steps(graph, s.out, mesh), mesh) for s in ss]
        mem = np.array([node_memory_bytes(n, s, mesh, config) for s in ss])
        k = mult.node(n.name)
        nodes.append(NodeChoices(n.name, cost * k, mem * mult.node_memory(n.name)))
    coster = _EdgeCoster(mesh)
    edges = [coster.choices(graph, sigs, index, src, dst, i, k,
                            mult.edge_memory(src, dst, i, k), 2 if dst in mult.recomputed else 1)
             for src, dst, i, k in mult.all_edges(graph)]
    problem = ShardingProblem(tuple(nodes), tuple(edges), float(cluster.memory_per_device_bytes))
    return CostedGraph(graph, mesh, cluster, config, sigs, problem, index, mult)


@dataclass(frozen=True)
class Collective:
    """One predicted collective: which edge, which pass, which axis, what kind, how many bytes."""

    src: str
    dst: str
    index: int
    direction: str  # "forward" or "backward"
    axis: str
    kind: str
    bytes_per_device: float
    seconds: float
    copies: int = 1  # repeated layers: how many real copies of this edge


def predicted_collectives(costed: CostedGraph, choice: dict[str, Signature]) -> list[Collective]:
    """Every collective step the plan runs in one training step (local steps omitted)."""
    out = []
    mesh = costed.mesh
    mult = costed.mult or Multiplicity()
    for src, dst, i, copies in mult.all_edges(costed.graph):
        sv = choice[dst]
        fwd, bwd = edge_steps(costed.graph[src].out.nbytes, choice[src].out, sv.ins[i],
                              sv.grads[i], mesh)
        assert fwd is not None, f"plan converts {src}->{dst} in a forbidden way"
        for direction, steps in (("forward", fwd), ("backward", bwd)):
            for st in steps:
                if st.kind in ("slice", "none"):
                    continue
                again = 2 if direction == "forward" and dst in mult.recomputed else 1
                out.append(Collective(src, dst, i, direction, mesh.axes[st.axis].name,
                                      st.kind, st.bytes_per_device, step_seconds(st, mesh),
                                      copies * again))
    for st in loss_steps(costed.graph, choice[costed.graph.loss].out, mesh):
        if st.kind not in ("slice", "none"):  # once per loss computed (per micro-batch)
            out.append(Collective(costed.graph.loss, "output", 0, "forward",
                                  mesh.axes[st.axis].name, st.kind, st.bytes_per_device,
                                  step_seconds(st, mesh), mult.node(costed.graph.loss)))
    return out


def breakdown(costed: CostedGraph, choice: dict[str, Signature]) -> dict:
    """Cost and memory of a plan: totals, per mesh axis, per collective kind, memory parts."""
    mesh, graph = costed.mesh, costed.graph
    colls = predicted_collectives(costed, choice)
    per_axis: dict[str, dict[str, float]] = {
        a.name: {"bytes": 0.0, "seconds": 0.0, "count": 0} for a in mesh.axes}
    per_kind: dict[str, dict[str, float]] = defaultdict(lambda: {"bytes": 0.0, "seconds": 0.0,
                                                                 "count": 0})
    for c in colls:
        for bucket in (per_axis[c.axis], per_kind[c.kind]):
            bucket["bytes"] += c.bytes_per_device * c.copies
            bucket["seconds"] += c.seconds * c.copies
            bucket["count"] += c.copies
    bandwidth_s = sum(c.seconds * c.copies for c in colls)
    mult = costed.mult or Multiplicity()
    peak = costed.cluster.peak_flops
    def redo(name: str) -> float:
        return 4.0 / 3.0 if name in mult.recomputed else 1.0

    penalty_s = sum(mult.node(n.name) * redo(n.name)
                    * node_compute_penalty_s(n.flops, choice[n.name], mesh, peak)
                    for n in graph.ops)
    compute_s = sum(mult.node(n.name) * redo(n.name) * 3.0 * n.flops
                    / work_divisor(choice[n.name], mesh) / peak for n in graph.ops)
    mem = {"weights_bytes": 0.0, "activations_bytes": 0.0, "converted_inputs_bytes": 0.0}
    for n in graph.nodes:
        b = node_memory_bytes(n, choice[n.name], mesh, costed.config) * mult.node_memory(n.name)
        mem["weights_bytes" if n.kind == "param" else "activations_bytes"] += b
    for src, dst, i, copies in mult.all_edges(graph):
        pin = choice[dst].ins[i]
        if graph[dst].target in SAVES_INPUTS and choice[src].out != pin:
            mem["converted_inputs_bytes"] += (mult.edge_memory(src, dst, i, copies)
                                              * graph[src].out.nbytes
                                              * local_fraction(pin, mesh.shape))
    mem["per_device_bytes"] = sum(mem.values())
    mem["capacity_bytes"] = float(costed.cluster.memory_per_device_bytes)
    return {
        "total_s": bandwidth_s + penalty_s,
        "bandwidth_s": bandwidth_s,
        "redundant_compute_s": penalty_s,
        "compute_s": compute_s,
        "step_time_s": compute_s + bandwidth_s,  # no overlap assumed: an upper estimate
        "bytes_per_device": sum(c.bytes_per_device * c.copies for c in colls),
        "per_axis": per_axis,
        "per_kind": dict(sorted(per_kind.items())),
        "memory": mem,
    }
