"""Plans as plain data: placements keyed by mesh-axis name, the predicted cost, the solver's proof.

A plan file is JSON with ``schema_version``; :func:`save_plan` writes it atomically (a temporary
file in the same folder, then a rename), so a crash never leaves half a plan behind.

Wall-clock timings (the search's and each candidate's build, bound and solve seconds) are not
part of the file: the same command twice writes the same bytes. They live in
:attr:`Plan.timings`, in memory only, where the summary prints them; a file written by an older
autoddl, with ``time_s`` and the like in its solver and candidate records, reads with those moved
there (:func:`split_timings`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoddl.engine.plan_check import check_plan_data
from autoddl.engine.provenance import finder_text, proof_lines, provenance_lines, repeat_line
from autoddl.errors import UserError
from autoddl.files import write_text_atomic

SCHEMA_VERSION = 1
#: the keys of wall-clock timings in solver and candidate records (never written to a file)
TIMING_KEYS = ("time_s", "mesh_solve_time_s", "build_s", "bound_s")


def split_timings(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``record`` without its :data:`TIMING_KEYS`, those timings)."""
    if not isinstance(record, dict):
        return record, {}
    return ({k: v for k, v in record.items() if k not in TIMING_KEYS},
            {k: v for k, v in record.items() if k in TIMING_KEYS})


@dataclass(frozen=True)
class OpPlacement:
    """One node's planned placements: output, each tensor input as read, each input's gradient."""

    name: str
    target: str
    out: dict[str, str]
    ins: tuple[dict[str, str], ...] = ()
    grads: tuple[dict[str, str] | None, ...] = ()
    stage: int = 0
    #: parameters: ZeRO level (:data:`autoddl.engine.rules.ZERO_REGATHER` and friends)
    zero: int = 0
    #: the module path it belongs to (``blocks.3.mlp.fc1``; a parameter's qualified name), or ""
    #: (top level, or a plan file written before module paths were recorded)
    module: str = ""


@dataclass(frozen=True)
class Plan:
    """A solved parallelization plan."""

    model: dict[str, Any]
    cluster: dict[str, Any]
    mesh: dict[str, Any]
    training: dict[str, Any]
    ops: tuple[OpPlacement, ...]
    cost: dict[str, Any]
    memory: dict[str, Any]
    solver: dict[str, Any]
    candidates: tuple[dict[str, Any], ...] = ()
    pipeline: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION
    #: wall-clock seconds, not saved (module docstring): ``total_s`` (the search), ``solve_s``
    #: (the best candidate's ILP), ``candidates`` (per candidate record, in order: ``build_s``,
    #: ``bound_s``, ``time_s`` where known)
    timings: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _by_name: dict[str, OpPlacement] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {o.name: o for o in self.ops})

    def op(self, name: str) -> OpPlacement:
        """The placements of node ``name``."""
        return self._by_name[name]

    @property
    def axis_names(self) -> list[str]:
        """The (stage) mesh's axis names, outermost first: the axes placements are keyed by."""
        return [a["name"] for a in self.mesh["axes"]]

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """The (stage) mesh's axis sizes."""
        return tuple(int(a["size"]) for a in self.mesh["axes"])

    @property
    def num_stages(self) -> int:
        """Pipeline stages (1: not pipelined)."""
        return int(self.pipeline["stages"]) if self.pipeline else 1

    @property
    def interleave(self) -> int:
        """Model chunks per device of the pipeline (Megatron's interleaved 1F1B: v; 1: none)."""
        return int(self.pipeline.get("interleave", 1)) if self.pipeline else 1

    @property
    def num_chunks(self) -> int:
        """Model chunks of the pipeline, v·K (an op's ``stage`` is its chunk; chunk c runs on
        pipeline rank c mod K)."""
        return self.num_stages * self.interleave

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step (1: not pipelined)."""
        return int(self.pipeline["microbatches"]) if self.pipeline else 1

    @property
    def device_mesh_shape(self) -> tuple[int, ...]:
        """Shape of the whole device mesh: (stages, *stage mesh) when pipelined."""
        return ((self.num_stages,) if self.pipeline else ()) + self.mesh_shape

    @property
    def device_mesh_names(self) -> tuple[str, ...]:
        """Axis names of the whole device mesh (the pipeline axis first when pipelined)."""
        head = (self.pipeline["axis"]["name"],) if self.pipeline else ()
        return head + tuple(self.axis_names)

    @property
    def num_devices(self) -> int:
        """Devices the plan runs on."""
        n = 1
        for s in self.device_mesh_shape:
            n *= s
        return n

    def stage_nodes(self, stage: int) -> list[str]:
        """Names of the nodes (parameters, inputs, ops) placed in ``stage``, in graph order."""
        return [o.name for o in self.ops if o.stage == stage]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (without :attr:`timings`: the same plan gives the same data)."""
        d = asdict(self)
        d.pop("_by_name")
        d.pop("timings")
        d["solver"] = split_timings(d["solver"])[0]
        d["ops"] = [
            {"name": o.name, "target": o.target, "stage": o.stage, "out": o.out,
             "in": list(o.ins), "grad": list(o.grads), **({"zero": o.zero} if o.zero else {}),
             **({"module": o.module} if o.module else {})}
            for o in self.ops
        ]
        d["candidates"] = [split_timings(c)[0] for c in self.candidates]
        return {"schema_version": d.pop("schema_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict` (checks the schema version)."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"plan file has schema_version {version!r}; this autoddl reads version "
                f"{SCHEMA_VERSION}: re-run `autoddl plan` to regenerate it"
            )
        check_plan_data(d)
        try:
            ops = tuple(
                OpPlacement(o["name"], o["target"], dict(o["out"]),
                            tuple(dict(i) for i in o["in"]),
                            tuple(None if g is None else dict(g) for g in o["grad"]),
                            int(o.get("stage", 0)), int(o.get("zero", 0)),
                            str(o.get("module", "")))
                for o in d["ops"]
            )
            solver, solver_times = split_timings(d["solver"])
            cands = [split_timings(c) for c in d.get("candidates", ())]
            timings = {}
            if "time_s" in solver_times:  # a file of an older autoddl
                timings = {"total_s": solver_times["time_s"],
                           "solve_s": solver_times.get("mesh_solve_time_s"),
                           "candidates": [t for _, t in cands]}
            return cls(model=d["model"], cluster=d["cluster"], mesh=d["mesh"],
                       training=d["training"], ops=ops, cost=d["cost"], memory=d["memory"],
                       solver=solver, candidates=tuple(c for c, _ in cands),
                       pipeline=d.get("pipeline"), schema_version=version, timings=timings)
        except (KeyError, TypeError) as exc:
            raise UserError(f"plan file is malformed: missing or bad field {exc}") from None


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write ``plan`` as JSON, atomically."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"cannot write plan: folder {str(path.parent)!r} does not exist")
    text = json.dumps(plan.to_dict(), indent=1, sort_keys=False) + "\n"
    write_text_atomic(path, text)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan file written by :func:`save_plan`."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"plan file {str(path)!r} not found; create it with `autoddl plan`") from None
    except OSError as exc:
        raise UserError(f"cannot read plan file {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"plan file {str(path)!r} is not valid JSON ({exc.msg}, line "
                        f"{exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number; nesting too deep
        what = "nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UserError(f"plan file {str(path)!r} is not a plan ({what}); re-run "
                        "`autoddl plan`") from None
    if not isinstance(data, dict):
        raise UserError(f"plan file {str(path)!r} is not a JSON object")
    return Plan.from_dict(data)


def format_bytes(b: float) -> str:
    """Bytes in B/KiB/MiB/GiB/TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024
    return f"{b:.1f} TiB"


def format_seconds(s: float) -> str:
    """Seconds in s/ms/µs (powers of ten beyond a million seconds)."""
    if s >= 1e6:
        return f"{s:.3e} s"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def fallback_line(plan: Plan) -> str:
    """The operators the plan runs replicated for want of a sharding rule, in words ("" if
    none)."""
    ops = plan.model.get("fallback_ops") or {}
    if not ops:
        return ""
    listed = ", ".join(f"{t} x{c}" for t, c in sorted(ops.items(), key=lambda kv: -kv[1]))
    return f"\nreplicated (no sharding rule): {sum(ops.values())} op(s): {listed}"


def _link_text(axis: dict) -> str:
    """An axis's link: its bandwidth, and where it spans nodes with several ranks of a group on
    each (two-level collectives) those ranks and the intra-node bandwidth."""
    g = axis.get("ranks_per_node", 1)
    if axis.get("spans_nodes") and 1 < g < axis["size"]:
        return (f"{axis['bandwidth_gbps']:g} GB/s across nodes, {g} per node at "
                f"{axis.get('intra_bandwidth_gbps', axis['bandwidth_gbps']):g} GB/s")
    return f"{axis['bandwidth_gbps']:g} GB/s"


def _step_tag(solver: dict) -> str:
    """" (objective)" where the solver minimized the step time."""
    return "" if solver.get("objective_kind") == "bytes" else " (objective)"


def _objective_text(solver: dict) -> str:
    """The solver's objective with its unit: seconds of the step, or bytes per device (a
    plan's ``solver.objective_kind``; plans written before it minimized the step)."""
    if solver.get("objective_kind") == "bytes":
        return f"{format_bytes(solver['objective'])} per device (bytes)"
    return format_seconds(solver["objective"])


def summary(plan: Plan) -> str:
    """A short human-readable table of a plan: mesh, cost by axis and kind, memory, solver."""
    c, m, s = plan.cost, plan.memory, plan.solver
    axes = " × ".join(f"{a['name']}={a['size']} ({_link_text(a)})" for a in plan.mesh["axes"])
    gap = "n/a" if s.get("gap") is None else f"{100 * s['gap']:.3g} %"
    total_s = plan.timings.get("total_s")
    searched = f"{total_s:.2f} s over " if isinstance(total_s, (int, float)) else "over "
    pipe = ""
    if plan.pipeline:
        ax = plan.pipeline["axis"]
        v = plan.interleave
        per = int(plan.pipeline.get("layers_per_stage", 0)) // v
        chunks = (f", interleaved: {v} model chunks per device ({plan.num_chunks} chunks"
                  + (f" of {per} layer{'s' if per > 1 else ''}" if per else "") + ")"
                  ) if v > 1 else ""
        pipe = (f"\npipeline {plan.num_stages} stages × {plan.num_microbatches} micro-batches "
                f"({plan.pipeline['schedule']}{chunks}) over {ax['name']} "
                f"({ax['bandwidth_gbps']:g} GB/s); {_ops_per_stage(plan)}")
    lines = [
        f"model    {plan.model['spec']}  ({plan.model['num_params']:,} parameters, "
        f"{plan.model['num_ops']} ops)" + fallback_line(plan),
        f"cluster  {plan.cluster.get('spec') or plan.cluster['name']}  "
        f"({plan.num_devices} devices)",
        f"mesh     {axes}" + (" (each stage)" if plan.pipeline else "") + pipe,
        f"solver   {finder_text(s)}{s['status']}, objective {_objective_text(s)}, "
        f"gap {gap}, {searched}{len(plan.candidates)} candidate(s)",
        *provenance_lines(s), *repeat_line(plan), *proof_lines(plan),
        "",
        f"{'cost per step':<28}{'seconds':>14}{'bytes/device':>16}{'count':>7}",
        f"{'  step time' + _step_tag(s):<28}{format_seconds(c['total_s']):>14}",
    ]
    overlapped = c.get("hidden_comm_s", 0.0) > 0 or c.get("exposed_comm_s", 0.0) > 0
    for key, label in (("compute_s", "  compute"), ("redundant_compute_s", "    of it redundant"),
                       ("hidden_comm_s", "  weight traffic, overlapped"),
                       ("exposed_comm_s", "    ... of it not hidden")):
        if key in c and (overlapped or key not in ("hidden_comm_s", "exposed_comm_s")):
            lines.append(f"{label:<28}{format_seconds(c[key]):>14}")
    lines.append(f"{'  communication (all)':<28}{format_seconds(c['bandwidth_s']):>14}"
                 f"{format_bytes(c['bytes_per_device']):>16}")
    if "stage_bytes_per_device" in c:
        lines.append(f"{'    busiest stage, per device':<28}{'':>14}"
                     f"{format_bytes(c['stage_bytes_per_device']):>16}")
    if "bubble_s" in c:
        lines.append(f"{'  pipeline bubble':<28}{format_seconds(c['bubble_s']):>14}")
    for name, v in c["per_axis"].items():
        lines.append(f"{'  axis ' + name:<28}{format_seconds(v['seconds']):>14}"
                     f"{format_bytes(v['bytes']):>16}{v['count']:>7}")
    for name, v in c["per_kind"].items():
        lines.append(f"{'  ' + name:<28}{format_seconds(v['seconds']):>14}"
                     f"{format_bytes(v['bytes']):>16}{v['count']:>7}")
    lines += [
        f"{'estimated step time':<28}{format_seconds(c['step_time_s']):>14}   "
        + ("(this plan under its pipeline schedule: see below)" if plan.pipeline else
           "(compute and communication on the critical path, plus weight traffic not "
           "hidden)"),
        *pipeline_notes(plan),
        "",
        f"precision {plan.training.get('precision', 'fp32')} ({_precision_words(plan)}), "
        f"optimizer {plan.training.get('optimizer')}",
        f"memory per device  {format_bytes(m['per_device_bytes'])} of "
        f"{format_bytes(m['capacity_bytes'])}  (weights+grads+optimizer "
        f"{format_bytes(m['weights_bytes'])}, activations {format_bytes(m['activations_bytes'])}, "
        f"converted inputs {format_bytes(m['converted_inputs_bytes'])}"
        + (f", less {format_bytes(-m['recompute_bytes'])} not kept: recomputed"
           if m.get("recompute_bytes", 0.0) < 0 else "") + ")",
    ]
    return "\n".join(lines)


def _ops_per_stage(plan: Plan) -> str:
    """Operators per pipeline stage (chunk, interleaved) in words. A plan of repeated layers
    places the ops of the program it solved, where one middle stage stands for all of them:
    the others show no op of their own, and the words say so; interleaved, the program's ops
    are counted per pipeline rank (its chunks together)."""
    kind = "chunk" if plan.interleave > 1 else "stage"
    counts = [sum(1 for o in plan.ops if o.stage == k and o.target not in ("param", "input"))
              for k in range(plan.num_chunks)]
    last = len(counts) - 1
    if plan.interleave > 1 and "layers_per_stage" in plan.pipeline:  # by pipeline rank
        k = plan.num_stages
        middle = (f", {counts[1]} (each of pipeline ranks 1..{k - 2}: they share one strategy)"
                  if k > 2 else "")
        return (f"ops per pipeline rank of the solved program, each over its {plan.interleave} "
                f"chunks: {counts[0]}{middle}, {counts[last]}")
    if last > 2 and counts[1] and not any(counts[2:last]):
        return (f"ops per {kind} of the solved program: {counts[0]}, {counts[1]} (each of "
                f"{kind}s 1..{last - 1}: they share one strategy), {counts[last]}")
    return f"ops per {kind}: " + ", ".join(map(str, counts))


def _note(label: str, text: str) -> list[str]:
    """One entry of :func:`pipeline_notes`: ``label``, then ``text`` wrapped beside it."""
    import textwrap

    return textwrap.wrap(text, width=100, initial_indent=f"  {label:<24}",
                         subsequent_indent=" " * 26, break_on_hyphens=False)


def _passes(count: float) -> str:
    """``count`` passes in words ("1 pass", "1.5 passes")."""
    return f"{count:g} pass" + ("" if count == 1 else "es")


def pipeline_notes(plan: Plan) -> list[str]:
    """What each number of a pipelined plan's cost table is, in words (none for a flat plan):
    the stages work side by side, so sums over them may exceed the step; the step time as the
    ILP prices it, the bubble, and the estimate, with why the estimate may be lower."""
    if not plan.pipeline:
        return []
    c = plan.cost
    k, m, v = plan.num_stages, plan.num_microbatches, plan.interleave
    schedule = plan.pipeline.get("schedule", "1F1B") + (" (interleaved)" if v > 1 else "")
    per_mb = c.get("stage_time_s")
    slowest = f" ({format_seconds(per_mb)} per micro-batch)" if per_mb is not None else ""
    stage_devices = plan.num_devices // k
    lines = ["", f"how to read these numbers: the {k} pipeline stages run side by side, each on "
                 f"its own {stage_devices} device{'s' if stage_devices > 1 else ''}"]
    sums = (f"each stage's (one device of each), for all {m} micro-batches, added up: the "
            "stages do this work at the same time, so these may exceed the step time")
    if "layers_per_stage" in plan.pipeline:  # a program of repeated layers: the 1F1B formula
        chunks = f", split over its {v} chunks" if v > 1 else ""
        lines += _note("step time", f"{schedule} as the ILP prices it: the pipeline fills (each "
                       f"stage's time per micro-batch once{chunks}), then {m - 1 / v:g} more "
                       f"passes of the slowest stage{slowest}, plus weight traffic not hidden "
                       "behind compute")
        lines += _note("compute, communication", sums)
        lines += _note("pipeline bubble", f"{_passes((k - 1) / v)} of the slowest stage: how "
                       "long a stage idles while the pipeline fills and drains")
        lines += _note("estimated step time", "the same formula on this plan"
                       + (" (equal to the step time)"
                          if abs(c["step_time_s"] - c["total_s"]) <= 1e-9 * c["total_s"]
                          else ""))
        return lines
    priced = ("the step as the ILP prices it (this plan minimized bytes)"
              if plan.solver.get("objective_kind") == "bytes" else "what the ILP minimizes")
    lines += _note("step time", f"{priced} for a pipeline staged operator by "
                   f"operator: every stage's compute and communication for all {m} "
                   "micro-batches, added as if one device ran them in turn, plus the transfers "
                   "between stages and the bubble below (a linear stand-in for the schedule, "
                   "with the stages' FLOPs balanced by --balance-eps)")
    lines += _note("compute, communication", sums)
    lines += _note("pipeline bubble", f"an estimate of {k - 1} forward and backward "
                   f"pass{'es' if k > 2 else ''} of "
                   "one micro-batch through an average stage at peak FLOP/s")
    lower = c["step_time_s"] < c["total_s"] * (1 - 1e-9)
    lines += _note("estimated step time", f"this plan under {schedule}: {m + k - 1} passes of "
                   f"its slowest stage{slowest}, one per micro-batch and {k - 1} while the "
                   "pipeline fills and drains, plus the weight-gradient reductions once per step"
                   + ("; lower than the step time because the stages work at the same time"
                      if lower else ""))
    return lines


def _precision_words(plan: Plan) -> str:
    """What the plan's precision counts, in words (a file without one was costed in fp32)."""
    if plan.training.get("precision", "fp32") == "bf16":
        return ("activations, weights as used and gradients in 2 B; fp32 master weights and "
                "optimizer states")
    return "every tensor at its captured size"


def explain(plan: Plan, name: str) -> str:
    """One node's placements in words."""
    o = plan.op(name)
    ins = ", ".join("·".join(i.values()) for i in o.ins)
    stage = f"stage {o.stage} " if plan.pipeline else ""
    return f"{stage}{o.name} [{o.target}]: ({ins}) -> {'·'.join(o.out.values())}"


def diff(a: Plan, b: Plan) -> list[str]:
    """Nodes whose placements differ between two plans of the same model."""
    out = []
    for o in a.ops:
        if o.name in b._by_name and (b.op(o.name).out, b.op(o.name).ins) != (o.out, o.ins):
            out.append(f"{explain(a, o.name)}  vs  {explain(b, o.name)}")
    return out
