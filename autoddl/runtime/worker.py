"""One rank of ``autoddl run``: build the mesh, shard as planned, train, optionally check.

Launched by torchrun (``python -m torch.distributed.run ... -m autoddl.runtime.worker``). The
backend follows the device: NCCL with one GPU per rank when CUDA is there, gloo on CPUs; nothing
else differs between the two paths.

A pipelined plan (``plan.pipeline``) runs through :mod:`autoddl.runtime.pipeline`: the graph is
captured on one micro-batch, each rank runs its stage under the plan's schedule, and ``--check``
compares the mean micro-batch loss and each stage's parameter gradients (gathered on the stage
mesh) with the single-process full-batch run; the verdict is combined over all ranks. The
collective table then sums one device per stage (rank 0's pipeline group) over the step's
micro-batches, with point-to-point sends as kind ``p2p``.

Byte truth (:func:`byte_check`): after the first step every rank's log of the collectives it ran
(mesh axis, kind, bytes it sent) is gathered; per (axis, kind) the measured value is, for each
pipeline stage, its busiest device (the max over the stage's ranks; all ranks of a stage send the
same in the plans the rules allow, and an uneven spread is printed), summed over the stages —
the cost model's ``per_axis_kind`` is bytes sent per device, one device per stage, summed over
stages and micro-batches (unpipelined: one stage, the max over all ranks). The table compares
it with the plan; ``--check`` fails the run (a ``MISMATCH`` line; the ranks exit with
:data:`~autoddl.errors.CHECK_FAILED`, the launcher with 1) when an executed
count differs from the predicted one or the bytes differ by more than :data:`BYTE_RTOL` of
max(predicted, :data:`BYTE_FLOOR`).

Faults: a rank that raises prints ``autoddl run: rank R: <error>`` and exits with code 1; the
process group has a timeout (``AUTODDL_TIMEOUT_S``, default 300 s), so no collective waits
forever on a dead peer, and torchrun stops the other ranks as soon as one fails. For testing,
``AUTODDL_FAULT_RANK=R`` makes rank R fail at the start of step ``AUTODDL_FAULT_STEP`` (default
0): by raising (``AUTODDL_FAULT_KIND=raise``, the default) or by killing itself with SIGKILL
(``die``).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from autoddl.engine.capture import export, graph_from_export, leaf_values, microbatch_inputs
from autoddl.engine.repeat import match_plan
from autoddl.engine.costs import OPTIMIZER_STATES
from autoddl.engine.guard import user_code
from autoddl.engine.models import FILE_MODEL, build_model, parse_model_spec
from autoddl.engine.normalize import random_draws_line
from autoddl.engine.plan import Plan, load_plan
from autoddl.engine.precision import plan_precision
from autoddl.errors import CHECK_FAILED, UserError
from autoddl.runtime import checkpoint
from autoddl.runtime.execute import ShardedExecutor
from autoddl.runtime.pipeline import P2P, PipelineRunner, loss_everywhere
from autoddl.runtime.rank import exit_rank, group_timeout_s, pick_device, run_rank

_FUNCOL_KIND = {
    "all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all",
    "all_reduce_": "all_reduce", "allreduce_": "all_reduce", "_allgather_base_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "alltoall_base_": "all_to_all",
}


def all_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter by qualified name, a tied one under each of its names (the captured
    graph may name it by any)."""
    return dict(model.named_parameters(remove_duplicate=False))


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer the plan's memory model assumed."""
    assert name in OPTIMIZER_STATES
    params = list(params)
    if not params:  # a pipeline stage of parameter-free operators: nothing to update
        params = [torch.nn.Parameter(torch.zeros(0))]
    if name in ("adam", "adamw"):
        return torch.optim.AdamW(params, lr=lr, foreach=False)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0,
                           foreach=False)


def relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                    scale: dict[str, torch.Tensor] | None = None) -> dict:
    """||got − ref|| / ||ref|| per tensor of ``ref`` (inf where ``got`` lacks it), the denominator
    floored at 1e-3 of the norm of all of ``scale`` (default ``ref``) together (a tensor whose true
    value is ~0, such as the key bias's gradient under softmax, is compared at the scale of the
    whole set, not at its own rounding noise)."""
    scale = ref if scale is None else scale
    total = torch.sqrt(sum((r.double() ** 2).sum() for r in scale.values()))
    floor = max(float(total) * 1e-3, 1e-30)
    return {k: float((got[k].double() - r.double()).norm()) / max(float(r.double().norm()), floor)
            if k in got else float("inf")
            for k, r in ref.items()}


def predicted_counts(plan: Plan) -> Counter:
    """Collective counts per kind the plan predicts for one step."""
    return Counter({k: int(v["count"]) for k, v in plan.cost["per_kind"].items()})


#: ``--check``'s default tolerance (relative error of the loss and of each gradient, the
#: gradient's norm floored as in :func:`relative_errors`) for a plan run in fp32: the run and the
#: reference compute the same sums in another order, fp32 rounding only
FP32_TOL = 1e-5
#: ... and for a plan run in bf16 against the fp32 single-process reference. bf16 keeps 8
#: significant bits: each rounding errs by at most u = 2^-8 ≈ 3.9e-3 relative. A step rounds
#: every activation, every weight as read and every gradient once per operator, so an error
#: grows with the chain of operators a value passes (forward and backward, about 2 roundings per
#: operator on the path), as √n·u when the roundings are independent, up to n·u in the worst
#: case: for the dozen or so chained roundings of a small GPT's step, ≈ 4·u to 12·u, i.e.
#: 1.5e-2 to 5e-2. A few 1e-2 is therefore the honest bound: 5e-2 (≈ 13·u) accepts bf16's
#: rounding and still fails a plan that is wrong (a missing or doubled reduction errs by 1e-1 to
#: 1e0). Used under bf16 only; fp32 runs keep :data:`FP32_TOL`.
BF16_TOL = 5e-2


def default_tolerance(precision: str) -> float:
    """``--check``'s tolerance when none is given: :data:`BF16_TOL` for a bf16 plan, else
    :data:`FP32_TOL`."""
    return BF16_TOL if precision == "bf16" else FP32_TOL


#: ``--check`` fails when a (mesh axis, kind)'s executed bytes differ from the plan's by more
#: than this fraction of the predicted bytes ...
BYTE_RTOL = 0.01
#: ... or of this many bytes where less is predicted (tiny totals: rounding in sub-byte shares
#: is ignored, a missing scalar all-reduce of 4 bytes still fails)
BYTE_FLOOR = 64.0


@dataclass(frozen=True)
class ByteRow:
    """One (mesh axis, collective kind) of the step: predicted and executed count and bytes sent
    per device (:func:`byte_check`). ``predicted_*`` is None where the plan predicts nothing for
    the axis (a plan file without ``cost.per_axis_kind``, or not naming the axis);
    ``spread_bytes``: how much the stages' least busy devices sent less than their busiest."""

    axis: str
    kind: str
    predicted_count: int | None
    predicted_bytes: float | None
    executed_count: int
    executed_bytes: float
    spread_bytes: float = 0.0

    @property
    def rel_diff(self) -> float | None:
        """(executed − predicted) / max(predicted, :data:`BYTE_FLOOR`); None: not predicted."""
        if self.predicted_bytes is None:
            return None
        return (self.executed_bytes - self.predicted_bytes) / max(self.predicted_bytes,
                                                                  BYTE_FLOOR)

    @property
    def status(self) -> str:
        """``ok``, ``MISMATCH`` (count differs, or bytes by more than :data:`BYTE_RTOL`) or
        ``not predicted``."""
        rel = self.rel_diff
        if rel is None:
            return "not predicted"
        if self.executed_count != self.predicted_count or abs(rel) > BYTE_RTOL:
            return "MISMATCH"
        return "ok"


def aggregate_measured(logs: Sequence[tuple[int, dict[tuple[str, str], Sequence[float]]]]
                       ) -> dict[tuple[str, str], dict[str, float]]:
    """Each rank's (stage, {(axis, kind): [count, bytes]}) as one measurement per (axis, kind):
    per stage the busiest device (max count, max bytes over the stage's ranks; ``min_bytes``
    the least busy one's, a rank without the key counting 0), summed over the stages — bytes
    per device as the cost model sums a pipelined step's stages (unpipelined: one stage)."""
    ranks: Counter = Counter(stage for stage, _ in logs)
    per_stage: dict[tuple[int, tuple[str, str]], list] = {}
    seen: Counter = Counter()
    for stage, log in logs:
        for key, (n, b) in log.items():
            e = per_stage.setdefault((stage, key), [0, 0.0, float("inf")])
            e[0], e[1], e[2] = max(e[0], int(n)), max(e[1], float(b)), min(e[2], float(b))
            seen[(stage, key)] += 1
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (stage, key), (n, hi, lo) in per_stage.items():
        if seen[(stage, key)] < ranks[stage]:
            lo = 0.0  # some rank of the stage ran none of it
        acc = out.setdefault(key, {"count": 0, "bytes": 0.0, "min_bytes": 0.0})
        acc["count"] += n
        acc["bytes"] += hi
        acc["min_bytes"] += lo
    return out


def byte_check(per_axis_kind: dict[str, dict[str, dict]] | None,
               measured: dict[tuple[str, str], dict[str, float]]) -> list[ByteRow]:
    """Rows comparing a plan's ``cost["per_axis_kind"]`` (``{axis: {kind: {"count", "bytes",
    ...}}}``, one training step) with the measured ones (:func:`aggregate_measured`): every
    (axis, kind) either side has, predicted axes first in the plan's order. A kind the plan
    lists no entry for on an axis it does name is predicted 0; an axis it does not name (or a
    plan without ``per_axis_kind``) gives ``not predicted`` rows."""
    pred = per_axis_kind or {}
    keys = [(a, k) for a, kinds in pred.items() for k in kinds]
    keys += sorted(k for k in measured if k not in set(keys))
    rows = []
    for axis, kind in keys:
        m = measured.get((axis, kind), {"count": 0, "bytes": 0.0, "min_bytes": 0.0})
        if axis in pred:
            p = pred[axis].get(kind, {"count": 0, "bytes": 0.0})
            pc, pb = int(p["count"]), float(p["bytes"])
        else:
            pc, pb = None, None
        rows.append(ByteRow(axis, kind, pc, pb, int(m["count"]), float(m["bytes"]),
                            float(m["bytes"]) - float(m.get("min_bytes", m["bytes"]))))
    return rows


def gather_axis_kind(trainer: Any) -> dict[tuple[str, str], dict[str, float]]:
    """Every rank's collectives of the step by (axis, kind), aggregated
    (:func:`aggregate_measured`) on every rank. Collective: all ranks call it."""
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (trainer.stage, trainer.comm_log.by_axis_kind()))
    return aggregate_measured(rows)


def _kind_counts(counts) -> Counter:
    """CommDebugMode's counts per op, as counts per autoddl collective kind."""
    measured: Counter = Counter()
    for op, n in counts.items():
        name = str(op).split(".")[-1] if not hasattr(op, "__name__") else op.__name__
        name = name.split(".")[0]
        measured[_FUNCOL_KIND.get(name, name)] += n
    return measured


class _Flat:
    """Unpipelined: every rank runs the whole graph on its piece of the whole batch."""

    def __init__(self, ep, graph, plan: Plan, mesh, model, inputs: tuple) -> None:
        self.ex = ShardedExecutor(ep, graph, plan, mesh, all_params(model))
        self.feed = leaf_values(ep, graph, model, inputs)
        self.params = self.ex.params

    stage = 0  # unpipelined: one stage

    @property
    def comm_log(self):
        """This rank's log of the collectives it ran (:class:`~autoddl.runtime.execute.CommLog`)."""
        return self.ex.log

    def reset_logs(self) -> None:
        self.ex.log.entries.clear()

    def forward_backward(self) -> torch.Tensor:
        _, loss = self.ex.forward(self.feed)
        loss.backward()
        return loss

    def loss_value(self, raw: torch.Tensor) -> float:
        return float(raw.detach())

    def table(self, comm_counts) -> tuple[Counter, Counter, Counter]:
        """(torch saw, executed, executed bytes) per kind, on this rank."""
        return _kind_counts(comm_counts), self.ex.log.by_kind(), self.ex.log.bytes_by_kind()

    def full_grads(self) -> dict[str, torch.Tensor]:
        return self.ex.full_grads()

    def full_params(self) -> dict[str, torch.Tensor]:
        return self.ex.full_params()


class _Piped:
    """Pipelined: this rank runs its stage of the micro-batch graph under the plan's schedule."""

    def __init__(self, ep, graph, plan: Plan, mesh, model, inputs: tuple, device) -> None:
        self.plan, self.device, self.inputs = plan, device, inputs
        first = microbatch_inputs(inputs, plan.num_microbatches)
        consts = {k: v for k, v in leaf_values(ep, graph, model, first).items()
                  if graph[k].target == "const"}
        self.runner = PipelineRunner(ep, graph, plan, mesh, all_params(model),
                                     device, first, consts)
        self.params = self.runner.params

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.runner.stage_index

    @property
    def comm_log(self):
        """This rank's log of the collectives and sends its stage ran."""
        return self.runner.log

    def reset_logs(self) -> None:
        self.runner.reset_logs()

    def forward_backward(self) -> torch.Tensor | None:
        return self.runner.step(self.inputs)

    def loss_value(self, raw: torch.Tensor | None) -> float:
        return loss_everywhere(raw, self.plan, self.device)  # collective

    def table(self, comm_counts) -> tuple[Counter, Counter, Counter]:
        """(torch saw, executed, executed bytes) per kind, summed over the stages of rank 0's
        pipeline group (one device per stage). Point-to-point sends: "torch saw" counts the sends
        the pipelining library issued. Collective: all ranks call it."""
        seen = _kind_counts(comm_counts)
        sends = self.runner.torch_sends()
        if sends["count"]:
            seen[P2P] += sends["count"]
        mine = (dict(seen), dict(self.runner.log.by_kind()), dict(self.runner.log.bytes_by_kind()))
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
        stage_devices = dist.get_world_size() // self.plan.num_stages
        out = (Counter(), Counter(), Counter())
        for r, row in enumerate(rows):
            if r % stage_devices == 0:  # stage-mesh coordinate 0: rank 0's pipeline group
                for acc, part in zip(out, row):
                    acc.update(part)
        return out

    def full_grads(self) -> dict[str, torch.Tensor]:
        return self.runner.full_grads()

    def full_params(self) -> dict[str, torch.Tensor]:
        return self.runner.full_params()


def _sync_reference(trainer: Any, model: torch.nn.Module, pipelined: bool) -> None:
    """Give the single-process reference the run's current weights (collective), so that each
    checked step compares loss and gradients computed from the same weights. Without it, Adam
    turns rounding differences of the order of 1e-7 in near-zero gradients into weight
    differences of 1e-4 after one update (its step is lr x m/sqrt(v), about lr whatever the
    gradient's size), and the next step's gradients then differ by more than the tolerance
    for no fault of the plan."""
    mine = {k: v.detach().cpu() for k, v in trainer.full_params().items()}
    if pipelined:  # each rank holds its stage's parameters: share them
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
        mine = {k: v for row in rows for k, v in row.items()}
    with torch.no_grad():
        for k, p in all_params(model).items():
            if k in mine:
                p.copy_(mine[k].to(p.device))


def _max_all(value: float, device) -> float:
    """The largest ``value`` over all ranks (collective)."""
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


class InjectedFault(RuntimeError):
    """The failure ``AUTODDL_FAULT_RANK`` asks for (tests of fault handling)."""


def inject_fault(rank: int, step: int) -> None:
    """Fail here if ``AUTODDL_FAULT_RANK`` names this rank and ``AUTODDL_FAULT_STEP`` (default 0)
    this step: raise :class:`InjectedFault` or, with ``AUTODDL_FAULT_KIND=die``, SIGKILL self."""
    want = os.environ.get("AUTODDL_FAULT_RANK")
    if want is None or int(want) != rank or int(os.environ.get("AUTODDL_FAULT_STEP", "0")) != step:
        return
    if os.environ.get("AUTODDL_FAULT_KIND", "raise") == "die":
        checkpoint.die_now()
    raise InjectedFault(f"injected fault at step {step} (AUTODDL_FAULT_RANK={rank})")


def _restore(plan: Plan, params: dict[str, torch.Tensor], model: torch.nn.Module, check: bool,
             lr: float | None, save: str | None, resume: str | None
             ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, int,
                        checkpoint.Saver | None]:
    """The run's optimizers (its own over ``params``, the reference's over ``model``), its first
    step and its saver: fresh, or resumed from the newest complete step in ``resume`` (at the
    saved lr unless ``lr`` is given). Collective: all ranks call it."""
    found: list = [checkpoint.latest(resume) if resume and dist.get_rank() == 0 else None]
    if resume:  # rank 0 picks the step, so that all ranks load the same one
        dist.broadcast_object_list(found, src=0)
        checkpoint.check_resumable(found[0], plan, check)
    lr_used, lr_note = checkpoint.pick_lr(found[0], lr)
    opt = make_optimizer(plan.training["optimizer"], list(params.values()), lr_used)
    ref_opt = make_optimizer(plan.training["optimizer"], list(model.parameters()), lr_used)
    start = 0
    if found[0] is not None:
        start = checkpoint.load(found[0], params, opt, (model, ref_opt) if check else None)
        if dist.get_rank() == 0:
            print(f"resumed from {found[0].path} ({start} steps done)", flush=True)
            for note in (checkpoint.resharded_note(found[0], plan), lr_note):
                if note:
                    print(note, flush=True)
    saver = checkpoint.Saver(save, plan, lr_used, check) if save else None
    return opt, ref_opt, start, saver


def _capture(plan: Plan, device) -> tuple[torch.nn.Module, tuple, Any, Any, Plan]:
    """The plan's model built on ``device`` with its example inputs, exported (one micro-batch
    when pipelined), its graph, and the plan checked against it and written out for every
    layer."""
    spec = parse_model_spec(plan.model["spec"])
    with user_code(f"plan's model {spec.text}", foreign=spec.name == FILE_MODEL or spec.is_hf):
        model, inputs = build_model(spec, device, seed=0)
        captured = microbatch_inputs(inputs, plan.num_microbatches) if plan.pipeline else inputs
        ep = export(model, captured)
        graph = graph_from_export(ep)
    return model, inputs, ep, graph, match_plan(plan, graph)


def _check_step(trainer: Any, model: torch.nn.Module, ref_opt: torch.optim.Optimizer,
                inputs: tuple, value: float, pipelined: bool, tol: float, device,
                step: int) -> tuple[float, bool, str]:
    """One checked step (collective): the reference, given the run's weights, computes the
    loss and gradients on the whole batch; returns (worst relative error over all ranks, any
    over ``tol`` on any rank, the words for the step line) and steps the reference."""
    _sync_reference(trainer, model, pipelined)
    ref_opt.zero_grad()
    ref_loss = model(*inputs)
    ref_loss.backward()
    grads = trainer.full_grads()
    ref_value = float(ref_loss.detach())
    ref_grads = {k: p.grad for k, p in all_params(model).items()}
    errs = {"loss": abs(value - ref_value) / max(abs(ref_value), 1e-30)}
    # the parameters this rank holds (all of them unless pipelined: its stage's)
    errs.update(relative_errors(grads, {k: ref_grads[k] for k in trainer.params},
                                scale=ref_grads))
    bad = {k: v for k, v in errs.items() if v > tol}
    step_worst = _max_all(max(errs.values()), device)
    any_bad = _max_all(float(bool(bad)), device) > 0
    words = f"  reference {ref_value:.6f}  max relative error {step_worst:.2e}"
    listed = ", ".join(f"{k} {v:.2e}" for k, v in list(bad.items())[:5])
    if any_bad:
        words += "  MISMATCH" + (f": {listed}" if bad else " (on other ranks)")
        if bad and dist.get_rank() != 0:
            print(f"rank {dist.get_rank()} step {step}: MISMATCH: {listed}", flush=True)
    ref_opt.step()
    return step_worst, any_bad, words


def _first_step_bytes(trainer: Any, plan: Plan, counts, step: int, check: bool
                      ) -> tuple[str, bool]:
    """Print the first step's collective and byte tables (collective); returns the byte
    verdict's words and whether a (mesh axis, kind) mismatched."""
    rank = dist.get_rank()
    table = trainer.table(counts)  # collective when pipelined
    if rank == 0:
        _print_collectives(plan, *table)
    rows = byte_check(plan.cost.get("per_axis_kind"), gather_axis_kind(trainer))
    if rank == 0:
        _print_bytes(plan, rows, step, check)
    bytes_bad = [r for r in rows if r.status == "MISMATCH"]
    if "per_axis_kind" not in plan.cost:
        return ("; bytes per mesh axis and collective kind NOT CHECKED (the plan predicts "
                "none)"), False
    if bytes_bad:
        return (f"; bytes per mesh axis and collective kind MISMATCH in {len(bytes_bad)} of "
                f"{len(rows)} rows"), True
    return (f"; bytes per mesh axis and collective kind within {BYTE_RTOL:.0%} of the plan "
            f"({_rows(len(rows))})"), False


def _rows(count: int) -> str:
    """``count`` rows of the byte table, in words."""
    return f"{count} row{'' if count == 1 else 's'}"


def _announce(plan: Plan, backend: str, device) -> None:
    """Rank 0's first line: ranks, backend, mesh, pipeline, torch version."""
    pipe = ""
    if plan.pipeline:
        v = plan.interleave
        pipe = (f", {plan.num_stages} stages × {plan.num_microbatches} micro-batches "
                f"({'interleaved ' if v > 1 else ''}{plan.pipeline.get('schedule', '1F1B')}"
                + (f", {v} chunks per stage" if v > 1 else "") + ")")
    print(f"{dist.get_world_size()} rank(s), backend {backend} on {device.type}, mesh "
          f"{dict(zip(plan.device_mesh_names, plan.device_mesh_shape))}{pipe}, "
          f"precision {plan_precision(plan.training)}, "
          f"torch {torch.__version__}", flush=True)


def run(plan: Plan, steps: int, check: bool, lr: float | None, tol: float | None,
        save: str | None = None, resume: str | None = None) -> int:
    """Train ``steps`` steps of the planned model; with ``check``, compare to one process
    (fp32) within ``tol`` (None: :func:`default_tolerance` of the plan's precision).
    ``lr``: None for the saved one when resuming, else 1e-3. ``resume``: start from the newest
    complete step saved in that folder; ``save``: save the state into that folder after every
    step (:mod:`autoddl.runtime.checkpoint`)."""
    if tol is None:
        tol = default_tolerance(plan_precision(plan.training))
    backend, device = pick_device()
    if not dist.is_initialized():  # (tests/hf_ranks.py runs several plans in one group)
        dist.init_process_group(backend, timeout=timedelta(seconds=group_timeout_s()))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.num_devices:
        raise UserError(f"plan needs {plan.num_devices} processes, torchrun gave {world}")
    mesh = init_device_mesh(device.type, plan.device_mesh_shape,
                            mesh_dim_names=plan.device_mesh_names)
    if rank == 0:
        _announce(plan, backend, device)
    model, inputs, ep, graph, plan = _capture(plan, device)
    if check and rank == 0 and random_draws_line(ep):
        print(random_draws_line(ep), flush=True)
    if plan.pipeline:
        trainer: Any = _Piped(ep, graph, plan, mesh, model, inputs, device)
    else:
        trainer = _Flat(ep, graph, plan, mesh, model, inputs)
    opt, ref_opt, start, saver = _restore(plan, trainer.params, model, check, lr, save, resume)
    reference = (model, ref_opt) if check else None
    worst, ok, byte_note = 0.0, True, ""
    from torch.distributed.tensor.debug import CommDebugMode
    for step in range(start, start + steps):
        if not checkpoint.faults_in_save():  # (else the fault comes while saving)
            inject_fault(rank, step)
        opt.zero_grad()
        trainer.reset_logs()
        with CommDebugMode() as comm:
            raw = trainer.forward_backward()
        value = trainer.loss_value(raw)
        msg = f"step {step}: loss {value:.6f}"
        if check:
            step_worst, any_bad, words = _check_step(trainer, model, ref_opt, inputs, value,
                                                     bool(plan.pipeline), tol, device, step)
            worst, ok, msg = max(worst, step_worst), ok and not any_bad, msg + words
        opt.step()
        if rank == 0:
            print(msg, flush=True)
        if saver is not None:  # every rank saves this step before any starts the next
            saver.save(step + 1, trainer.params, opt, reference)
        if step == start:
            byte_note, bytes_bad = _first_step_bytes(trainer, plan, comm.get_comm_counts(),
                                                     step, check)
            ok = ok and not (check and bytes_bad)
    if check:
        ref = {k: p.detach() for k, p in all_params(model).items()}
        mine = relative_errors(trainer.full_params(), {k: ref[k] for k in trainer.params},
                               scale=ref)
        weights = _max_all(max(mine.values(), default=0.0), device)
        if rank == 0:
            print(f"check {'PASSED' if ok else 'FAILED'}: {steps} step(s), worst relative error "
                  f"{worst:.2e} over loss and gradients (tolerance {tol:.0e}); weights after the "
                  f"last update differ by {weights:.2e} (reported, not held to the tolerance: "
                  f"Adam magnifies rounding differences){byte_note}", flush=True)
    dist.barrier()  # every rank is done; the process then ends without tearing gloo down (see
    # __main__: a peer closing first made gloo abort a rank at times)
    return 0 if ok else CHECK_FAILED


def _print_collectives(plan: Plan, measured: Counter, executed: Counter,
                       bytes_exec: Counter) -> None:
    predicted = predicted_counts(plan)
    print(f"{'collective':<16}{'predicted':>10}{'executed':>10}{'torch saw':>10}"
          f"{'pred. bytes':>14}{'exec. bytes':>14}")
    for kind in sorted(set(predicted) | set(executed) | set(measured)):
        pb = plan.cost["per_kind"].get(kind, {}).get("bytes", 0.0)
        print(f"{kind:<16}{predicted[kind]:>10}{executed[kind]:>10}{measured[kind]:>10}"
              f"{pb:>14.0f}{bytes_exec[kind]:>14.0f}")


def _print_bytes(plan: Plan, rows: list[ByteRow], step: int, enforced: bool) -> None:
    """The byte table of the first step (rank 0) and its verdict line."""
    stages = plan.num_stages
    how = (f"each stage's busiest device, summed over {stages} stages" if stages > 1
           else "the busiest device")
    print(f"bytes sent per device in step {step} by mesh axis and kind ({how}):")
    print(f"{'axis':<8}{'kind':<16}{'pred. count':>12}{'exec. count':>12}{'pred. bytes':>16}"
          f"{'exec. bytes':>16}{'rel. diff':>12}  status")
    if not rows:
        print("(none predicted, none executed)")
    for r in rows:
        pc = "n/a" if r.predicted_count is None else str(r.predicted_count)
        pb = "n/a" if r.predicted_bytes is None else f"{r.predicted_bytes:.0f}"
        rel = "n/a" if r.rel_diff is None else f"{100 * r.rel_diff:+.3f} %"
        spread = (f"  (ranks of a stage differ by up to {r.spread_bytes:.0f} B)"
                  if r.spread_bytes > BYTE_RTOL * max(r.executed_bytes, BYTE_FLOOR) else "")
        print(f"{r.axis:<8}{r.kind:<16}{pc:>12}{r.executed_count:>12}{pb:>16}"
              f"{r.executed_bytes:>16.0f}{rel:>12}  {r.status}{spread}")
    if "per_axis_kind" not in plan.cost:
        print("byte check NOT DONE: the plan file predicts no bytes per mesh axis and kind "
              "(cost.per_axis_kind; written by an older autoddl): re-run `autoddl plan`",
              flush=True)
        return
    missing = [f"{r.axis}/{r.kind}" for r in rows if r.status == "not predicted"]
    if missing:
        print(f"byte check: not predicted by the plan, not compared: {', '.join(missing)}")
    bad = [r for r in rows if r.status == "MISMATCH"]
    if bad:
        print(("byte check MISMATCH: " if enforced else
               "byte check MISMATCH (not enforced without --check): ")
              + "; ".join(f"{r.axis}/{r.kind} executed {r.executed_bytes:.0f} B in "
                          f"{r.executed_count}, predicted {r.predicted_bytes:.0f} B in "
                          f"{r.predicted_count} ({100 * (r.rel_diff or 0.0):+.2f} %)"
                          for r in bad), flush=True)
    else:
        print(f"byte check passed: {_rows(len(rows) - len(missing))} (mesh axis and "
              f"collective kind), counts equal and bytes within {BYTE_RTOL:.0%} (of at least "
              f"{BYTE_FLOOR:.0f} B)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank."""
    ap = argparse.ArgumentParser(prog="autoddl.runtime.worker")
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--save", default=None)
    ap.add_argument("--resume", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    return run_rank("autoddl run", lambda: run(load_plan(a.plan), a.steps, a.check, a.lr, a.tol,
                                               a.save, a.resume))


if __name__ == "__main__":
    exit_rank(main())
