"""Execute a captured graph on local shards, exactly as planned.

Every tensor lives as one device's *local* piece plus the placement the plan gave it. For each
edge the executor converts the producer's piece to the placement the consumer's signature reads
(:func:`autoddl.engine.placements.reshard_steps`, one mesh axis at a time, through DTensor's
redistribute), runs the ATen operator on local pieces, and declares the planned output placement.
A dim nested in an order other than the default (``S(d)^k``) is DTensor's ``_StridedShard``
(:func:`to_dtensor_placements`): each step acts on the innermost split of its dims, which DTensor
redistributes between such specs with the one collective the step names (gloo and NCCL alike;
an all-to-all the runtime runs itself, on the local pieces), and parameters are held and
updated as such DTensors.
The conversion is an autograd function whose backward runs the gradient's planned steps (the
consumer's gradient placement back to the producer's), so forward *and* backward move exactly the
bytes the cost model predicted. DTensor's own sharding propagation is never used: a legal
signature makes local execution correct by construction.

Local execution needs four adjustments, flagged by the rules (:mod:`autoddl.engine.rules`):
masked additive inputs (only coordinate 0 of an axis adds a bias under a ``P`` output), means over
a split dim (scaled by 1/axis size), row-split embedding tables (look up owned rows only), and a
cross-entropy of logits split by vocabulary, computed vocabulary-parallel
(:mod:`autoddl.runtime.vocab_loss`) with its all-reduces logged like every conversion's.
Arguments that carry global sizes (view, reshape, expand) get the local sizes.

ZeRO-3 parameters (signature ``zero`` = ``ZERO_REGATHER``): the consumer runs, together with the
gathering of such parameters, under activation checkpointing, so the gathered weight is not kept
for backward; backward gathers it again (the forward steps run twice, as the cost model charges)
and then reduces its gradient. Inside a recomputed layer the layer's own recomputation is that
second gather. Recomputed layers (``training.recompute_layers``) run under activation
checkpointing: a full one as one region, a selective one its attention op; a region's inputs are
converted before it and kept, the conversions inside it run again in backward. ZeRO-1/2 weights run as data parallel ones (the all-reduce moves their
reduce-scatter + all-gather's bytes); the optimizer here keeps their states whole.

Mixed precision (a plan costed in ``bf16``, :mod:`autoddl.engine.precision`): the parameters stay
fp32 (the master weights the optimizer updates); each is cast to bf16 as it is read, and so are
float user inputs and constants, and every float operator output is bf16 (an operator that makes
fp32, e.g. an explicit upcast, is cast back). So activations and weights cross the wire in bf16,
gradients are produced and reduced in bf16 and reach the fp32 master weights through the
casts' backward, converted to fp32 only after their reduction: the bytes the plan predicts.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from autoddl.engine.graph import OpGraph
from autoddl.engine.placements import (
    Placement, Step, grad_target, local_shape, reshard_steps, split_dim, strided_factor,
)
from autoddl.engine.plan import Plan
from autoddl.engine.precision import plan_precision
from autoddl.engine.recompute import ATTENTION
from autoddl.engine.repeat import find_blocks
from autoddl.engine.mesh_signatures import signatures
from autoddl.engine.rules import ZERO_GRADS, ZERO_NONE, ZERO_REGATHER, ZERO_STATES, Signature
from autoddl.runtime.commlog import CollectiveRecorder, CommLog
from autoddl.runtime.vocab_loss import vocab_parallel_cross_entropy

__all__ = ["CommLog", "Converter", "ShardedExecutor", "to_dtensor_placements"]

_SIZE_ARG_OPS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                 "aten.expand.default"}


def to_dtensor_placements(placement: Placement, mesh_shape: Sequence[int]) -> list:
    """autoddl placement strings as DTensor placements on a mesh of ``mesh_shape``: a split
    nested inside higher-indexed axes (an order mark, :mod:`autoddl.engine.placements`) is
    DTensor's ``_StridedShard`` whose split factor is the product of those axes' sizes."""
    out = []
    for axis, p in enumerate(placement):
        if p == "B":
            out.append(Replicate())
        elif p == "P":
            out.append(Partial())
        else:
            factor = strided_factor(placement, axis, mesh_shape)
            out.append(Shard(split_dim(p)) if factor == 1
                       else _StridedShard(split_dim(p), split_factor=factor))
    return out


class Converter:
    """Runs the steps of a placement conversion on local tensors of one mesh, logging every
    collective torch runs meanwhile (:class:`~autoddl.runtime.commlog.CollectiveRecorder`)."""

    def __init__(self, mesh: DeviceMesh, axis_names: Sequence[str], log: CommLog) -> None:
        self.mesh = mesh
        self.names = list(axis_names)
        self.shape = tuple(mesh.shape)
        self.log = log
        self.groups = {mesh.get_group(a).group_name: (self.names[a], self.shape[a])
                       for a in range(len(self.shape)) if self.shape[a] > 1}

    def run(self, local: torch.Tensor, src: Placement, steps: list[Step],
            global_shape: Sequence[int]) -> torch.Tensor:
        """Apply ``steps`` (from placement ``src``) to the local piece ``local``."""
        if not steps:
            return local
        with CollectiveRecorder(self.log, self.groups):
            return self._run(local, src, steps, global_shape)

    def _run(self, local: torch.Tensor, src: Placement, steps: list[Step],
             global_shape: Sequence[int]) -> torch.Tensor:
        cur = list(src)
        stride = torch.empty(global_shape, device="meta").stride()
        for st in steps:
            nxt = list(cur)
            nxt[st.axis] = st.dst
            if st.kind == "all_to_all":
                local = self._all_to_all(local, st.axis, split_dim(cur[st.axis]),
                                         split_dim(st.dst))
            else:
                d = DTensor.from_local(local.contiguous(), self.mesh,
                                       to_dtensor_placements(tuple(cur), self.shape),
                                       run_check=False, shape=torch.Size(global_shape),
                                       stride=stride)
                local = d.redistribute(
                    self.mesh, to_dtensor_placements(tuple(nxt), self.shape)).to_local()
            cur = nxt
        return local

    def _all_to_all(self, local: torch.Tensor, axis: int, src_dim: int,
                    dst_dim: int) -> torch.Tensor:
        """S(src_dim) -> S(dst_dim) on one axis with one all-to-all: device k of the axis sends
        its piece's k-th chunk along ``dst_dim`` to device k and joins what it receives along
        ``src_dim``. (DTensor's own redistribute falls back to an all-gather on gloo, which
        moves p times the bytes.) Correct for the clean steps
        :func:`~autoddl.engine.placements.reshard_steps` makes: no axis after ``axis`` splits
        ``src_dim`` or ``dst_dim`` (axes before it may: nested splits), so the devices of the
        axis share one outer piece, hold consecutive sub-chunks of it along ``src_dim`` and the
        same extent along ``dst_dim``."""
        p = self.shape[axis]
        chunks = [c.contiguous() for c in local.chunk(p, dim=dst_dim)]
        send = torch.cat([c.reshape(-1) for c in chunks])
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.mesh.get_group(axis))
        pieces = [r.reshape(chunks[0].shape) for r in recv.chunk(p)]
        return torch.cat(pieces, dim=src_dim)


class _Reshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv, src, fwd, gsrc, bwd, shape):  # type: ignore[override]
        ctx.conv, ctx.gsrc, ctx.bwd, ctx.shape = conv, gsrc, bwd, shape
        conv.log.direction = "forward"
        return conv.run(x, src, fwd, shape)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        ctx.conv.log.direction = "backward"
        out = ctx.conv.run(g, ctx.gsrc, ctx.bwd, ctx.shape)
        return out, None, None, None, None, None, None


def compute_dtype(plan: Plan) -> torch.dtype | None:
    """The dtype float tensors are computed and sent in under the plan's precision: bfloat16
    under bf16, None (each as captured) under fp32."""
    return torch.bfloat16 if plan_precision(plan.training) == "bf16" else None


def find_signature(graph: OpGraph, name: str, plan: Plan, mesh_shape) -> Signature:
    """The rule signature matching the plan's placements for node ``name``."""
    op = plan.op(name)
    names = plan.axis_names
    out = tuple(op.out[a] for a in names)
    ins = tuple(tuple(i[a] for a in names) for i in op.ins)
    # ZeRO-1/2 move the all-reduce's bytes: run as such (their optimizer states stay whole here)
    zero = ZERO_NONE if op.zero in (ZERO_STATES, ZERO_GRADS) else op.zero
    for s in signatures(graph[name], graph, mesh_shape):
        if s.out == out and s.ins == ins and s.zero == zero:
            return s
    raise ValueError(f"plan gives {name} placements {ins} -> {out}, which no rule allows")


class ShardedExecutor:
    """Holds the planned local parameters and runs forward (and, via autograd, backward).

    ``nodes`` (names) restricts the executor to a subset of the graph — one pipeline stage: it
    then holds only those parameters and :meth:`run_ops` runs only those operators, reading any
    tensor produced outside the subset (a stage's boundary input) from the environment as the
    producer's local piece in the producer's planned output placement.
    """

    def __init__(self, ep: torch.export.ExportedProgram, graph: OpGraph, plan: Plan,
                 mesh: DeviceMesh, params: dict[str, torch.Tensor],
                 nodes: Iterable[str] | None = None) -> None:
        self.ep, self.graph, self.plan, self.mesh = ep, graph, plan, mesh
        self.mesh_shape = tuple(mesh.shape)
        self.dtype = compute_dtype(plan)
        self.log = CommLog()
        self.conv = Converter(mesh, plan.axis_names, self.log)
        self.nodes = [n.name for n in graph.nodes] if nodes is None else list(nodes)
        members = set(self.nodes)
        need = members | {i for name in self.nodes for i in graph[name].inputs}
        self.sigs = {n.name: find_signature(graph, n.name, plan, self.mesh_shape)
                     for n in graph.nodes if n.name in need}
        self.ops = [n for n in graph.ops if n.name in members]
        self._fx = {fx.name: fx for fx in ep.graph.nodes}
        self.params: dict[str, torch.nn.Parameter] = {}
        for n in graph.params:
            if n.name not in members:
                continue
            full = params[n.fqn].detach().clone()  # never share storage with the caller's
            dt = distribute_tensor(full, mesh, to_dtensor_placements(self.sigs[n.name].out,
                                                                     self.mesh_shape),
                                   src_data_rank=None)
            self.params[n.fqn] = torch.nn.Parameter(dt, requires_grad=n.requires_grad)

    def _edge(self, src: str, dst: str, i: int, local: torch.Tensor) -> torch.Tensor:
        s_src, s_dst = self.sigs[src], self.sigs[dst]
        meta = self.graph[src].out
        src_pl, in_pl, g_pl = s_src.out, s_dst.ins[i], s_dst.grads[i]
        fwd = reshard_steps(src_pl, in_pl, meta.nbytes, self.mesh_shape)
        assert fwd is not None
        if g_pl is None or not local.requires_grad:
            with torch.no_grad():
                return self.conv.run(local, src_pl, fwd, meta.shape)
        gsrc = tuple(grad_target(p) for p in src_pl)
        bwd = reshard_steps(g_pl, gsrc, meta.nbytes, self.mesh_shape)
        if not fwd and not bwd:
            return local
        return _Reshard.apply(local, self.conv, src_pl, fwd, g_pl, bwd, meta.shape)

    def local_input(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This device's piece of a user input under its planned placement."""
        return self.cast(distribute_tensor(
            full, self.mesh, to_dtensor_placements(self.sigs[name].out, self.mesh_shape),
            src_data_rank=None).to_local())

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the plan's compute dtype when it is a float tensor (bf16 plans; autograd
        casts its gradient back), else ``t``."""
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t

    def param_locals(self) -> dict[str, torch.Tensor]:
        """Node name -> local piece of each held parameter (autograd flows to the DTensor)."""
        return {n.name: self.cast(self.params[n.fqn].to_local()) for n in self.graph.params
                if n.fqn in self.params}

    def run_ops(self, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run this executor's operators in graph order on local pieces, adding their outputs to
        ``env`` (which must hold the local piece of every tensor they read). Layers the plan
        recomputes run under activation checkpointing (:meth:`_run_checkpointed`): a full
        layer as one region, a selective one its attention alone."""
        for region, group in self._regions():
            if region is None:
                for n in group:
                    self._run_node(n, env)
            else:
                self._run_checkpointed(group, env)
        return env

    def _layer_modes(self) -> dict[str, str]:
        """Op name -> its layer's recomputation ("full", "selective"), for recomputed layers:
        ``training.recompute_layers`` per repeated block (plans before it: "layers" = full)."""
        training = self.plan.training
        per_layer = training.get("recompute_layers")
        blocks = find_blocks(self.graph)
        if blocks is None:
            return {}
        if per_layer is None:
            per_layer = ["full" if training.get("recompute") == "layers" else "none"] * \
                blocks.count
        assert len(per_layer) == blocks.count, "plan checked against the graph"
        return {name: mode for mode, members in zip(per_layer, blocks.members)
                for name in members if mode != "none"}

    def _regions(self) -> list[tuple[tuple | None, list]]:
        """This executor's ops in runs: (None, ops run plainly) or (region key, ops of one
        checkpointed region: a fully recomputed layer, or one attention op)."""
        modes = self._layer_modes()
        blocks = find_blocks(self.graph) if modes else None
        layer = ({nm: b for b, members in enumerate(blocks.members) for nm in members}
                 if blocks else {})
        regions: list[tuple[tuple | None, list]] = []
        for n in self.ops:
            mode = modes.get(n.name)
            key: tuple | None = None
            if mode == "full":
                key = ("full", layer[n.name])
            elif mode == "selective" and n.target == ATTENTION:
                key = ("selective", n.name)
            if regions and regions[-1][0] == key:
                regions[-1][1].append(n)
            else:
                regions.append((key, [n]))
        return regions

    def _run_checkpointed(self, group: list, env: dict[str, torch.Tensor]) -> None:
        """Run ``group`` under activation checkpointing: its inputs from outside are converted
        once, before it (ZeRO-3 weights excepted: their gather is redone, as backward needs), and
        kept; its forward, the conversions between its ops included, runs again in backward
        (:mod:`autoddl.engine.recompute` prices exactly this)."""
        names = {n.name for n in group}
        pre_keys: list[tuple[str, int]] = []
        pre_vals: list[torch.Tensor] = []
        raw: list[str] = []
        for n in group:
            for i, src in enumerate(n.inputs):
                if src in names:
                    continue
                if self.sigs[src].zero == ZERO_REGATHER:
                    if src not in raw:
                        raw.append(src)
                    continue
                pre_keys.append((n.name, i))
                pre_vals.append(self._edge(src, n.name, i, env[src]))
        used_after = {i for n in self.graph.nodes if n.name not in names for i in n.inputs}
        outs = [n.name for n in group if n.name in used_after or n.name == self.graph.loss]

        def block(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            pre = dict(zip(pre_keys, tensors))
            local_env = dict(zip(raw, tensors[len(pre_keys):]))
            for n in group:
                self._run_node(n, local_env, recomputed=True,
                               pre={i: pre[(n.name, i)] for i in range(len(n.inputs))
                                    if (n.name, i) in pre})
            return tuple(local_env[o] for o in outs)

        # the whole region runs again in backward, as the cost model counts it (torch would
        # otherwise stop once the saved tensors are back, skipping trailing collectives)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            results = torch.utils.checkpoint.checkpoint(
                block, *pre_vals, *[env[r] for r in raw], use_reentrant=False)
        env.update(zip(outs, results))

    def _run_node(self, n, env: dict[str, torch.Tensor], recomputed: bool = False,
                  pre: dict[int, torch.Tensor] | None = None) -> None:
        pre = pre or {}
        again = [] if recomputed else [
            i for i, src in enumerate(n.inputs)
            if self.sigs[src].zero == ZERO_REGATHER
            and self.sigs[src].out != self.sigs[n.name].ins[i] and env[src].requires_grad]
        if not again:
            locals_ = [pre[i] if i in pre else self._edge(src, n.name, i, env[src])
                       for i, src in enumerate(n.inputs)]
            env[n.name] = self._run_op(n, self._fx[n.name], locals_)
            return
        # ZeRO-3: gather the weight and run the op without keeping the gathered copy; backward
        # recomputes both (the gather runs again), then reduce-scatters the gradient
        rest = {i: self._edge(src, n.name, i, env[src]) for i, src in enumerate(n.inputs)
                if i not in again}

        def gather_and_run(*weights: torch.Tensor) -> torch.Tensor:
            locals_ = dict(rest)
            for i, w in zip(again, weights):
                locals_[i] = self._edge(n.inputs[i], n.name, i, w)
            return self._run_op(n, self._fx[n.name], [locals_[i] for i in range(len(n.inputs))])

        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            env[n.name] = torch.utils.checkpoint.checkpoint(
                gather_and_run, *[env[n.inputs[i]] for i in again], use_reentrant=False)

    def loss_value(self, local: torch.Tensor) -> torch.Tensor:
        """The loss made whole on every device from its local piece (planned collectives)."""
        return self._edge_to_replicated(self.graph.loss, local)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph; returns (loss local piece, loss value replicated everywhere)."""
        env: dict[str, torch.Tensor] = self.param_locals()
        for n in self.graph.nodes:
            if n.kind == "input":
                env[n.name] = self.local_input(n.name, inputs[n.name])
        self.run_ops(env)
        loss = self.graph.loss
        return env[loss], self.loss_value(env[loss])

    def _edge_to_replicated(self, name: str, local: torch.Tensor) -> torch.Tensor:
        src = self.sigs[name].out
        dst = ("B",) * len(src)
        meta = self.graph[name].out
        fwd = reshard_steps(src, dst, meta.nbytes, self.mesh_shape)
        if not fwd:
            return local
        return _Reshard.apply(local, self.conv, src, fwd, dst, [], meta.shape)

    def _run_op(self, node, fx, locals_: list[torch.Tensor]) -> torch.Tensor:
        sig = self.sigs[node.name]
        for axis, asig in enumerate(sig.axes):
            if self.mesh_shape[axis] > 1 and asig.masked and self.mesh.get_local_rank(axis) != 0:
                for j in asig.masked:
                    locals_[j] = locals_[j] * 0.0
        index = {a.name: k for k, a in enumerate(fx.all_input_nodes)}

        def sub(v: Any) -> Any:
            if isinstance(v, torch.fx.Node):
                return locals_[index[v.name]]
            if isinstance(v, (list, tuple)):
                return type(v)(sub(x) for x in v)
            return v

        args, kwargs = sub(fx.args), {k: sub(v) for k, v in fx.kwargs.items()}
        if node.target in _SIZE_ARG_OPS:
            args = (args[0], list(local_shape(node.out.shape, sig.out, self.mesh_shape)),
                    *args[2:])
        elif node.target == "aten.unflatten.int":  # sizes of the unflattened dims, local
            dim = int(args[1]) % locals_[0].dim()
            local = local_shape(node.out.shape, sig.out, self.mesh_shape)
            args = (args[0], args[1], list(local[dim: dim + len(args[2])]), *args[3:])
        vocab_axes = [a for a, s in enumerate(sig.axes) if s.vocab and self.mesh_shape[a] > 1]
        loss_axes = [a for a, s in enumerate(sig.axes)
                     if s.vocab_parallel and self.mesh_shape[a] > 1]
        if vocab_axes:
            out = self._vocab_embedding(args, vocab_axes[0])
        elif loss_axes:
            out = self._vocab_parallel_loss(node, args, loss_axes[0])
        else:
            out = fx.target(*args, **kwargs)
        for axis, asig in enumerate(sig.axes):
            if asig.scale and self.mesh_shape[axis] > 1:
                out = out / self.mesh_shape[axis]
        out = self.cast(out)
        want = local_shape(node.out.shape, sig.out, self.mesh_shape)
        assert tuple(out.shape) == want, f"{node.name}: local shape {tuple(out.shape)} != {want}"
        return out

    def _vocab_embedding(self, args, axis: int) -> torch.Tensor:
        """A lookup in this rank's rows of a row-split table (zero for the others); a padding
        row (``padding_idx``, BERT's) gets no gradient on the rank that owns it."""
        weight, idx = args[0], args[1]
        rows = weight.shape[0]
        offset = self.mesh.get_local_rank(axis) * rows
        shifted = idx - offset
        valid = (shifted >= 0) & (shifted < rows)
        pad = int(args[2]) - offset if len(args) > 2 and int(args[2]) >= 0 else -1
        out = torch.ops.aten.embedding(weight, shifted.clamp(0, rows - 1),
                                       pad if 0 <= pad < rows else -1)
        return out * valid.unsqueeze(-1).to(out.dtype)

    def _vocab_parallel_loss(self, node, args, axis: int) -> torch.Tensor:
        """The cross-entropy of logits split by vocabulary on ``axis``, computed there
        (:func:`~autoddl.runtime.vocab_loss.vocab_parallel_cross_entropy`); its all-reduces are
        logged under that axis, forward."""
        logits, target = args[0], args[1]
        start = self.mesh.get_local_rank(axis) * logits.shape[1]
        reduction = "mean" if node.arg(3, "reduction", 1) == 1 else "sum"
        self.log.direction = "forward"
        with CollectiveRecorder(self.log, self.conv.groups):
            return vocab_parallel_cross_entropy(logits, target, self.mesh.get_group(axis), start,
                                                reduction, int(node.arg(4, "ignore_index", -100)))

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's gradient gathered whole (collective: all ranks must call)."""
        out = {}
        for fqn, p in self.params.items():
            if p.grad is not None:
                out[fqn] = p.grad.full_tensor()
        return out

    def full_params(self) -> dict[str, torch.Tensor]:
        """Every parameter gathered whole (collective: all ranks must call)."""
        return {fqn: p.detach().full_tensor() for fqn, p in self.params.items()}

