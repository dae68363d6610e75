"""``autoddl show``: a plan's placements and stages per layer, its costs, and a plot.

Plans of repeated layers name representatives (``first/7``, ``mid/7``, ``s0.last/7``): the table
groups operators by the layer they stand for and says how many real layers each group is.
"""

from __future__ import annotations

from pathlib import Path

from autoddl.engine.plan import OpPlacement, Plan, format_bytes

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
    if v > 1:  # a pipeline rank's layers, its v chunks k, k+K, ... in execution order
        where = where.replace("stages", "pipeline ranks").replace("stage", "pipeline rank")
        return f"{where}, {what} of {n} per rank ({v} chunks of {n // v}, interleaved)"
    return f"{where}, {what} of {n} per stage"


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
        rows.append([str(o.stage) if plan.pipeline else "", o.name, o.module or "—", target,
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
    """Each stage's (chunk's) title and ops, in graph order. A plan of repeated layers solved
    one middle stage for all: the other middle stages show its ops, titled as sharing them."""
    kind = "chunk" if plan.interleave > 1 else "stage"
    ops = [o for o in plan.ops if o.target not in _LEAVES]
    rows = [(f"{kind} {k}", [o for o in ops if o.stage == k]) for k in range(plan.num_chunks)]
    last = len(rows) - 1
    if last > 2 and rows[1][1] and not any(r for _, r in rows[2:last]):
        rows[2:last] = [(f"{kind} {k} (as {kind} 1)", rows[1][1]) for k in range(2, last)]
    return rows


def _plot_stages(plan: Plan, ax) -> None:
    """One band per pipeline stage (chunk): a bar per operator, in graph order within the stage,
    coloured by its output's placement; the start of each module is labelled where legible."""
    rows = _stage_rows(plan)
    widest = max(len(r) for _, r in rows) or 1
    named = widest <= 400 and not plan.model.get("repeat")  # representatives: no real names
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
    ax.set_xlabel("operator within the stage (graph order)"
                  + ("; a plan of repeated layers shows its representatives"
                     if plan.model.get("repeat") else ""))
    for name, colour in _PLACED.items():
        ax.bar(0, 0, color=colour, label=f"output {name}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _plot_ops(plan: Plan, ax) -> None:
    """A bar per operator: its communication per step, in graph order, labelled by module and
    operator where legible, coloured by stage; repeated-layer groups marked."""
    import matplotlib.pyplot as plt

    per_op = plan.cost.get("per_op", {})
    ops = [o for o in plan.ops if o.target not in _LEAVES]
    colors = plt.get_cmap("tab10")
    heights = [per_op.get(o.name, {}).get("seconds", 0.0) * 1e3 for o in ops]
    ax.bar(range(len(ops)), heights, color=[colors(o.stage % 10) for o in ops], width=0.8)
    last = None
    for i, o in enumerate(ops):
        g = group_of(o.name)
        if g != last and g:
            ax.axvline(i - 0.5, color="grey", lw=0.5, ls=":")
            ax.text(i - 0.4, 0.97, g, transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", rotation=90, color="grey")
        last = g
    if len(ops) <= 120:
        ax.set_xticks(range(len(ops)), [_label(o) for o in ops], rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(ops) - 0.4)
    ax.set_xlabel("operator (graph order)" + ("" if len(ops) <= 120 else "; too many to name"))
    ax.set_ylabel("communication per step (ms)")


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
        fig, ax = plt.subplots(figsize=(min(30.0, max(8.0, 0.12 * n + 2)),
                                        6.5 if n <= 120 else 4.5))
        _plot_ops(plan, ax)
    kinds = ", ".join(f"{k} {v['seconds'] * 1e3:.3g} ms" for k, v in plan.cost["per_kind"].items())
    stages = (f", {plan.num_stages} stages" + (f" × {plan.interleave} chunks"
                                               if plan.interleave > 1 else "")
              ) if plan.pipeline else ""
    mesh = " × ".join(f"{a['name']}={a['size']}" for a in plan.mesh["axes"])
    ax.set_title(f"{plan.model['spec']} on {plan.cluster.get('spec') or plan.cluster['name']}: "
                 f"mesh {mesh}{stages}\n{kinds or 'no collectives'}", fontsize=9)
    save_figure(fig, path)
