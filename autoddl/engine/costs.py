"""Costs of signatures and edges on one mesh: seconds, bytes, memory per device.

* **Edge** ``u -> v`` (argument i), producer output placement ``a``, consumer signature reading
  ``in`` and returning gradient ``g``: forward the collectives of ``a -> in``, backward those of
  ``g -> grad_target(a)`` (only when the tensor carries a gradient), each step costing
  ``bytes / axis bandwidth + latency steps × axis latency`` (:mod:`autoddl.engine.placements`).
  A weight's gradient synchronisation is the backward of its edges: a ``B`` weight read by
  batch-split work returns a ``P`` gradient, all-reduced; a split weight gathered for its consumer
  gets its gradient reduce-scattered (ZeRO-3/FSDP). Gradients are synchronised in buckets (DDP's
  25 MiB, :data:`BUCKET_BYTES`), one latency chain per bucket: the backward steps of a trained
  weight's edge (and ZeRO-1/2's extra start-up) pay their latency × the gradient piece's bytes /
  BUCKET_BYTES (:func:`grad_sync_share`), in the ILP and in :func:`breakdown` alike.
* **Node**: an op's compute on one device, ``passes × forward`` (3 passes; recomputation's
  fourth is priced by :mod:`autoddl.engine.recompute`),
  with the forward priced by the roofline of :mod:`autoddl.engine.compute` on the work the
  signature leaves to one device (FLOPs divided over the axes that split it, local pieces read
  and written). Replicated work is therefore paid at its real rate, small kernels included.
* **The step** (:class:`~autoddl.formulations.sharding.StepShape`): op compute, activations'
  conversions and the loss's are *critical* (each waits for the previous); a weight's edge
  conversions (gradient reduction, ZeRO gathers) and ZeRO's start-ups depend on no activation
  and are *hidden* behind the backward compute (the ``window``: all passes but the forward), so
  only what exceeds it is exposed: step = critical + max(0, hidden − window).
* **Memory per device**: each weight's piece × (weight + gradient + optimizer states); each op's
  output piece (kept for backward); unfused attention's score stash (:func:`stash_bytes`); and a consumer that saves its inputs (matmuls, attention)
  keeps its own copy of an input that had to be converted.
* **Accumulated weight gradients** (pipelined steps of ``m`` micro-batches): the backward
  conversion of a trained weight's edge (its gradient's all-reduce, reduce-scatter, all-gather,
  all-to-all, slices: all linear) is applied once per step to the sum of the micro-batches'
  gradients, which equals summing its ``m`` results. The sum is kept in the placement the reader
  returns, so it is done only where that piece fits the memory of the weight's own gradient,
  already counted (:func:`accumulates_grad`: a ``P`` gradient of a ``B`` weight, data parallel's
  all-reduce, as DDP's ``no_sync``); elsewhere (a split weight's reduce-scatter, ZeRO-2's divided
  gradient, a weight read by several operators) it is converted per micro-batch as before. Memory
  is therefore unchanged. ``Multiplicity.grad_copies`` gives those conversions' copies per step.
* **ZeRO** (a parameter signature's ``zero``, :mod:`autoddl.engine.rules`). ZeRO-1/2 keep the
  weight as placed but divide its optimizer states (ZeRO-2: and its gradient) over the ``p_B``
  devices of the axes where it is ``B``: memory ``w · (2 + k/p_B)`` resp. ``w · (1 + (1+k)/p_B)``
  for a piece ``w`` and ``k`` optimizer states, instead of ``w · (2 + k)``. On the wire the
  gradient's reduce-scatter plus the weight's all-gather move exactly the all-reduce's bytes,
  2(p−1)/p · T, so the edge costs are the all-reduce's; the split costs one more start-up, one α
  per such axis, charged on the parameter. ZeRO-3 (``ZERO_REGATHER``): the weight stored split is
  gathered for its consumer in forward and, instead of keeping the gathered copy for backward
  (no converted-input memory), gathered again in backward: the edge's forward steps count twice.
  Data parallel moves 2(d−1)/d · Ψ per device, ZeRO-3 3(d−1)/d · Ψ: 1.5×.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from autoddl.engine.cluster import Cluster, Mesh
from autoddl.engine.compute import forward_seconds
from autoddl.engine.graph import SDPA_DROPOUT_ARG, OpGraph
from autoddl.engine.placements import Placement, Step, grad_target, local_fraction, reshard_steps
from autoddl.engine.precision import check_precision, tensor_bytes, weight_bytes_per_element
from autoddl.engine.reshard_table import unit_matrices
from autoddl.engine.mesh_signatures import signatures
from autoddl.engine.rules import (
    ZERO_GRADS, ZERO_REGATHER, ZERO_STATES, Signature, vocab_parallel_steps,
)
from autoddl.errors import UserError
from autoddl.formulations.recompute import recompute_terms, restrict_groups
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingProblem, StepShape

OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
RECOMPUTE = ("none", "layers", "selective", "auto")

SAVES_INPUTS = {
    "aten.linear.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default",
    "aten.addmm.default", "aten.scaled_dot_product_attention.default",
}


@dataclass(frozen=True)
class TrainingConfig:
    """What a training step keeps in memory besides activations."""

    optimizer: str = "adam"
    #: "auto": the MILP chooses per repeated layer (:mod:`autoddl.engine.recompute`) none,
    #: selective (attention's score stash recomputed, Korthikanti et al. 2022) or full (the
    #: layer keeps only its inputs, Megatron-LM's full recomputation); "none", "selective",
    #: "layers" (full) force one choice for every layer
    recompute: str = "none"
    #: "fp32", or "bf16": float tensors computed and sent in 2 bytes, fp32 master weights and
    #: optimizer states (:mod:`autoddl.engine.precision`; callers resolve the cluster's default)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.recompute not in RECOMPUTE:
            raise UserError(f"unknown recompute {self.recompute!r}; choose auto, none, "
                            "selective or layers")
        if self.optimizer not in OPTIMIZER_STATES:
            raise UserError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}"
            )

    @property
    def state_copies(self) -> int:
        """Copies of each weight kept per device: weight, gradient, optimizer states."""
        return 2 + OPTIMIZER_STATES[self.optimizer]


#: gradient bucket: DDP's default ``bucket_cap_mb=25`` (torch.nn.parallel.DistributedDataParallel,
#: 25 MiB); gradient synchronisation pays one latency chain per bucket
BUCKET_BYTES = 25 * 2**20


def step_seconds(step: Step, mesh: Mesh, latency_share: float = 1.0) -> float:
    """Time of one step under the α-β model of its mesh axis (two-level where the axis spans
    nodes: :meth:`~autoddl.engine.cluster.MeshAxis.step_seconds`), its latency counted
    ``latency_share`` times (a bucketed gradient's share, :func:`grad_sync_share`)."""
    if step.bytes_per_device == 0 and step.latency_steps == 0:
        return 0.0
    return mesh.axes[step.axis].step_seconds(step.kind, step.bytes_per_device,
                                             step.latency_steps * latency_share)


def steps_seconds(steps: Sequence[Step], mesh: Mesh, latency_share: float = 1.0) -> float:
    """Total time of a list of steps."""
    return sum(step_seconds(s, mesh, latency_share) for s in steps)


def grad_sync_share(graph: OpGraph, src: str, dst_grad: Placement | None,
                    mesh_shape: Sequence[int]) -> float:
    """The latency share of the backward conversion of an edge from ``src``: for a trained
    weight (its gradient synchronisation, bucketed as DDP and FSDP do) the gradient piece a
    device holds over :data:`BUCKET_BYTES`, one latency chain per bucket; else 1."""
    node = graph[src]
    if node.kind != "param" or not node.requires_grad or dst_grad is None:
        return 1.0
    return node.out.nbytes * local_fraction(dst_grad, mesh_shape) / BUCKET_BYTES


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
    #: what the problem's costs price: "step" (seconds of the step) or "bytes" (bytes each
    #: device sends, no compute, nothing hidden: :mod:`autoddl.engine.objectives`)
    objective: str = "step"


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


def node_forward_s(graph: OpGraph, n, sig: Signature, mesh: Mesh, cluster: Cluster,
                   precision: str) -> float:
    """One device's forward time of node ``n`` under ``sig`` (:mod:`autoddl.engine.compute`):
    its FLOPs divided as the signature divides the work, its local pieces read and written."""
    if n.kind != "op":
        return 0.0
    moved = tensor_bytes(n.out, precision) * local_fraction(sig.out, mesh.shape) + sum(
        tensor_bytes(graph[i].out, precision) * local_fraction(p, mesh.shape)
        for i, p in zip(n.inputs, sig.ins))
    return forward_seconds(n.target, n.flops / work_divisor(sig, mesh), moved,
                           cluster.peak_flops, cluster.compute,
                           _score_bytes(graph, n, precision) * local_fraction(sig.out, mesh.shape))


def _score_bytes(graph: OpGraph, n, precision: str) -> float:
    """Attention's whole score matrix (queries × keys per head), bytes; 0 for other ops."""
    if n.target != "aten.scaled_dot_product_attention.default":
        return 0.0
    q, k = graph[n.inputs[0]].out, graph[n.inputs[1]].out
    per_elem = tensor_bytes(q, precision) / max(q.numel, 1)
    return q.numel / q.shape[-1] * k.shape[-2] * per_elem


def _fully_divided_s(graph: OpGraph, n, mesh: Mesh, cluster: Cluster, precision: str) -> float:
    """An op's forward time were its work and traffic divided over every device of the mesh."""
    moved = (tensor_bytes(n.out, precision) + sum(tensor_bytes(graph[i].out, precision)
                                                  for i in n.inputs)) / mesh.num_devices
    return forward_seconds(n.target, n.flops / mesh.num_devices, moved, cluster.peak_flops,
                           cluster.compute,
                           _score_bytes(graph, n, precision) / mesh.num_devices)


def _per_tensor(per_byte_s: np.ndarray, nbytes: float) -> np.ndarray:
    """Seconds per byte times a tensor's bytes, a forbidden (inf) pair staying forbidden for
    an empty tensor too (inf · 0 would be NaN)."""
    if nbytes:
        return per_byte_s * nbytes
    return np.where(np.isinf(per_byte_s), np.inf, 0.0)


def passes(name: str, mult: "Multiplicity") -> float:
    """Forward passes' worth of work per training pass: 3 (forward, and a backward of twice the
    forward), plus the share of copies whose forward is recomputed in backward."""
    return 3.0 + mult.recompute_share(name)


def stash_bytes(graph: OpGraph, n, sig: Signature, mesh: Mesh, cluster: Cluster,
                precision: str) -> float:
    """Per-device bytes unfused attention keeps for backward besides its output (Korthikanti
    et al. 2022): the softmax output and, with dropout, its mask (1 byte) and output, per score
    element; 0 where attention is fused (``attention_score_passes`` 0, flash attention)."""
    if cluster.compute.attention_score_passes <= 0:
        return 0.0
    score = _score_bytes(graph, n, precision)
    if not score:
        return 0.0
    elems = score / (2.0 if precision == "bf16" else 4.0)
    p = n.arg(SDPA_DROPOUT_ARG, "dropout_p", 0.0)
    dropout = isinstance(p, (int, float)) and p > 0
    per_elem = (2 * score / elems + 1) if dropout else score / elems
    return elems * per_elem * local_fraction(sig.out, mesh.shape)


def _replicated_axes(sig: Signature, mesh_shape: Sequence[int]) -> list[int]:
    """The axes (size > 1) on which a parameter is held whole (B): where ZeRO-1/2 divide."""
    return [a for a, (p, n) in enumerate(zip(sig.out, mesh_shape)) if p == "B" and n > 1]


def zero_divisor(sig: Signature, mesh: Mesh) -> int:
    """Devices ZeRO-1/2 divide a parameter's states over: the axes (size > 1) where it is B."""
    return math.prod(mesh.shape[a] for a in _replicated_axes(sig, mesh.shape))


def zero_axes(sig: Signature, mesh_shape: Sequence[int]) -> tuple[bool, ...]:
    """The axes over which a ZeRO-1/2 parameter divides its states (held B, size > 1). Its
    gradient must arrive there as a partial sum: the all-reduce that sums it stands for the
    reduce-scatter + all-gather of the updated weight, the same bytes. A gradient already whole
    (every device computed the whole batch) would leave the all-gather unpaid: that pair is not
    offered."""
    axes = _replicated_axes(sig, mesh_shape) if sig.zero in (ZERO_STATES, ZERO_GRADS) else []
    return tuple(a in axes for a in range(len(mesh_shape)))


def zero_latency_s(sig: Signature, mesh: Mesh, nbytes: float = BUCKET_BYTES) -> float:
    """ZeRO-1/2's extra start-up: reduce-scatter + all-gather instead of one all-reduce, one α
    per axis over which the states are divided, for the weight's share of a gradient bucket
    (``nbytes`` the weight's bytes: :func:`grad_sync_share`)."""
    if sig.zero not in (ZERO_STATES, ZERO_GRADS):
        return 0.0
    share = nbytes * local_fraction(sig.out, mesh.shape) / BUCKET_BYTES
    return sum(mesh.axes[a].step_seconds("reduce_scatter", 0.0, share)
               for a in _replicated_axes(sig, mesh.shape))


def node_memory_bytes(node, sig: Signature, mesh: Mesh, config: TrainingConfig) -> float:
    """Per-device bytes a node's signature keeps: weight states, or its saved output."""
    frac = local_fraction(sig.out, mesh.shape)
    piece = tensor_bytes(node.out, config.precision) * frac
    if node.kind == "param":
        if not node.requires_grad:
            return piece
        zero = sig.zero in (ZERO_STATES, ZERO_GRADS)
        per_element = weight_bytes_per_element(  # weight, gradient, (master,) optimizer states
            node.out, config.precision, OPTIMIZER_STATES[config.optimizer],
            zero_divisor(sig, mesh) if zero else 1, sig.zero == ZERO_GRADS)
        return node.out.numel * frac * per_element
    if node.kind == "op" and node.requires_grad:
        return piece
    return 0.0


def forward_times(src: Signature, src_name: str, dst: str, mult: "Multiplicity") -> float:
    """How often an edge's forward conversion runs per pass: twice when its producer is a
    ZeRO-3 parameter gathered again in backward, 1 + the recomputed share of copies when both
    ends are in one recomputed layer (a ZeRO-3 gather inside one is the one backward uses)."""
    if src.zero == ZERO_REGATHER:
        return 2.0
    return 1.0 + mult.edge_recompute_share(src_name, dst)


def keeps_converted(graph: OpGraph, src: Signature, dst: str, pin: Placement) -> bool:
    """Whether the consumer keeps its own converted copy of an input for backward."""
    return (graph[dst].target in SAVES_INPUTS and src.out != pin
            and src.zero != ZERO_REGATHER)


def edge_steps(nbytes: float, src_out: Placement, dst_in: Placement, dst_grad: Placement | None,
               mesh: Mesh) -> tuple[list[Step] | None, list[Step]]:
    """Forward and backward steps of one edge (forward None when forbidden)."""
    fwd = reshard_steps(src_out, dst_in, nbytes, mesh.shape)
    bwd: list[Step] = []
    if dst_grad is not None and fwd is not None:
        target = tuple(grad_target(p) for p in src_out)
        bwd = reshard_steps(dst_grad, target, nbytes, mesh.shape) or []
    return fwd, bwd


def grad_fraction(sig: Signature, mesh_shape: Sequence[int]) -> float:
    """Fraction of a weight's gradient one device keeps (ZeRO-2 divides it over its B axes)."""
    frac = local_fraction(tuple(grad_target(p) for p in sig.out), mesh_shape)
    if sig.zero == ZERO_GRADS:
        frac /= math.prod(mesh_shape[a] for a in _replicated_axes(sig, mesh_shape))
    return frac


def accumulates_grad(weight_grad_fraction: float, dst_grad: Placement | None,
                     mesh_shape: Sequence[int]) -> bool:
    """Whether a weight's gradient, returned by its reader in ``dst_grad``, is summed over the
    micro-batches of a pipelined step before its conversion: when that piece is no larger than
    the weight's own gradient piece (``weight_grad_fraction``, :func:`grad_fraction`), whose
    memory then holds the sum."""
    return (dst_grad is not None
            and local_fraction(dst_grad, mesh_shape) <= weight_grad_fraction * (1 + 1e-9))


def accumulated_edges(graph: OpGraph) -> list[tuple[str, str, int]]:
    """Edges whose gradient may be accumulated over micro-batches: each from a trained weight
    read by one edge only (several readers' sums would need one buffer each)."""
    readers: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for n in graph.nodes:
        for i, src in enumerate(n.inputs):
            if graph[src].kind == "param" and graph[src].requires_grad:
                readers[src].append((src, n.name, i))
    return [es[0] for es in readers.values() if len(es) == 1]


def loss_steps(graph: OpGraph, placement: Placement, mesh: Mesh,
               precision: str = "fp32") -> list[Step]:
    """Steps that make the loss whole (``B``) on every device, forward only."""
    steps = reshard_steps(placement, ("B",) * len(placement),
                          tensor_bytes(graph[graph.loss].out, precision), mesh.shape)
    assert steps is not None
    return steps


def op_steps(graph: OpGraph, node, sig: Signature, mesh: Mesh) -> list[Step]:
    """Collectives an operator's signature runs itself, per forward (a vocabulary-parallel
    loss's all-reduces, :func:`~autoddl.engine.rules.vocab_parallel_steps`); none for most."""
    if node.kind != "op" or not node.inputs:
        return []
    return vocab_parallel_steps(node, graph[node.inputs[0]].out, sig, mesh.shape)


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
    #: a plan's recomputation, for its reports (the MILP prices it in recompute groups,
    #: :mod:`autoddl.engine.recompute`): op -> (layer, share of its copies recomputed); their
    #: forward runs again, and so do the conversions between ops of one layer
    recomputed: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: copies per step of the backward conversion of an edge whose gradient accumulates over
    #: the micro-batches (:func:`accumulates_grad`; its other conversions count ``edges``)
    grad_copies: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def node(self, name: str) -> int:
        """Copies of node ``name``."""
        return self.nodes.get(name, 1)

    def recompute_share(self, name: str) -> float:
        """Share of node ``name``'s copies whose forward is recomputed."""
        return self.recomputed.get(name, ("", 0.0))[1]

    def edge_recompute_share(self, src: str, dst: str) -> float:
        """Share of an edge's copies converted again: both ends in one recomputed layer."""
        a, b = self.recomputed.get(src), self.recomputed.get(dst)
        return b[1] if a is not None and b is not None and a[0] == b[0] else 0.0

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


#: per-byte conversion matrices by mesh (:meth:`_EdgeCoster._matrices`), shared by the costers
#: of one mesh: a problem's and its recomputation's (:func:`edge_units`); the last
#: _MATRIX_MESHES meshes are kept
_MATRICES: dict[Mesh, dict[tuple, tuple[np.ndarray, ...]]] = {}
_MATRIX_MESHES = 2


def _mesh_matrices(mesh: Mesh) -> dict[tuple, tuple[np.ndarray, ...]]:
    """The shared matrix cache of ``mesh``, made the most recent one."""
    got = _MATRICES.pop(mesh, None)
    _MATRICES[mesh] = got = {} if got is None else got
    while len(_MATRICES) > _MATRIX_MESHES:
        del _MATRICES[next(iter(_MATRICES))]
    return got


class _EdgeCoster:
    """Edge cost and memory matrices. Time is linear in the tensor's bytes plus latency, so each
    edge matrix is costed per unit byte (:func:`~autoddl.engine.reshard_table.unit_matrices`)
    and cached by its placement lists: the identical tensors of repeated layers are costed
    once."""

    def __init__(self, mesh: Mesh, precision: str = "fp32") -> None:
        self.mesh = mesh
        self.precision = precision  # the bytes of a tensor (:func:`tensor_bytes`)
        self.matrices = _mesh_matrices(mesh)  # per byte: shared by the costers of one mesh
        self.keys: dict[tuple, tuple[np.ndarray, list]] = {}  # by signature list (and side)

    def _src_keys(self, ss: list[Signature], accumulates: bool) -> tuple[np.ndarray, list]:
        """Producer keys of a signature list: (output placement, regathered, gradient
        fraction, ZeRO axes)."""
        shape = self.mesh.shape
        key = (id(ss), "src", accumulates)
        if key not in self.keys:
            self.keys[key] = _keys([(s.out, s.zero == ZERO_REGATHER,
                                     grad_fraction(s, shape) if accumulates else 1.0,
                                     zero_axes(s, shape)) for s in ss])
        return self.keys[key]

    def _dst_keys(self, ss: list[Signature], i: int) -> tuple[np.ndarray, list]:
        """Consumer keys of input ``i``: (input placement, gradient placement)."""
        key = (id(ss), "dst", i)
        if key not in self.keys:
            self.keys[key] = _keys([(s.ins[i], s.grads[i]) for s in ss])
        return self.keys[key]

    def _matrices(self, src_vals: list, dst_vals: list) -> tuple[np.ndarray, ...]:
        """Per-byte conversion matrices of these producer and consumer keys (cached)."""
        mkey = (tuple(src_vals), tuple(dst_vals))
        mats = self.matrices.get(mkey)
        if mats is None:
            mats = unit_matrices([v[0] for v in src_vals], dst_vals, self.mesh)
            self.matrices[mkey] = mats
        return mats

    def forward_units(self, graph: OpGraph, sigs: dict[str, list[Signature]], src: str,
                      dst: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(seconds of one forward conversion, bytes of one saved converted copy) of an edge
        whose gradient is not accumulated, per (producer key, consumer key) as
        :meth:`choices` keys it; a ZeRO-3 gather (already run twice) adds nothing."""
        _, src_vals = self._src_keys(sigs[src], False)
        _, dst_vals = self._dst_keys(sigs[dst], i)
        nbytes = tensor_bytes(graph[src].out, self.precision)
        fb, fl, _, _, frac = self._matrices(src_vals, dst_vals)
        kept = 1.0 - np.array([[float(v[1])] for v in src_vals])
        mem = (frac * nbytes * kept if graph[dst].target in SAVES_INPUTS
               else np.zeros(fb.shape))
        return (_per_tensor(fb, nbytes) + fl) * kept, mem

    def choices(self, graph: OpGraph, sigs: dict[str, list[Signature]], index: dict[str, int],
                src: str, dst: str, i: int, copies: int, mem_copies: float = -1.0,
                fwd_times: int = 1, grad_copies: float = -1.0) -> EdgeChoices:
        """The edge's choices; ``grad_copies`` (when >= 0): the copies of the backward
        conversion of the pairs whose gradient accumulates (:func:`accumulates_grad`)."""
        shape = self.mesh.shape
        # a ZeRO-3 parameter is its own producer key: gathered twice, no copy kept; with
        # accumulated gradients, so is a divided gradient's (ZeRO-2)
        src_key, src_vals = self._src_keys(sigs[src], grad_copies >= 0)
        dst_key, dst_vals = self._dst_keys(sigs[dst], i)
        nbytes = tensor_bytes(graph[src].out, self.precision)
        saves = graph[dst].target in SAVES_INPUTS
        fb, fl, bb, bl, frac = self._matrices(src_vals, dst_vals)
        regather = np.array([[float(v[1])] for v in src_vals])
        times = np.maximum(fwd_times, 1 + regather)  # per producer key
        bwd_copies: float | np.ndarray = copies
        if grad_copies >= 0:  # accumulates_grad, for every pair at once
            piece = np.array([np.inf if pg is None else local_fraction(pg, shape)
                              for _, pg in dst_vals])
            whole = np.array([v[2] for v in src_vals])
            bwd_copies = np.where(piece[None, :] <= whole[:, None] * (1 + 1e-9), grad_copies,
                                  copies)
        # gradient sync of a weight: latency per bucket share (grad_sync_share), per consumer
        share = np.array([[grad_sync_share(graph, src, pg, shape) for _, pg in dst_vals]])
        # a forbidden pair is inf in fwd; the backward of a tensor with no gradient is empty
        cost = (copies * times * (_per_tensor(fb, nbytes) + fl)
                + bwd_copies * (_per_tensor(bb, nbytes) + bl * share))
        divided = np.array([v[3] for v in src_vals], bool).reshape(len(src_vals), len(shape))
        if divided.any():  # ZeRO-1/2 only where the gradient is reduced: no axis of the
            # states' division may return a gradient other than P
            not_p = np.array([[pg is not None and g != "P" for g in (pg or ("P",) * len(shape))]
                              for _, pg in dst_vals], bool).reshape(len(dst_vals), len(shape))
            cost = np.where((divided[:, None, :] & not_p[None, :, :]).any(-1), np.inf, cost)
        mem = frac * nbytes * (1 - regather) if saves else np.zeros_like(cost)
        mem_copies = copies if mem_copies < 0 else mem_copies
        return EdgeChoices(index[src], index[dst], src_key, dst_key, cost, mem * mem_copies)


#: signature lists by node and mesh pattern, shared by every mesh of this process (see
#: :func:`_signatures`); cleared when it grows past _SIGNATURES_MAX entries
_SIGNATURES: dict[tuple, list[Signature]] = {}
_SIGNATURES_MAX = 20000


@functools.lru_cache(maxsize=1 << 14)
def _divisibility(shapes: tuple[tuple[int, ...], ...], mesh_shape: tuple[int, ...]) -> tuple:
    """Which axes have size > 1, and per set of axes and tensor dim whether the product of
    the set's sizes divides the dim: all a placement's legality reads of the mesh."""
    subsets = itertools.chain.from_iterable(
        itertools.combinations(range(len(mesh_shape)), r) for r in range(1, len(mesh_shape) + 1))
    products = [math.prod(mesh_shape[a] for a in sub) for sub in subsets]
    return (tuple(size > 1 for size in mesh_shape),
            tuple(tuple(tuple(d % q == 0 for d in shape) for shape in shapes) for q in products))


def _signatures(n, graph: OpGraph, mesh_shape: tuple[int, ...]) -> list[Signature]:
    """:func:`~autoddl.engine.mesh_signatures.signatures`, cached. Identical nodes (those of
    repeated layers) share one list, and so do meshes that agree on which axes have size > 1
    and on which tensor dims the product of the sizes of each set of axes divides (a dim may be
    split on several axes: nested): that is all the legality of a placement reads (order
    marks count axes, not sizes)."""
    tensors = (n.out,) + tuple(graph[i].out for i in n.inputs)
    pattern = _divisibility(tuple(tuple(t.shape) for t in tensors), tuple(mesh_shape))
    key = (n.kind, n.target, n.requires_grad, tensors,
           tuple(graph[i].requires_grad for i in n.inputs), n.args, n.kwargs, pattern)
    got = _SIGNATURES.get(key)
    if got is None:
        if len(_SIGNATURES) >= _SIGNATURES_MAX:
            _SIGNATURES.clear()
        got = _SIGNATURES[key] = signatures(n, graph, mesh_shape)
    return got


def build_problem(graph: OpGraph, mesh: Mesh, cluster: Cluster,
                  config: TrainingConfig = TrainingConfig(),
                  mult: Multiplicity | None = None,
                  sigs: dict[str, list[Signature]] | None = None,
                  objective: str = "step") -> CostedGraph:
    """Signatures and costs of every node and edge of ``graph`` on ``mesh`` (times ``mult``);
    ``sigs`` restricts the signatures (default: every legal one). ``objective`` "bytes": no
    compute and nothing hidden, so that on a mesh whose steps take one second per byte
    (:func:`autoddl.engine.objectives.bytes_mesh`) every cost is bytes sent per device."""
    mult = mult or Multiplicity()
    if sigs is None:
        sigs = {n.name: _signatures(n, graph, mesh.shape) for n in graph.nodes}
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    compute = objective != "bytes"
    nodes = [_node_choices(graph, n, sigs[n.name], mesh, cluster, config, mult, node_cache,
                           compute) for node_cache in [{}] for n in graph.nodes]
    coster = _EdgeCoster(mesh, config.precision)
    edges = [coster.choices(graph, sigs, index, src, dst, i, k,
                            mult.edge_memory(src, dst, i, k), 1,
                            mult.grad_copies.get((src, dst, i), -1.0))
             for src, dst, i, k in mult.all_edges(graph)]
    if cluster.compute.overlap and compute:
        edges = [hide_weight_traffic(e) if graph.nodes[e.src].kind == "param" else e
                 for e in edges]
    problem = ShardingProblem(tuple(nodes), tuple(edges), float(cluster.memory_per_device_bytes),
                              StepShape())
    return CostedGraph(graph, mesh, cluster, config, sigs, problem, index, mult, objective)


def edge_units(costed: CostedGraph) -> "Callable[[str, str, int], tuple[np.ndarray, np.ndarray]]":
    """(src, dst, index) -> :meth:`_EdgeCoster.forward_units` of that edge of ``costed``."""
    coster = _EdgeCoster(costed.mesh, costed.config.precision)
    return lambda src, dst, i: coster.forward_units(costed.graph, costed.sigs, src, dst, i)


def hide_weight_traffic(e: EdgeChoices) -> EdgeChoices:
    """An edge from a weight: its conversions (gradient reduction, ZeRO gathers) depend on no
    activation, so they may run behind compute: all of its cost becomes hidden."""
    finite = np.isfinite(e.cost_s)
    return dataclasses.replace(e, cost_s=np.where(finite, 0.0, np.inf),
                               hidden_s=np.where(finite, e.cost_s, 0.0))


def _node_choices(graph: OpGraph, n, ss: list[Signature], mesh: Mesh, cluster: Cluster,
                  config: TrainingConfig, mult: Multiplicity, cache: dict,
                  compute: bool = True) -> NodeChoices:
    """A node's costs: an op's compute (critical) and its backward (the window that hides
    weight traffic), the loss made whole; a weight's ZeRO start-ups (hidden). Without
    ``compute``, only the collectives (and nothing hidden)."""
    if not ss:
        raise UserError(f"{n.name} ({n.target}) has no legal placement of its inputs and output "
                        f"on mesh {mesh}")
    k_pass = 3.0  # recomputation is priced by the recompute groups
    key = (id(ss), n.kind, n.target, n.flops, n.args, n.out, n.requires_grad,
           n.name == graph.loss, tuple(graph[i].out for i in n.inputs), config)
    if key not in cache:
        fwd = np.array([node_forward_s(graph, n, s, mesh, cluster, config.precision)
                        if compute else 0.0 for s in ss])
        cost = k_pass * fwd
        if n.name == graph.loss:  # the loss value is made whole on every device
            cost = cost + [steps_seconds(loss_steps(graph, s.out, mesh, config.precision), mesh)
                           for s in ss]
        # the operator's own collectives, forward only
        cost = cost + [steps_seconds(op_steps(graph, n, s, mesh), mesh) for s in ss]
        hidden = (np.array([zero_latency_s(s, mesh, n.out.nbytes) for s in ss])
                  if n.kind == "param" else None)
        if hidden is not None and not (cluster.compute.overlap and compute):
            cost, hidden = cost + hidden, None
        cache[key] = (cost, (k_pass - 1.0) * fwd, hidden,
                      np.array([node_memory_bytes(n, s, mesh, config)
                                + stash_bytes(graph, n, s, mesh, cluster, config.precision)
                                for s in ss]))
    cost, window, hidden, mem = cache[key]
    k = mult.node(n.name)
    return NodeChoices(n.name, cost * k, mem * mult.node_memory(n.name), 0,
                       None if hidden is None else hidden * k, window * k)


@dataclass(frozen=True)
class Collective:
    """One predicted collective: which edge (``index`` -1, ``src`` = ``dst``: an operator's
    own collective), which pass, which axis, what kind, how many bytes."""

    src: str
    dst: str
    index: int
    direction: str  # "forward" or "backward"
    axis: str
    kind: str
    bytes_per_device: float
    seconds: float
    copies: int | float = 1  # repeated layers: how many real copies of this edge (run again:
    # recomputed ones count twice)


def _whole(copies: float) -> int | float:
    """A count of copies as an int (recomputed shares are whole copies of a layer's)."""
    return int(round(copies)) if abs(copies - round(copies)) < 1e-9 else copies


def predicted_collectives(costed: CostedGraph, choice: dict[str, Signature]) -> list[Collective]:
    """Every collective step the plan runs in one training step (local steps omitted)."""
    out = []
    mesh = costed.mesh
    mult = costed.mult or Multiplicity()
    for src, dst, i, copies in mult.all_edges(costed.graph):
        sv = choice[dst]
        fwd, bwd = edge_steps(tensor_bytes(costed.graph[src].out, costed.config.precision),
                              choice[src].out, sv.ins[i],
                              sv.grads[i], mesh)
        assert fwd is not None, f"plan converts {src}->{dst} in a forbidden way"
        bwd_copies = copies
        if (src, dst, i) in mult.grad_copies and accumulates_grad(
                grad_fraction(choice[src], mesh.shape), sv.grads[i], mesh.shape):
            bwd_copies = mult.grad_copies[(src, dst, i)]
        share = grad_sync_share(costed.graph, src, sv.grads[i], mesh.shape)
        for direction, steps in (("forward", fwd), ("backward", bwd)):
            for st in steps:
                if st.kind in ("slice", "none"):
                    continue
                n = (_whole(copies * forward_times(choice[src], src, dst, mult))
                     if direction == "forward" else bwd_copies)
                secs = step_seconds(st, mesh, 1.0 if direction == "forward" else share)
                out.append(Collective(src, dst, i, direction, mesh.axes[st.axis].name,
                                      st.kind, st.bytes_per_device, secs, n))
    for n in costed.graph.ops:  # an operator's own collectives (vocabulary-parallel loss)
        times = _whole(mult.node(n.name) * (1.0 + mult.recompute_share(n.name)))
        out += [Collective(n.name, n.name, -1, "forward", mesh.axes[st.axis].name, st.kind,
                           st.bytes_per_device, step_seconds(st, mesh), times)
                for st in op_steps(costed.graph, n, choice[n.name], mesh)]
    for st in loss_steps(costed.graph, choice[costed.graph.loss].out, mesh,
                         costed.config.precision):
        if st.kind not in ("slice", "none"):  # once per loss computed (per micro-batch)
            out.append(Collective(costed.graph.loss, "output", 0, "forward",
                                  mesh.axes[st.axis].name, st.kind, st.bytes_per_device,
                                  step_seconds(st, mesh), mult.node(costed.graph.loss)))
    return out


def plain_indices(costed: CostedGraph, choice: dict[str, Signature]) -> np.ndarray:
    """Signature indices of ``choice`` in ``costed``'s lists, a weight's ZeRO-1 variant (built
    only by the baselines) read as its plain signature: same edges, same node cost."""
    out = []
    for n in costed.graph.nodes:
        s, sigs = choice[n.name], costed.sigs[n.name]
        out.append(sigs.index(s if s in sigs else dataclasses.replace(s, zero=0)))
    return np.array(out, dtype=int)


def choice_indices(costed: CostedGraph, choice: dict[str, Signature]) -> np.ndarray:
    """Each node's signature as its index in ``costed``'s lists (ValueError if not there)."""
    return np.array([costed.sigs[n.name].index(choice[n.name]) for n in costed.graph.nodes])


def step_time_s(costed: CostedGraph, choice: dict[str, Signature],
                counts: Sequence[int] = ()) -> float:
    """The step time of one signature per node (and recomputation ``counts``, the problem's
    defaults if none), as the solver prices it (a choice outside the solver's lists, such as a
    baseline's, is costed on its own)."""
    graph = costed.graph
    if all(choice[n.name] in costed.sigs[n.name] for n in graph.nodes):
        return costed.problem.evaluate(np.append(choice_indices(costed, choice),
                                                 np.asarray(counts, int)))[0]
    return own_problem(costed, choice).evaluate(
        np.append(np.zeros(len(graph.nodes), dtype=int), np.asarray(counts, int)))[0]


def own_problem(costed: CostedGraph, choice: dict[str, Signature]) -> ShardingProblem:
    """The problem of ``choice`` alone (one signature per node, such as a baseline's ZeRO-1
    weights outside the solver's lists), with ``costed``'s step shape and recomputation (whose
    forms read only operators and activations: a weight's ZeRO variant reads as its plain
    signature)."""
    graph = costed.graph
    own = build_problem(graph, costed.mesh, costed.cluster, costed.config, costed.mult,
                        sigs={n.name: [choice[n.name]] for n in graph.nodes}).problem
    groups = ()
    if costed.problem.recompute:
        groups = restrict_groups(costed.problem, plain_indices(costed, choice))
    return dataclasses.replace(own, shape=costed.problem.shape, recompute=groups)


def breakdown(costed: CostedGraph, choice: dict[str, Signature], counts: Sequence[int] = (),
              mult: Multiplicity | None = None) -> dict:
    """Cost and memory of a plan: totals, per mesh axis, per collective kind, per (axis, kind)
    (``per_axis_kind[axis][kind]``: bytes sent per device, seconds, count in one training step),
    per operator, memory parts. ``counts``: the plan's recomputation (the problem's recompute
    groups), ``mult`` the multiplicities that report it
    (:func:`autoddl.engine.recompute.realized`)."""
    mesh, graph = costed.mesh, costed.graph
    if mult is not None:
        costed = dataclasses.replace(costed, mult=mult)
    colls = predicted_collectives(costed, choice)
    per_axis: dict[str, dict[str, float]] = {
        a.name: {"bytes": 0.0, "seconds": 0.0, "count": 0} for a in mesh.axes}
    per_kind: dict[str, dict[str, float]] = defaultdict(lambda: {"bytes": 0.0, "seconds": 0.0,
                                                                 "count": 0})
    # per mesh axis, then per collective kind on it: what the runtime logs and ``--check``
    # compares (:func:`autoddl.runtime.worker.byte_check`)
    per_axis_kind: dict[str, dict[str, dict[str, float]]] = {a.name: {} for a in mesh.axes}
    per_op: dict[str, dict[str, float]] = {}  # by the operator reading the converted tensor
    for c in colls:
        op = c.dst if c.dst != "output" else c.src
        for bucket in (per_axis[c.axis], per_kind[c.kind],
                       per_axis_kind[c.axis].setdefault(c.kind, {"bytes": 0.0, "seconds": 0.0,
                                                                 "count": 0}),
                       per_op.setdefault(op, {"bytes": 0.0, "seconds": 0.0, "count": 0})):
            bucket["bytes"] += c.bytes_per_device * c.copies
            bucket["seconds"] += c.seconds * c.copies
            bucket["count"] += c.copies
    mult = costed.mult or Multiplicity()
    bandwidth_s = sum(c.seconds * c.copies for c in colls) + sum(
        mult.node(n.name) * zero_latency_s(choice[n.name], mesh, n.out.nbytes)
        for n in graph.params)
    hidden_s = (sum(c.seconds * c.copies for c in colls if graph[c.src].kind == "param") + sum(
        mult.node(n.name) * zero_latency_s(choice[n.name], mesh, n.out.nbytes)
        for n in graph.params)
        if costed.cluster.compute.overlap else 0.0)
    compute_s, divided_s = 0.0, 0.0
    for n in graph.ops:
        k = mult.node(n.name) * passes(n.name, mult)
        prec = costed.config.precision
        compute_s += k * node_forward_s(graph, n, choice[n.name], mesh, costed.cluster, prec)
        divided_s += k * _fully_divided_s(graph, n, mesh, costed.cluster, prec)
    step_s = step_time_s(costed, choice, counts)
    mem = {"weights_bytes": 0.0, "activations_bytes": 0.0, "converted_inputs_bytes": 0.0}
    for n in graph.nodes:
        b = (node_memory_bytes(n, choice[n.name], mesh, costed.config)
             + stash_bytes(graph, n, choice[n.name], mesh, costed.cluster,
                           costed.config.precision)) * mult.node_memory(n.name)
        mem["weights_bytes" if n.kind == "param" else "activations_bytes"] += b
    if costed.problem.recompute:  # what recomputation frees, less the layer it keeps live
        full = np.append(np.zeros(len(graph.nodes), dtype=int), np.asarray(counts, int))
        mem["recompute_bytes"] = sum(recompute_terms(own_problem(costed, choice),
                                                     full)[1].values())
    for src, dst, i, copies in mult.all_edges(graph):
        pin = choice[dst].ins[i]
        if keeps_converted(graph, choice[src], dst, pin):
            mem["converted_inputs_bytes"] += (mult.edge_memory(src, dst, i, copies)
                                              * tensor_bytes(graph[src].out,
                                                             costed.config.precision)
                                              * local_fraction(pin, mesh.shape))
    mem["per_device_bytes"] = sum(mem.values())
    mem["capacity_bytes"] = float(costed.cluster.memory_per_device_bytes)
    return {
        "total_s": step_s,  # what the solver minimized: the step time
        "bandwidth_s": bandwidth_s,
        "redundant_compute_s": max(compute_s - divided_s, 0.0),
        "compute_s": compute_s,
        "hidden_comm_s": hidden_s,
        "exposed_comm_s": max(step_s - (compute_s + bandwidth_s - hidden_s), 0.0),
        "step_time_s": step_s,
        "bytes_per_device": sum(c.bytes_per_device * c.copies for c in colls),
        "per_axis": per_axis,
        "per_kind": dict(sorted(per_kind.items())),
        "per_axis_kind": {a: dict(sorted(k.items())) for a, k in per_axis_kind.items()},
        "per_op": per_op,
        "memory": mem,
    }
