"""Run a pipelined plan: one stage per rank group, scheduled by ``torch.distributed.pipelining``.

An interleaved plan (``pipeline.interleave`` = v > 1, Megatron's virtual stages) cuts the model
into C = v·K chunks (an op's ``stage`` is its chunk) and rank ``k`` of the pipeline runs chunks
k, k+K, k+2K, ... under ``ScheduleInterleaved1F1B`` (1F1B only); below,
"stage" then reads "chunk": boundaries, relays and accumulated weight gradients are per chunk,
each chunk with its own executor, the rank's chunks sharing one log.

The device mesh is ``(pp=K, *stage mesh)``. Rank ``r`` belongs to stage ``k`` (its ``pp``
coordinate) and runs that stage's nodes op by op on the stage sub-mesh with the same planned
resharding as the unpipelined runtime (:class:`~autoddl.runtime.execute.ShardedExecutor`,
restricted to the stage's nodes). The ranks with the same stage-mesh coordinate form one
pipeline group (the ``pp`` axis's process group); ``PipelineStage`` and the schedule run per
group, so the ranks of a stage run the same schedule and meet in their collectives together.

What crosses a boundary is the producer's *local piece* in the producer's planned output
placement; every stage has the same stage-mesh shape, so the piece is valid on the next stage's
device with the same stage-mesh coordinate. Boundary ``k -> k+1`` carries every tensor made in a
stage ``<= k`` and read in a stage ``> k``, in graph order: a tensor whose readers are two or
more stages ahead is relayed through the stages in between (sent once per boundary). User inputs
are made in stage 0 (the int64 targets of a language model are relayed to the loss). A relayed
tensor's gradient is the sum of its readers' gradients, in the producer's gradient placement
(``grad_target`` of its output placement) — what the unpipelined executor's edge backward
produces — so it crosses each boundary once backward too. Tensors that carry no gradient (int
targets, float targets, inputs) are declared ``requires_grad=False`` to the stage, which then
allocates no gradient buffer and sends nothing back for them.

The last stage returns the loss made whole on its stage mesh (the planned scalar collective);
the schedule's ``loss_fn`` returns that output as is. The full-batch loss is the mean of the m
micro-batch losses (equal micro-batches, mean-reduced losses); the schedule accumulates each
micro-batch's gradients and, with ``scale_grads=True`` (torch 2.13's default), divides every
stage parameter's gradient by m after the last backward (``PipelineStage.scale_grads``), which
gives exactly the gradient of that mean.

Weight gradients accumulated over the micro-batches (:func:`autoddl.engine.costs.accumulates_grad`,
as the cost model counts them): the edge from such a weight to its reader converts forward as
planned, but its backward only adds the reader's gradient, in the placement the reader returns it
in (e.g. a ``P`` partial sum of a ``B`` weight), to a sum for the step. After the schedule's last
backward the stage runs each sum's planned backward steps once (the all-reduce, ...), divides by
m as the schedule divides the other gradients, and writes the weight's gradient. The steps are
linear, so this equals converting each micro-batch's gradient and summing.

Stages are built in the library's *static* metadata mode (``input_args``/``output_args`` given as
local-shape plain tensors): no metadata-inference forward runs, so the only collectives in a step
are the planned ones.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
)

from autoddl.engine.costs import accumulated_edges, accumulates_grad, grad_fraction
from autoddl.engine.graph import OpGraph, TensorMeta
from autoddl.engine.placements import grad_target, local_shape, reshard_steps
from autoddl.engine.plan import Plan
from autoddl.engine.precision import plan_precision, tensor_bytes
from autoddl.errors import UserError
from autoddl.runtime.commlog import CommLog
from autoddl.runtime.execute import ShardedExecutor, to_dtensor_placements

P2P = "p2p"
SCHEDULES = {"1F1B": Schedule1F1B, "GPIPE": ScheduleGPipe}


def stage_of(plan: Plan) -> dict[str, int]:
    """Node name -> pipeline stage."""
    return {o.name: o.stage for o in plan.ops}


def check_stages(graph: OpGraph, plan: Plan) -> None:
    """The stage rules the runtime relies on (raises :class:`UserError` when one fails)."""
    k_of, k_max = stage_of(plan), plan.num_chunks - 1
    bad: list[str] = []
    for n in graph.nodes:
        k = k_of[n.name]
        if not 0 <= k <= k_max:
            bad.append(f"{n.name} in stage {k} of {k_max + 1}")
        for src in n.inputs:
            if k_of[src] > k:
                bad.append(f"{src} (stage {k_of[src]}) feeds {n.name} (stage {k})")
            if graph[src].kind == "param" and k_of[src] != k:
                bad.append(f"parameter {src} (stage {k_of[src]}) is read in stage {k}")
        if n.kind == "input" and k != 0:
            bad.append(f"input {n.name} in stage {k}, not 0")
    if k_of[graph.loss] != k_max:
        bad.append(f"loss {graph.loss} in stage {k_of[graph.loss]}, not {k_max}")
    empty = [k for k in range(k_max + 1) if not any(k_of[n.name] == k for n in graph.ops)]
    if empty:
        bad.append(f"stage(s) {empty} have no operator")
    if bad:
        raise UserError("plan's pipeline stages break the stage rules: " + "; ".join(bad[:5]))


def boundary_tensors(graph: OpGraph, plan: Plan) -> list[list[str]]:
    """For each boundary ``k -> k+1`` (k = 0..C-2 over the C = v·K model chunks; chunks are the
    stages when v = 1), the tensors crossing it, in graph order: made in a chunk ``<= k`` and
    read in a chunk ``> k``."""
    k_of = stage_of(plan)
    last_reader: dict[str, int] = {}
    for n in graph.nodes:
        for src in n.inputs:
            last_reader[src] = max(last_reader.get(src, -1), k_of[n.name])
    return [[n.name for n in graph.nodes
             if k_of[n.name] <= k < last_reader.get(n.name, -1)]
            for k in range(plan.num_chunks - 1)]


def piece_bytes(meta: TensorMeta, placement, mesh_shape, precision: str = "fp32") -> int:
    """Bytes of one device's local piece of ``meta`` under ``placement``, in ``precision``."""
    n = 1
    for s in local_shape(meta.shape, placement, mesh_shape):
        n *= s
    return n * tensor_bytes(meta, precision) // max(meta.numel, 1)


def p2p_per_step(graph: OpGraph, plan: Plan) -> dict[str, float]:
    """Point-to-point sends one step makes, summed over the boundaries, per device of the stage
    mesh: one per tensor per boundary per micro-batch forward, and one more backward for a tensor
    that carries a gradient; bytes = the sender's local piece."""
    count, nbytes = 0, 0.0
    for names in boundary_tensors(graph, plan):
        for name in names:
            node = graph[name]
            pl = tuple(plan.op(name).out[a] for a in plan.axis_names)
            sends = 1 + int(node.requires_grad)
            count += sends
            nbytes += sends * piece_bytes(node.out, pl, plan.mesh_shape,
                                          plan_precision(plan.training))
    m = plan.num_microbatches
    return {"count": m * count, "bytes": m * nbytes}


def _placement(plan: Plan, name: str) -> tuple[str, ...]:
    return tuple(plan.op(name).out[a] for a in plan.axis_names)


def _torch_dtype(meta: TensorMeta, precision: str = "fp32") -> torch.dtype:
    """The dtype a tensor crosses a boundary in: bf16 for a float tensor of a bf16 plan."""
    if precision == "bf16" and meta.is_float:
        return torch.bfloat16
    return getattr(torch, meta.dtype)


class _BoundaryGrad(torch.autograd.Function):
    """Identity on a received boundary tensor; its backward is the gradient sent back."""

    @staticmethod
    def forward(ctx, x, log, axis, nbytes):  # type: ignore[override]
        ctx.log, ctx.axis, ctx.nbytes = log, axis, nbytes
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        ctx.log.add(ctx.axis, P2P, ctx.nbytes, direction="backward")
        return g.contiguous(), None, None, None


class _Accumulate(torch.autograd.Function):
    """A weight's edge whose gradient accumulates: forward converts as planned; backward adds the
    reader's gradient, unconverted, to the step's sum for the edge (and sends nothing on)."""

    @staticmethod
    def forward(ctx, x, conv, src, fwd, shape, sums, key):  # type: ignore[override]
        ctx.sums, ctx.key = sums, key
        conv.log.direction = "forward"
        return conv.run(x, src, fwd, shape)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        total = ctx.sums.get(ctx.key)
        ctx.sums[ctx.key] = g.detach().clone() if total is None else total.add_(g)
        return None, None, None, None, None, None, None


class StageExecutor(ShardedExecutor):
    """A stage's executor that accumulates weight gradients over the step's micro-batches and
    converts them once (:meth:`apply_accumulated`), as the cost model counts them."""

    def __init__(self, *args: Any, log: CommLog | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if log is not None:  # one log for the chunks of a rank
            self.log = self.conv.log = log
        shape, members = self.mesh_shape, set(self.nodes)
        #: edges (graph order) whose gradient is summed, with their backward steps
        self.accumulating: dict[tuple[str, str, int], list] = {}
        for src, dst, i in accumulated_edges(self.graph):
            if dst not in members:
                continue
            grad = self.sigs[dst].grads[i]
            if not accumulates_grad(grad_fraction(self.sigs[src], shape), grad, shape):
                continue
            target = tuple(grad_target(p) for p in self.sigs[src].out)
            steps = reshard_steps(grad, target, self.graph[src].out.nbytes, shape)
            if steps:
                self.accumulating[(src, dst, i)] = steps
        self.sums: dict[tuple[str, str, int], torch.Tensor] = {}

    def _edge(self, src: str, dst: str, i: int, local: torch.Tensor) -> torch.Tensor:
        if (src, dst, i) not in self.accumulating or not local.requires_grad:
            return super()._edge(src, dst, i, local)
        meta, src_pl = self.graph[src].out, self.sigs[src].out
        fwd = reshard_steps(src_pl, self.sigs[dst].ins[i], meta.nbytes, self.mesh_shape)
        assert fwd is not None
        return _Accumulate.apply(local, self.conv, src_pl, fwd, meta.shape, self.sums,
                                 (src, dst, i))

    def apply_accumulated(self, microbatches: int) -> None:
        """Convert each accumulated sum by its planned backward steps, once, divide it by the
        micro-batch count (as the schedule scales the other gradients) and add it to its
        weight's gradient. Collective: every rank of the stage mesh calls it, in graph order."""
        self.log.direction = "backward"
        for (src, dst, i), steps in self.accumulating.items():
            total = self.sums.pop((src, dst, i), None)
            if total is None:
                continue
            meta, grad_pl = self.graph[src].out, self.sigs[dst].grads[i]
            param = self.params[self.graph[src].fqn]
            # reduced in the compute dtype; the fp32 master weight's gradient after
            local = self.conv.run(total, grad_pl, steps, meta.shape).to(param.dtype) / microbatches
            target = tuple(grad_target(p) for p in self.sigs[src].out)
            grad = DTensor.from_local(local, self.mesh,
                                      to_dtensor_placements(target, self.mesh_shape),
                                      run_check=False, shape=param.shape, stride=param.stride())
            param.grad = grad if param.grad is None else param.grad + grad
        assert not self.sums, f"gradient sums of edges not planned to accumulate: {list(self.sums)}"


class StageModule(torch.nn.Module):
    """One pipeline stage's nodes, run op by op on local pieces as planned.

    Stage 0 takes the user inputs (one micro-batch, whole); later stages take the local pieces
    crossing the boundary before them. Non-last stages return the local pieces crossing the
    boundary after them; the last stage returns the loss, whole on every device of its mesh.
    """

    def __init__(self, ex: ShardedExecutor, plan: Plan, stage: int, inputs: list[str],
                 outputs: list[str], constants: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.constants = constants or {}  # stage 0: const leaves, whole (not micro-batched)
        self.ex, self.graph, self.plan = ex, ex.graph, plan
        self.stage, self.inputs, self.outputs = stage, inputs, outputs
        self.is_first, self.is_last = stage == 0, stage == plan.num_chunks - 1
        self.axis = plan.pipeline["axis"]["name"]
        # registered so that the schedule's scale_grads and the optimizer see them
        self.stage_params = torch.nn.ParameterList(ex.params.values())
        shape = plan.mesh_shape
        precision = plan_precision(plan.training)
        self._bytes = {n: piece_bytes(self.graph[n].out, _placement(plan, n), shape, precision)
                       for n in set(inputs) | set(outputs)}

    def __call__(self, *args: torch.Tensor) -> Any:
        # No module hooks: CommDebugMode's module tracker (torch 2.13) adds a forward hook on
        # every call of a module and then pops its parent list once per hook, so a module called
        # twice inside one CommDebugMode (once per micro-batch) fails with an IndexError.
        return self.forward(*args)

    def forward(self, *args: torch.Tensor) -> Any:
        ex, log = self.ex, self.ex.log
        env = ex.param_locals()
        for name, t in self.constants.items():
            env[name] = ex.local_input(name, t)
        for name, t in zip(self.inputs, args, strict=True):
            if self.is_first:
                env[name] = ex.local_input(name, t)
            elif t.requires_grad:
                env[name] = _BoundaryGrad.apply(t, log, self.axis, self._bytes[name])
            else:
                env[name] = t
        ex.run_ops(env)
        if self.is_last:
            return ex.loss_value(env[self.graph.loss])
        outs = []
        for name in self.outputs:
            t = env[name].contiguous()
            want = self.graph[name].requires_grad and torch.is_grad_enabled()
            if t.requires_grad != want:
                raise RuntimeError(f"stage {self.stage}: boundary tensor {name} has "
                                   f"requires_grad={t.requires_grad}, the graph says {want}")
            log.add(self.axis, P2P, self._bytes[name], direction="forward")
            outs.append(t)
        return tuple(outs)


class _CountingStage(PipelineStage):
    """A PipelineStage that counts the point-to-point sends the library issues."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: dict[str, list[float]] = {}

    def _count(self, direction: str, ops: list) -> list:
        e = self.sent.setdefault(direction, [0, 0.0])
        for op in ops:
            e[0] += 1
            e[1] += op.tensor.numel() * op.tensor.element_size()
        return ops

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
        return self._count("forward", super().get_fwd_send_ops(fwd_chunk_id))

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
        return self._count("backward", super().get_bwd_send_ops(bwd_chunk_id))


def _stage_loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    """The schedule's loss_fn: the last stage's output already is the micro-batch loss."""
    return output


class PipelineRunner:
    """This rank's model chunks (one per rank, or v interleaved: chunks k, k+K, ...), their
    ``PipelineStage`` objects and the schedule over m micro-batches."""

    def __init__(self, ep: torch.export.ExportedProgram, graph: OpGraph, plan: Plan,
                 mesh: DeviceMesh, params: dict[str, torch.Tensor], device: torch.device,
                 example_inputs: tuple, constants: dict[str, torch.Tensor]) -> None:
        if not plan.pipeline:
            raise ValueError("plan is not pipelined")
        check_stages(graph, plan)
        m = plan.num_microbatches
        pp = plan.pipeline["axis"]["name"]
        kind = _schedule_kind(plan)
        self.plan, self.graph, self.device = plan, graph, device
        self.precision = plan_precision(plan.training)
        self.stage_index = int(mesh.get_local_rank(pp))
        self.stage_mesh = mesh[tuple(plan.axis_names)]
        self.group = mesh.get_group(pp)
        self.comm = CommLog()  # every chunk's collectives and sends on this rank
        K, C = plan.num_stages, plan.num_chunks
        self.chunks = list(range(self.stage_index, C, K))  # Megatron's placement
        self.executors: list[StageExecutor] = []
        self.stages: list[_CountingStage] = []
        k_of, bounds = stage_of(plan), boundary_tensors(graph, plan)
        user = [n.name for n in graph.user_inputs]
        for c in self.chunks:
            ex = StageExecutor(ep, graph, plan, self.stage_mesh, params, log=self.comm,
                               nodes=[n.name for n in graph.nodes if k_of[n.name] == c])
            ins = user if c == 0 else bounds[c - 1]
            outs = [] if c == C - 1 else bounds[c]
            module = StageModule(ex, plan, c, ins, outs, constants if c == 0 else None)
            in_args = tuple(example_inputs) if c == 0 else tuple(self._example(n) for n in ins)
            if c == C - 1:
                loss = graph[graph.loss].out
                out_args: tuple = (torch.empty((), dtype=_torch_dtype(loss, self.precision),
                                               device=device, requires_grad=True),)
            else:
                out_args = tuple(self._example(n) for n in outs)
            self.executors.append(ex)
            self.stages.append(_CountingStage(module, c, C, device, input_args=in_args,
                                              output_args=out_args, group=self.group))
        if len(self.stages) == 1:
            self.schedule = SCHEDULES[kind](self.stages[0], n_microbatches=m,
                                            loss_fn=_stage_loss, scale_grads=True)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches=m,
                                                    loss_fn=_stage_loss, scale_grads=True)
        # the schedule splits the target among the micro-batches; _stage_loss ignores it
        self._target = torch.zeros(m, device=device)
        self.params = {k: p for ex in self.executors for k, p in ex.params.items()}

    def _example(self, name: str) -> torch.Tensor:
        meta = self.graph[name].out
        shape = local_shape(meta.shape, _placement(self.plan, name), self.plan.mesh_shape)
        return torch.empty(shape, dtype=_torch_dtype(meta, self.precision), device=self.device,
                           requires_grad=self.graph[name].requires_grad)

    @property
    def log(self) -> CommLog:
        """Collectives and sends this rank's chunks ran."""
        return self.comm

    def torch_sends(self) -> Counter:
        """Sends the pipelining library issued (count, bytes) since the last reset."""
        c: Counter = Counter()
        for stage in self.stages:
            for n, b in stage.sent.values():
                c["count"] += int(n)
                c["bytes"] += b
        return c

    def reset_logs(self) -> None:
        """Forget the logged collectives and sends."""
        self.comm.entries.clear()
        for stage in self.stages:
            stage.sent.clear()

    def step(self, inputs: tuple) -> torch.Tensor | None:
        """One training step's forward and backward over m micro-batches of the whole-batch
        ``inputs`` (split along dim 0 by the schedule). Gradients accumulate into the chunks'
        parameters already divided by m (the accumulated weight gradients converted once, after
        the schedule). Returns the mean micro-batch loss on the last chunk's rank, else None."""
        losses: list[torch.Tensor] = []
        first = any(st.is_first for st in self.stages)
        last = any(st.is_last for st in self.stages)
        self.schedule.step(*(inputs if first else ()),
                           target=self._target if last else None,
                           losses=losses if last else None, return_outputs=False)
        for ex in self.executors:  # the same chunk order on every rank of the stage mesh
            ex.apply_accumulated(self.plan.num_microbatches)
        if not last:
            return None
        return torch.stack([x.detach() for x in losses]).mean()

    def full_grads(self) -> dict[str, torch.Tensor]:
        """This rank's parameter gradients gathered whole on the stage mesh (collective)."""
        return {k: g for ex in self.executors for k, g in ex.full_grads().items()}

    def full_params(self) -> dict[str, torch.Tensor]:
        """This rank's parameters gathered whole on the stage mesh (collective)."""
        return {k: p for ex in self.executors for k, p in ex.full_params().items()}


def _schedule_kind(plan: Plan) -> str:
    """The plan's schedule name, upper case, checked against the stage and micro-batch counts
    (raises :class:`UserError`)."""
    K, m, v = plan.num_stages, plan.num_microbatches, plan.interleave
    kind = str(plan.pipeline.get("schedule", "1F1B")).upper()
    if kind not in SCHEDULES:
        raise UserError(f"plan's pipeline schedule {plan.pipeline.get('schedule')!r} is not "
                        f"one of {', '.join(SCHEDULES)}")
    if kind == "1F1B" and m < K:
        raise UserError(f"1F1B needs at least as many micro-batches as stages "
                        f"({m} < {K}); use GPipe or more micro-batches")
    if v > 1 and kind != "1F1B":
        raise UserError(f"plan interleaves {v} chunks per stage under {kind}; interleaving runs "
                        "under 1F1B only: re-plan without --schedule GPipe")
    if v > 1 and m % K:
        raise UserError(f"interleaved 1F1B needs the micro-batches ({m}) to be a multiple of "
                        f"the {K} stages; re-plan with --microbatches a multiple of {K}")
    return kind


def loss_everywhere(value: torch.Tensor | None, plan: Plan, device: torch.device) -> float:
    """The step's loss on every rank: the last stage's value, shared with one all-reduce over all
    ranks (each of the last stage's ranks holds it whole; divided by their number)."""
    t = torch.zeros((), dtype=torch.float64, device=device)
    if value is not None:
        t += value.double()
    dist.all_reduce(t)
    n = 1
    for s in plan.mesh_shape:
        n *= s
    return float(t) / n
