"""``autoddl show``: a plan's placements and stages per layer, its costs, and a plot.

Plans of repeated layers name representatives (``first/7``, ``mid/7``, ``s0.last/7``): the table
groups operators by the layer they stand for and says how many real layers each group is.
"""

from __future__ import annotations

from pathlib import Path

from autoddl.engine.plan import Plan, format_bytes

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


def plot_plan(plan: Plan, path: str | Path) -> None:
    """Per-operator communication per step (bars coloured by pipeline stage, or model chunk when
    interleaved; repeated-layer groups marked), with the plan's cost by collective kind in the title."""
    from autoddl.engine.compare import pyplot, save_figure

    plt = pyplot()
    per_op = plan.cost.get("per_op", {})
    ops = [o for o in plan.ops if o.target not in _LEAVES]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(ops) + 2), 4.5))
    colors = plt.get_cmap("tab10")
    heights = [per_op.get(o.name, {}).get("seconds", 0.0) * 1e3 for o in ops]
    ax.bar(range(len(ops)), heights, color=[colors(o.stage % 10) for o in ops], width=0.8)
    last = None
    for i, o in enumerate(ops):
        g = group_of(o.name)
        if g != last and g:
            ax.axvline(i - 0.5, color="grey", lw=0.5, ls=":")
            ax.text(i - 0.4, ax.get_ylim()[1] * 0.97 if any(heights) else 0.97, g,
                    fontsize=7, va="top", rotation=90, color="grey")
        last = g
    ax.set_xlabel("operator (graph order)")
    ax.set_ylabel("communication per step (ms)")
    kinds = ", ".join(f"{k} {v['seconds'] * 1e3:.3g} ms" for k, v in plan.cost["per_kind"].items())
    stages = (f", {plan.num_stages} stages" + (f" × {plan.interleave} chunks"
                                               if plan.interleave > 1 else "") + " (colours)"
              ) if plan.pipeline else ""
    mesh = " × ".join(f"{a['name']}={a['size']}" for a in plan.mesh["axes"])
    ax.set_title(f"{plan.model['spec']} on {plan.cluster.get('spec') or plan.cluster['name']}: "
                 f"mesh {mesh}{stages}\n{kinds or 'no collectives'}", fontsize=9)
    save_figure(fig, path)
