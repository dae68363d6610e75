"""Checks of a plan file's contents, so a hand-edited or damaged plan is refused with one line
naming the field and the fix, before anything is launched or printed.

What is checked (:func:`check_plan_data`): the top-level fields and their types; the mesh (axis
names unique, sizes positive integers, the device count within the cluster limit); the pipeline
(stages and micro-batches positive, a known schedule); the optimizer; every op's placements (one
entry per mesh axis, each ``B``, ``P`` or ``S(d)`` with a small non-negative ``d``, or ``S(d)^k``
nested inside k of the later axes splitting ``d``), its stage
within the pipeline and its ZeRO level; and every number of the cost, memory and solver records
(finite, non-negative where a count or size). A placement's dim against the tensor's rank needs
the model's graph: the runtime checks that when it captures the model
(:func:`autoddl.engine.repeat.match_plan`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from autoddl.errors import UserError

_PLACEMENT = re.compile(r"^(B|P|S\((\d{1,2})\)(\^[1-9])?)$")
#: tensors of more dims than this do not occur in the models autoddl plans
MAX_DIMS = 16
SCHEDULES = ("1F1B", "GPipe")
#: the ops fields a plan names, with their JSON types
_TOP = {"model": dict, "cluster": dict, "mesh": dict, "training": dict, "ops": list,
        "cost": dict, "memory": dict, "solver": dict}
_COST_NUMBERS = ("total_s", "bandwidth_s", "redundant_compute_s", "step_time_s",
                 "bytes_per_device")
#: cost entries a plan may lack (older versions) but that must be numbers where present
_OPTIONAL_COST_NUMBERS = ("stage_bytes_per_device", "compute_s", "hidden_comm_s",
                          "exposed_comm_s", "bubble_s", "stage_time_s")
_MEMORY_NUMBERS = ("weights_bytes", "activations_bytes", "converted_inputs_bytes",
                   "per_device_bytes", "capacity_bytes")


def _bad(field: str, why: str) -> UserError:
    return UserError(f"plan file is malformed: {field} {why}; re-run `autoddl plan` to "
                     "regenerate it")


def _count(value: Any, field: str, minimum: int = 0) -> int:
    """``value`` as an integer of at least ``minimum`` (a JSON int, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"is {value!r}, not an integer")
    if value < minimum:
        raise _bad(field, f"is {value}, below {minimum}")
    return value


def _number(value: Any, field: str, nonnegative: bool = True) -> float:
    """``value`` as a finite number (non-negative unless told)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, f"is {value!r}, not a number")
    if not math.isfinite(value):
        raise _bad(field, f"is {value!r}, not a finite number")
    if nonnegative and value < 0:
        raise _bad(field, f"is {value!r}, below 0")
    return float(value)


def _mapping(data: Mapping[str, Any], key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise _bad(f"{where}.{key}", f"is {type(value).__name__}, not an object")
    return value


def check_placement(value: Any, field: str) -> None:
    """One axis's placement: ``B``, ``P``, ``S(d)`` with ``d < MAX_DIMS``, or ``S(d)^k``
    (an order mark, 1 <= k <= 9)."""
    m = _PLACEMENT.match(value) if isinstance(value, str) else None
    if m is None or (m.group(2) is not None and int(m.group(2)) >= MAX_DIMS):
        raise _bad(field, f"is {value!r}; a placement is 'B', 'P', 'S(d)' or 'S(d)^k' with a "
                          f"tensor dim d below {MAX_DIMS}")


def _check_axes_map(value: Any, axes: list[str], field: str) -> None:
    """A placement per mesh axis, keyed by the axis names."""
    if not isinstance(value, dict):
        raise _bad(field, f"is {type(value).__name__}, not an object of placements by axis")
    if list(value) != axes:
        raise _bad(field, f"names axes {list(value)}; the mesh's axes are {axes}")
    for axis, p in value.items():
        check_placement(p, f"{field}[{axis!r}]")
    from autoddl.engine.placements import marks_valid

    if not marks_valid(tuple(value.values())):
        raise _bad(field, f"is {value}; an order mark S(d)^k needs k later axes splitting d "
                          "(k of them nest outside it)")


def _check_mesh(data: Mapping[str, Any]) -> list[str]:
    """The mesh's axis names (unique), sizes positive."""
    axes = _mapping(data, "mesh", "plan").get("axes")
    if not isinstance(axes, list) or not axes:
        raise _bad("mesh.axes", "is not a non-empty list")
    names = []
    for i, ax in enumerate(axes):
        if not isinstance(ax, dict) or not isinstance(ax.get("name"), str) or not ax["name"]:
            raise _bad(f"mesh.axes[{i}]", "has no axis name")
        _count(ax.get("size"), f"mesh.axes[{i}].size", 1)
        _number(ax.get("bandwidth_gbps"), f"mesh.axes[{i}].bandwidth_gbps")
        names.append(ax["name"])
    if len(set(names)) != len(names):
        raise _bad("mesh.axes", f"repeats an axis name ({names})")
    return names


def _check_pipeline(data: Mapping[str, Any], axes: list[str]) -> tuple[int, int]:
    """(pipeline stages, model chunks: stages × interleave); (1, 1) without a pipeline."""
    pipe = data.get("pipeline")
    if pipe is None:
        return 1, 1
    if not isinstance(pipe, dict):
        raise _bad("pipeline", "is not an object or null")
    stages = _count(pipe.get("stages"), "pipeline.stages", 1)
    microbatches = _count(pipe.get("microbatches"), "pipeline.microbatches", 1)
    v = _count(pipe.get("interleave", 1), "pipeline.interleave", 1)
    if v > 1 and pipe.get("schedule", "1F1B") != "1F1B":
        raise _bad("pipeline.interleave", f"is {v} under {pipe.get('schedule')}: interleaving "
                                          "runs under 1F1B only")
    if v > 1 and microbatches % stages:
        raise _bad("pipeline.interleave", f"is {v} with {microbatches} micro-batches, not a "
                                          f"multiple of the {stages} stages")
    if not isinstance(pipe.get("schedule", "1F1B"), str) or pipe.get("schedule", "1F1B") \
            not in SCHEDULES:
        raise _bad("pipeline.schedule", f"is {pipe.get('schedule')!r}; use one of {SCHEDULES}")
    axis = pipe.get("axis")
    if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
        raise _bad("pipeline.axis", "has no axis name")
    if axis["name"] in axes:
        raise _bad("pipeline.axis", f"repeats the mesh axis {axis['name']!r}")
    _number(axis.get("bandwidth_gbps"), "pipeline.axis.bandwidth_gbps")
    return stages, stages * v


def _check_op(o: Any, i: int, axes: list[str], stages: int) -> None:
    where = f"ops[{i}]"
    if not isinstance(o, dict):
        raise _bad(where, "is not an object")
    for key in ("name", "target"):
        if not isinstance(o.get(key), str) or not o[key]:
            raise _bad(f"{where}.{key}", "is not a non-empty string")
    where = f"op {o['name']!r}"
    _check_axes_map(o.get("out"), axes, f"{where} out")
    for key in ("in", "grad"):
        if not isinstance(o.get(key, []), list):
            raise _bad(f"{where} {key}", "is not a list")
    for j, p in enumerate(o.get("in", [])):
        _check_axes_map(p, axes, f"{where} in[{j}]")
    for j, p in enumerate(o.get("grad", [])):
        if p is not None:
            _check_axes_map(p, axes, f"{where} grad[{j}]")
    stage = _count(o.get("stage", 0), f"{where} stage")
    if stage >= stages:
        raise _bad(f"{where} stage", f"is {stage}; the plan has {stages} stage(s) (model "
                                     "chunks when interleaved)")
    _count(o.get("zero", 0), f"{where} zero")
    if not isinstance(o.get("module", ""), str):
        raise _bad(f"{where} module", "is not a string")


def _check_numbers(data: Mapping[str, Any]) -> None:
    cost = _mapping(data, "cost", "plan")
    for key in _COST_NUMBERS:
        _number(cost.get(key), f"cost.{key}")
    for key in _OPTIONAL_COST_NUMBERS:  # written by newer versions, read by the summary
        if key in cost:
            _number(cost[key], f"cost.{key}")
    for table in ("per_axis", "per_kind"):
        rows = cost.get(table)
        if not isinstance(rows, dict):
            raise _bad(f"cost.{table}", "is not an object")
        for name, row in rows.items():
            if not isinstance(row, dict):
                raise _bad(f"cost.{table}.{name}", "is not an object")
            for key in ("seconds", "bytes"):
                _number(row.get(key), f"cost.{table}.{name}.{key}")
            _count(row.get("count"), f"cost.{table}.{name}.count")
    memory = _mapping(data, "memory", "plan")
    for key in _MEMORY_NUMBERS:
        _number(memory.get(key), f"memory.{key}")
    solver = _mapping(data, "solver", "plan")
    for key in ("backend", "status"):
        if not isinstance(solver.get(key), str):
            raise _bad(f"solver.{key}", "is not a string")
    _number(solver.get("objective"), "solver.objective")
    from autoddl.engine.objectives import DEFAULT_OBJECTIVE, OBJECTIVES

    kind = solver.get("objective_kind", DEFAULT_OBJECTIVE)
    if kind not in OBJECTIVES:
        raise _bad("solver.objective_kind", f"is {kind!r}, not one of {', '.join(OBJECTIVES)}")
    for key in ("gap", "bound", "time_s"):
        if solver.get(key) is not None:
            _number(solver[key], f"solver.{key}", nonnegative=key != "bound")


def check_plan_data(data: Mapping[str, Any]) -> None:
    """Raise :class:`UserError` naming the first malformed field of a plan file's data."""
    from autoddl.engine.cluster import MAX_DEVICES
    from autoddl.engine.costs import OPTIMIZER_STATES, RECOMPUTE
    from autoddl.engine.recompute import LAYER_MODES

    for key, kind in _TOP.items():
        if not isinstance(data.get(key), kind):
            raise _bad(key, f"is missing or not a JSON {'object' if kind is dict else 'list'}")
    cluster = data["cluster"]
    if not isinstance(cluster.get("name"), str) or not isinstance(cluster.get("spec", ""), str):
        raise _bad("cluster.name", "is not a string")
    model = data["model"]
    if not isinstance(model.get("spec"), str) or not model["spec"].strip():
        raise _bad("model.spec", "is not a model spec string")
    if not isinstance(model.get("graph_hash"), str):
        raise _bad("model.graph_hash", "is missing or not a string")
    for key in ("num_params", "num_ops"):
        _count(model.get(key), f"model.{key}")
    axes = _check_mesh(data)
    stages, chunks = _check_pipeline(data, axes)
    devices = stages * math.prod(int(a["size"]) for a in data["mesh"]["axes"])
    if devices > MAX_DEVICES:
        raise _bad("mesh", f"spans {devices:,} devices, more than {MAX_DEVICES:,}")
    optimizer = data["training"].get("optimizer")
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZER_STATES:
        raise _bad("training.optimizer", f"is {optimizer!r}; autoddl trains with one of "
                                         f"{', '.join(OPTIMIZER_STATES)}")
    if data["training"].get("recompute", "none") not in RECOMPUTE + (None,):
        raise _bad("training.recompute", f"is not one of {', '.join(RECOMPUTE)}")
    per_layer = data["training"].get("recompute_layers")
    if per_layer is not None and (not isinstance(per_layer, list) or any(
            m not in LAYER_MODES for m in per_layer)):
        raise _bad("training.recompute_layers", "is not a list of 'none', 'selective' or "
                                                "'full' (one per repeated layer)")
    if data["training"].get("precision", "fp32") not in ("fp32", "bf16"):
        raise _bad("training.precision", "is not 'fp32' or 'bf16' (a file without it was "
                                         "costed in fp32)")
    for i, o in enumerate(data["ops"]):
        _check_op(o, i, axes, chunks)
    _check_numbers(data)


def check_against_graph(plan: Any, graph: Any) -> None:
    """Raise :class:`UserError` unless ``plan`` (written out for every node) places each node of
    ``graph``, every placement splits dims the tensor has into pieces the product of the sizes
    of the axes splitting each dim divides (nested splits allowed), and every operator reads
    and writes by one of its legal signatures (a hand-edited plan could otherwise run and
    compute something else)."""
    from autoddl.engine.placements import is_valid, parse_placement

    axes, mesh = plan.axis_names, plan.mesh_shape
    legal: dict = {}
    names = {o.name for o in plan.ops}
    missing = [n.name for n in graph.nodes if n.name not in names]
    if missing:
        raise _bad("ops", f"do not place {missing[0]!r} (and {len(missing) - 1} more) of "
                          "this model's graph")
    for o in plan.ops:
        if o.name not in graph:
            raise _bad(f"op {o.name!r}", "is not in this model's graph")
        node = graph[o.name]
        tensors = [("out", node.out.shape, o.out)]
        tensors += [(f"in[{j}]", graph[src].out.shape, p)
                    for j, (src, p) in enumerate(zip(node.inputs, o.ins))]
        for where, shape, placement in tensors:
            if not is_valid(parse_placement(placement, axes), shape, mesh):
                raise _bad(f"op {o.name!r} {where}", f"places a tensor of shape {list(shape)} "
                           f"as {placement} on mesh {dict(zip(axes, mesh))}: a split dim is "
                           "missing or not divisible by the product of its axes' sizes, or "
                           "an order mark is out of range")
        if node.kind == "op":
            _check_signature(o, node, graph, axes, mesh, legal)


def _check_signature(o: Any, node: Any, graph: Any, axes: list[str], mesh: tuple[int, ...],
                     legal: dict) -> None:
    """Raise unless op ``o`` reads and writes its tensors by one of its node's legal
    signatures (``legal`` caches them per kind of node: repeated layers share them)."""
    from autoddl.engine.placements import parse_placement
    from autoddl.engine.mesh_signatures import signatures

    key = (node.target, node.args, node.kwargs, node.out,
           tuple((graph[i].out, graph[i].requires_grad) for i in node.inputs))
    try:
        hash(key)
    except TypeError:
        key = None
    sigs = legal.get(key) if key is not None else None
    if sigs is None:
        sigs = {(s.ins, s.out) for s in signatures(node, graph, mesh)}
        if key is not None:
            legal[key] = sigs
    mine = (tuple(parse_placement(p, axes) for p in o.ins), parse_placement(o.out, axes))
    if mine not in sigs:
        raise _bad(f"op {o.name!r}", f"reads {list(o.ins)} and writes {o.out}, which is not a "
                   f"legal placement (sharding signature) of {node.target} on mesh "
                   f"{dict(zip(axes, mesh))}")
