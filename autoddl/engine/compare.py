"""``autoddl compare``: the ILP's plan beside every baseline, all under one cost model.

One :class:`Row` per method: its configuration (mesh, or Megatron's (t, p, d)), total cost per
step (the ILP's objective: the predicted step time), bandwidth cost, bytes
per mesh axis, peak memory per device, estimated step time, search time, and the ratio of its
cost to the ILP plan's. A baseline that does not fit memory keeps its row, marked "does not fit:
needs X per device"; one that does not apply says why.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autoddl.engine.baselines import ZERO_METHODS, Outcome, data_parallel, fit_note, fits
from autoddl.engine.baselines import megatron_tp_dp, ptdp_grid
from autoddl.engine.objectives import DEFAULT_OBJECTIVE
from autoddl.engine.plan import Plan, format_bytes, format_seconds
from autoddl.engine.search import alpa, coordinate_descent, greedy
from autoddl.engine.workload import Workload
from autoddl.errors import InfeasibleError, UserError

ILP = "ILP (autoddl)"


@dataclass
class Row:
    """One method's line of the comparison."""

    method: str
    config: str = ""
    total_s: float | None = None
    bandwidth_s: float | None = None
    bytes_per_axis: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: float | None = None
    step_time_s: float | None = None
    search_s: float = 0.0
    ratio: float | None = None
    fits: bool = False
    note: str = ""
    #: the step's compute and its weight traffic not hidden behind compute (seconds)
    compute_s: float | None = None
    exposed_comm_s: float | None = None

    @property
    def applicable(self) -> bool:
        """Whether the method produced a plan."""
        return self.total_s is not None


def plan_label(plan: Plan) -> str:
    """A plan's mesh as in the planner's candidate list: "x4·y2", "pp2 × x8" or, interleaved,
    "pp2·v3 × x8"."""
    mesh = "·".join(f"{a['name']}{a['size']}" for a in plan.mesh["axes"])
    v = f"·v{plan.interleave}" if plan.interleave > 1 else ""
    return f"pp{plan.num_stages}{v} × {mesh}" if plan.pipeline else mesh


def row_of(o: Outcome) -> Row:
    """The row of one outcome (ratio filled in later)."""
    if o.plan is None:
        return Row(o.method, o.config, search_s=o.search_s, note=o.note)
    c, m = o.plan.cost, o.plan.memory
    return Row(o.method, o.config or plan_label(o.plan), c["total_s"], c["bandwidth_s"],
               {a: v["bytes"] for a, v in c["per_axis"].items()}, m["per_device_bytes"],
               c["step_time_s"], o.search_s, None, fits(o.plan), o.note or fit_note(o.plan),
               c.get("compute_s"), c.get("exposed_comm_s"))


def ilp_outcomes(work: Workload, backend: str | None, time_limit_s: float | None,
                 objective: str = DEFAULT_OBJECTIVE) -> tuple[Outcome, Outcome]:
    """(the ILP's plan over every candidate, its best unpipelined plan): the second is Alpa's
    K = 1, the intra-op ILP alone; both minimize ``objective``
    (:mod:`autoddl.engine.objectives`)."""
    from autoddl.engine.planner import plan_graph

    def solve(stages: int | None) -> Outcome:
        t0 = time.perf_counter()
        try:
            plan = plan_graph(work.graph, work.cluster, model_spec=work.spec_text,
                              backend=backend, time_limit_s=time_limit_s, config=work.config,
                              microbatch_graph=work.microbatch_graph if stages != 1 else None,
                              microbatches=work.microbatches, stages=stages,
                              balance_eps=work.balance_eps, layers=work.layers,
                              objective=objective)
        except InfeasibleError as exc:  # no plan fits: the baselines still get their rows
            return Outcome(ILP, "", None, time.perf_counter() - t0, f"does not fit: {exc}")
        return Outcome(ILP, plan_label(plan), plan, time.perf_counter() - t0)

    best = solve(None)
    flat = best if best.plan is None or best.plan.pipeline is None else solve(1)
    return best, Outcome("Alpa-style (DP + ILP)", flat.config, flat.plan, flat.search_s,
                         flat.note)


METHODS: dict[str, Callable[[Workload], Outcome]] = {
    **{name: (lambda w, name=name: data_parallel(w, name)) for name in ZERO_METHODS},
    "Megatron TP+DP": megatron_tp_dp,
    "Megatron PTD-P": ptdp_grid,
    "coordinate descent (AutoDDL)": coordinate_descent,
    "greedy": greedy,
}


def compare(work: Workload, backend: str | None = None, time_limit_s: float | None = None,
            log: Callable[[str], None] | None = None, objective: str = DEFAULT_OBJECTIVE
            ) -> tuple[list[Row], dict[str, Outcome]]:
    """Every method's row (the ILP's first, minimizing ``objective``) and outcome, by method
    name."""
    best, flat = ilp_outcomes(work, backend, time_limit_s, objective)
    if log:
        log(f"{ILP}: {best.config}, {best.search_s:.2f} s")
    outcomes = {ILP: best}
    for name, fn in METHODS.items():
        outcomes[name] = fn(work)
        if log:
            log(f"{name}: {outcomes[name].config or outcomes[name].note}, "
                f"{outcomes[name].search_s:.2f} s")
    t0 = time.perf_counter()
    a = alpa(work, flat)
    outcomes[a.method] = a
    a.search_s = flat.search_s + (time.perf_counter() - t0)  # its K=1 is the ILP's solve
    rows = [row_of(o) for o in outcomes.values()]
    ref = rows[0].total_s
    for r in rows:
        if r.total_s is not None and ref:
            r.ratio = r.total_s / ref
    return rows, outcomes


# --------------------------------------------------------------------------- output
def _s(v: float | None) -> str:
    return "—" if v is None else format_seconds(v)


def _axes(r: Row) -> str:
    return ", ".join(f"{a} {format_bytes(b)}" for a, b in r.bytes_per_axis.items() if b) or "—"


HEADER = ("method", "mesh / (t,p,d)", "step time", "compute", "communication",
          "exposed weight traffic", "bytes per axis", "peak memory", "search", "× ILP", "note")


def cells(r: Row) -> list[str]:
    """A row as display strings."""
    return [r.method, r.config or "—", _s(r.total_s), _s(r.compute_s), _s(r.bandwidth_s),
            _s(r.exposed_comm_s), _axes(r),
            "—" if r.peak_memory_bytes is None else format_bytes(r.peak_memory_bytes),
            f"{r.search_s:.2f} s", "—" if r.ratio is None else f"{r.ratio:.3g}", r.note]


#: what the columns mean, printed under the table
LEGEND = ("step time: the predicted seconds per training step; compute: every op's kernels on "
          "the busiest device; communication: every collective's seconds, on the critical path "
          "or hidden behind compute, so compute + communication can exceed the step; exposed "
          "weight traffic: gradient reduction and ZeRO gathers not hidden; × ILP: step time "
          "over the ILP plan's.")


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table, with the legend of its columns."""
    body = [list(HEADER)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    return "\n".join(lines + [""] + textwrap.wrap(LEGEND, 100))


def markdown(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    return "\n".join(out)


def to_json(rows: list[Row], meta: dict[str, Any] | None = None) -> str:
    """The rows (and ``meta``) as JSON."""
    return json.dumps({**(meta or {}), "rows": [asdict(r) for r in rows]}, indent=1)


def to_csv(rows: list[Row], extra: dict[str, Any] | None = None) -> str:
    """The rows as CSV (bytes per axis as ``axis=bytes`` pairs); ``extra`` columns first."""
    buf = io.StringIO()
    extra = extra or {}
    cols = list(extra) + ["method", "config", "total_s", "bandwidth_s", "bytes_per_axis",
                          "peak_memory_bytes", "step_time_s", "search_s", "ratio", "fits", "note",
                          "compute_s", "exposed_comm_s"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        d = asdict(r)
        d["bytes_per_axis"] = " ".join(f"{a}={b:.0f}" for a, b in r.bytes_per_axis.items())
        w.writerow(list(extra.values()) + [d[c] for c in cols[len(extra):]])
    return buf.getvalue()


def pyplot():
    """matplotlib's pyplot on the Agg backend (a clear error when matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'autoddl[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[Row], path: str | Path, title: str = "") -> None:
    """A bar chart of each method's cost relative to the ILP plan (hatched: does not fit)."""
    plt = pyplot()
    shown = [r for r in rows if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    names = [r.method + ("" if r.fits else " (does not fit)") for r in shown]
    bars = ax.barh(names, [r.ratio for r in shown],
                   color=["tab:green" if r.method == ILP else "tab:blue" for r in shown])
    for bar, r in zip(bars, shown):
        if not r.fits:
            bar.set_hatch("//")
            bar.set_alpha(0.5)
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.ratio:.3g}×",
                va="center", fontsize=8)
    missing = [r.method for r in rows if r.ratio is None]
    ax.invert_yaxis()
    ax.set_xscale("log")
    ratios = [r.ratio for r in shown] or [1.0]
    # room right of the longest bar for its label; ticks as plain ratios ("2×", not "2×10⁰")
    ax.set_xlim(min(0.9, 0.9 * min(ratios)), 2.5 * max(ratios))
    plain = _ratio_formatter()
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("cost per step relative to the ILP plan (log scale)")
    text = "\n".join(textwrap.wrap(title, 95))
    ax.set_title(text + (f"\nnot applicable: {', '.join(missing)}" if missing else ""),
                 fontsize=9)
    save_figure(fig, path)


def _ratio_formatter():
    """Tick labels of a log axis of ratios as plain numbers with a "×" (minor ticks past the
    first digit left blank, so labels do not crowd)."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _pos: int) -> str:
        if value <= 0:
            return ""
        digit = value / 10 ** np.floor(np.log10(value) + 1e-9)
        return f"{value:g}×" if round(digit, 6) in (1.0, 2.0, 5.0) else ""

    return FuncFormatter(label)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG, whole or not at all, and close it (an unwritable path is
    a user error)."""
    import matplotlib.pyplot as plt

    from autoddl.files import write_atomic

    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    except OSError as exc:
        raise UserError(f"cannot write plot {str(path)!r}: {exc.strerror}") from None
    finally:
        plt.close(fig)
