"""``autoddl show``: a plan's placements and stages per layer, its costs, and a plot.

Plans of repeated layers name representatives (``first/7``, ``mid/7``, ``s0.last/7``): the table
groups operators by the layer they stand for and says how many real layers each group is.
"""

from __future__ import annotations

from pathlib import Path

from autoddl.engine.plan import OpPlacement, Plan, format_bytes
from autoddl.engine.repeat import layer_set_text, represented_layers

_LEAVES = ("param", "input")


def group_of(name: str) -> str:
    """The representative group of a node name ("" for plans without repeated layers)."""
    return name.split("/")[0] if "/" in name else ""


def group_title(plan: Plan, group: str) -> str:
    """What a group of a plan of repeated layers stands for, in words."""
    rep = plan.model.get("repeat")
    if not group or rep is None:
        return ""
    layers = int(rep["layers"])
    if group == "pre":
        return "before the layers"
    if group == "post":
        return "after the layers"
    if "." not in group:  # unpipelined: first, mid (L-2 alike), last
        return {"first": "layer 0", "last": f"layer {layers - 1}",
                "mid": f"layers 1–{layers - 2} (one shown, {layers - 2} alike)"}.get(group, group)
    stage, tag = group.split(".")
    k = plan.num_stages
    n = layers // k
    where = {"s0": "stage 0", "sl": f"stage {k - 1}",
             "sm": f"stages 1–{k - 2} (one shown, {k - 2} alike)"}.get(stage, stage)
    what = {"first": "first layer", "last": "last layer",
            "mid": f"middle layers (one shown, {n - 2} alike)"}.get(tag, f"layer {tag[1:]}")
    v = plan.interleave
    real = represented_layers(group, layers, k, v)
    which = (f": layer{'s' if len(real) > 1 else ''} {layer_set_text(real).strip('{}')}"
             if real else "")
    if v > 1:  # a pipeline rank's layers, its v chunks k, k+K, ... in execution order
        where = where.replace("stages", "pipeline ranks").replace("stage", "pipeline rank")
        return f"{where}, {what} of {n} per rank ({v} chunks of {n // v}, interleaved){which}"
    return f"{where}, {what} of {n} per stage{which}"


def op_chunks(plan: Plan, o: OpPlacement) -> list[int]:
    """The pipeline stages (model chunks, interleaved) op ``o`` runs in: its own, or for a
    representative of a pipelined program, those of every real layer it stands for."""
    rep = plan.model.get("repeat")
    if rep and plan.pipeline and "layers_per_stage" in plan.pipeline:
        layers = int(rep["layers"])
        real = represented_layers(group_of(o.name), layers, plan.num_stages, plan.interleave)
        if real:
            from autoddl.engine.programs import stage_of_real_block

            return sorted({stage_of_real_block(i, layers, plan.num_stages, plan.interleave)[0]
                           for i in real})
    return [o.stage]


def stage_text(plan: Plan, o: OpPlacement) -> str:
    """:func:`op_chunks` in words: ``2``, ``1..3``, ``1,2``."""
    return layer_set_text(op_chunks(plan, o)).strip("{}")


def _pl(d: dict[str, str] | None) -> str:
    return "—" if d is None else "·".join(d.values())


def layer_table(plan: Plan, params: bool = False) -> str:
    """Each operator's stage, placements (inputs → output) and communication, grouped by the
    layer it stands for."""
    per_op = plan.cost.get("per_op", {})
    rows: list[list[str]] = []
    last = None
    for o in plan.ops:
        if o.target in _LEAVES and not params:
            continue
        g = group_of(o.name)
        if g != last:
            title = group_title(plan, g)
            if title:
                rows.append([f"-- {title}"])
            last = g
        comm = per_op.get(o.name)
        target = o.target.removeprefix("aten.").removesuffix(".default")
        ins = ", ".join(_pl(i) for i in o.ins)
        zero = f" ZeRO-{o.zero}" if o.zero else ""
        rows.append([stage_text(plan, o) if plan.pipeline else "", o.name, o.module or "—",
                     target,
                     f"({ins}) -> {_pl(o.out)}{zero}",
                     format_bytes(comm["bytes"]) if comm else ""])
    head = ["stage" if plan.pipeline else "", "node", "module", "op", "placements (in) -> out",
            "comm./device"]
    body = [head] + [r for r in rows if len(r) > 1]
    widths = [max(len(r[i]) for r in body) for i in range(len(head))]
    out = []
    for r in [head] + rows:
        if len(r) == 1:
            out.append(r[0])
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def _label(o: OpPlacement) -> str:
    """A bar's label: the op's module path and its operator (``blocks.0.qkv linear``)."""
    target = o.target.removeprefix("aten.").removesuffix(".default")
    return f"{o.module} {target}" if o.module else target


#: bar colours of the stage plot, by the op's output placement
_PLACED = {"sharded": "tab:blue", "partial sums": "tab:orange", "replicated": "tab:grey"}


def _placed(o: OpPlacement) -> str:
    """How an op's output is placed across the mesh, in words (a key of :data:`_PLACED`)."""
    values = list(o.out.values())
    if any(v.startswith("P") for v in values):
        return "partial sums"
    return "sharded" if any(v.startswith("S") for v in values) else "replicated"


def _stage_rows(plan: Plan) -> list[tuple[str, list[OpPlacement]]]:
    """Each stage's (chunk's) title and ops, in graph order; a representative of a plan of
    repeated layers appears in the row of every stage its layers run in."""
    kind = "chunk" if plan.interleave > 1 else "stage"
    rows: list[tuple[str, list[OpPlacement]]] = [(f"{kind} {k}", [])
                                                 for k in range(plan.num_chunks)]
    for o in plan.ops:
        if o.target not in _LEAVES:
            for k in op_chunks(plan, o):
                rows[k][1].append(o)
    return rows


def _plot_stages(plan: Plan, ax) -> None:
    """One band per pipeline stage (chunk): a bar per operator, in graph order within the stage,
    coloured by its output's placement; the start of each module is labelled where legible."""
    rows = _stage_rows(plan)
    widest = max(len(r) for _, r in rows) or 1
    named = widest <= 400
    for k, (_, ops) in enumerate(rows):
        ax.broken_barh([(i, 0.9) for i in range(len(ops))], (k - 0.4, 0.8),
                       facecolors=[_PLACED[_placed(o)] for o in ops])
        last = None
        for i, o in enumerate(ops):
            layer = o.module.rsplit(".", 1)[0] if o.module.count(".") > 1 else o.module
            if named and layer and layer != last:
                ax.text(i, k + 0.41, layer, fontsize=6, va="top", clip_on=True)
            last = layer
    ax.set_yticks(range(len(rows)), [t for t, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlim(-0.5, widest + 0.5)
    rep = plan.model.get("repeat")
    ax.set_xlabel("operator within the stage (graph order)"
                  + (f"; a layer named {rep['container']}.{{i..j}} stands for those alike"
                     if rep and any("{" in o.module for o in plan.ops) else ""))
    for name, colour in _PLACED.items():
        ax.bar(0, 0, color=colour, label=f"output {name}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


#: a flat plot names every operator up to this many (beyond, the first of each module)
MAX_NAMED_OPS = 300


def _axis_placed(value: str) -> str:
    """How one mesh axis places a tensor (``S(1)``, ``B``, ``P``), in words (a key of
    :data:`_PLACED`)."""
    return ("partial sums" if value.startswith("P") else
            "sharded" if value.startswith("S") else "replicated")


def _op_ticks(ops: list[OpPlacement]) -> tuple[list[float], list[str]]:
    """The flat plot's row labels: every operator's module and operator where they fit, else the
    first operator of each module."""
    if len(ops) <= MAX_NAMED_OPS:
        return [i + 0.5 for i in range(len(ops))], [_label(o) for o in ops]
    ticks, names, last = [], [], None
    for i, o in enumerate(ops):
        if o.module and o.module != last:
            ticks.append(i + 0.5)
            names.append(o.module)
        last = o.module or last
    return ticks, names


def _plot_ops(plan: Plan, fig) -> None:
    """A flat plan: a row per operator in graph order, named by module and operator; per mesh
    axis a cell coloured by how that axis places the operator's output (the placement written
    in it where legible); beside it the operator's communication per step; groups of a plan of
    repeated layers titled."""
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    ops = [o for o in plan.ops if o.target not in _LEAVES]
    axes = plan.mesh["axes"]
    grid, bars = fig.subplots(1, 2, sharey=True, gridspec_kw={
        "width_ratios": [0.45 * len(axes) + 0.2, 3.0]})
    written = len(ops) <= MAX_NAMED_OPS
    for i, o in enumerate(ops):
        for j, a in enumerate(axes):
            value = o.out.get(a["name"], "B")
            grid.add_patch(Rectangle((j, i), 1, 1, facecolor=_PLACED[_axis_placed(value)],
                                     edgecolor="white", linewidth=1.0))
            if written:
                grid.text(j + 0.5, i + 0.5, value, ha="center", va="center", fontsize=6,
                          color="white")
    grid.set_xlim(0, len(axes))
    grid.set_ylim(len(ops), 0)
    grid.xaxis.tick_top()
    grid.set_xticks([j + 0.5 for j in range(len(axes))],
                    [f"{a['name']}={a['size']}" for a in axes], fontsize=7)
    grid.set_yticks(*_op_ticks(ops), fontsize=6)
    grid.set_xlabel("output placement\nper mesh axis", fontsize=7)
    per_op = plan.cost.get("per_op", {})
    bars.barh([i + 0.5 for i in range(len(ops))],
              [per_op.get(o.name, {}).get("seconds", 0.0) * 1e3 for o in ops],
              height=0.8, color="tab:purple")
    bars.set_xlabel("communication per step (ms)", fontsize=8)
    bars.tick_params(axis="y", left=False)
    across = blended_transform_factory(bars.transAxes, bars.transData)
    last = None
    for i, o in enumerate(ops):
        g = group_of(o.name)
        if g != last and g:
            for ax in (grid, bars):
                ax.axhline(i, color="black", lw=0.6)
            bars.text(0.99, i + 0.1, group_title(plan, g) or g, transform=across, ha="right",
                      va="top", fontsize=7, color="dimgrey")
        last = g
    short = {"sharded": "S(d): split along dim d", "partial sums": "P", "replicated": "B"}
    bars.legend([Rectangle((0, 0), 1, 1, color=c) for c in _PLACED.values()],
                [f"{k} ({short[k]})" for k in _PLACED], loc="lower right", fontsize=7, ncol=3,
                bbox_to_anchor=(1.0, 1.0), frameon=False)


def plot_plan(plan: Plan, path: str | Path) -> None:
    """A plan as a picture. Pipelined: one band per stage (chunk, interleaved) with its
    operators and their placements. Otherwise: per-operator communication per step, each
    operator named. The title gives the mesh and the plan's cost by collective kind."""
    from autoddl.engine.compare import pyplot, save_figure

    plt = pyplot()
    n = sum(1 for o in plan.ops if o.target not in _LEAVES)
    if plan.pipeline:
        widest = max(len(r) for _, r in _stage_rows(plan))
        fig, ax = plt.subplots(figsize=(min(30.0, max(8.0, 0.08 * widest + 3)),
                                        1.0 + 0.6 * plan.num_chunks + 1.0))
        _plot_stages(plan, ax)
    else:
        fig = plt.figure(figsize=(9.0, 2.2 + (0.14 * n if n <= MAX_NAMED_OPS else 40.0)))
        _plot_ops(plan, fig)
    kinds = ", ".join(f"{k} {v['seconds'] * 1e3:.3g} ms" for k, v in plan.cost["per_kind"].items())
    stages = (f", {plan.num_stages} stages" + (f" × {plan.interleave} chunks"
                                               if plan.interleave > 1 else "")
              ) if plan.pipeline else ""
    mesh = " × ".join(f"{a['name']}={a['size']}" for a in plan.mesh["axes"])
    fig.suptitle(f"{plan.model['spec']} on {plan.cluster.get('spec') or plan.cluster['name']}: "
                 f"mesh {mesh}{stages}\n{kinds or 'no collectives'}", fontsize=9)
    save_figure(fig, path)
