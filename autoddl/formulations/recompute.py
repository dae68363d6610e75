r"""Activation recomputation chosen by the MILP: per layer, or per repeated layer with a count.

A *recompute group* is one layer of the model, or one representative standing for :math:`R`
identical layers (the middle layers of a reduced graph, a pipeline stage's layers). Each of its
options :math:`o` (``"full"``: the layer keeps only its inputs and runs its forward again in
backward; ``"selective"``: only attention's score region, Korthikanti et al. 2022) is taken by
an integer count :math:`r_o` of the :math:`R` copies, :math:`\sum_o r_o \le R`. Per recomputed
copy, with the sharding choice :math:`x` fixed, an option

* adds :math:`F_o(x)` critical seconds (the forward of the recomputed ops and of the
  conversions between them, once more),
* frees :math:`S_o(x)` bytes (the activations not kept),
* needs :math:`L_o(x)` bytes live while it is recomputed (one copy's recomputed activations:
  once per memory group, for the largest recomputing option there).

:math:`F, S, L` are linear in the choice (:class:`LinearForm`: per-signature and per-edge-pair
values), so the step and memory are *bilinear* in :math:`(r, x)`. With
:math:`r_o = \sum_j 2^j b_{o,j}` (binary digits :math:`b`) each product is a binary times a
bounded linear form, which is exact in linear rows (:meth:`RecomputeRows.recompute`):

* cost :math:`c_{o,j} \in [0,1]`: :math:`F_o(x)/\bar F_o - c_{o,j} + b_{o,j} \le 1`; the
  objective (and the stage's time) gets :math:`2^j \bar F_o c_{o,j}`, which any minimiser holds
  at :math:`b_{o,j} F_o(x)/\bar F_o`;
* freed memory :math:`w_{o,j} \in [0,1]`: :math:`w_{o,j} \le S_o(x)/\bar S_o`,
  :math:`w_{o,j} \le b_{o,j}`; the memory row gets :math:`-2^j \bar S_o w_{o,j}` (the largest
  value the rows allow is :math:`b_{o,j} S_o(x)/\bar S_o`: memory is never under-counted);
* live memory: :math:`z_o \ge b_{o,j}` for every digit (:math:`z_o \in [0,1]`), and per
  memory group one :math:`u \in [0,1]` with :math:`L_o(x)/\bar L - u + z_o \le 1`; the memory row gets
  :math:`\bar L u`, at least :math:`\max_{o: r_o > 0} L_o(x)`.

Bars are upper bounds of the forms (:meth:`LinearForm.upper`), which keeps the columns in
[0, 1]. This module imports no torch and no solver.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

KINDS = ("full", "selective")


@dataclass(frozen=True, eq=False)
class LinearForm:
    """A quantity linear in the choice: per node a value per signature, per edge a value per
    (producer key, consumer key) pair (``nodes``/``edges`` hold (index, values))."""

    nodes: tuple[tuple[int, np.ndarray], ...] = ()
    edges: tuple[tuple[int, np.ndarray], ...] = ()

    def value(self, problem: Any, choice: Sequence[int]) -> float:
        """The form's value for one signature per node of ``problem``."""
        total = sum(float(v[choice[i]]) for i, v in self.nodes)
        for i, v in self.edges:
            e = problem.edges[i]
            total += float(v[e.src_key[choice[e.src]], e.dst_key[choice[e.dst]]])
        return total

    def upper(self) -> float:
        """An upper bound over every choice (the sum of each term's largest finite value)."""
        def top(v: np.ndarray) -> float:
            f = v[np.isfinite(v)]
            return max(float(f.max(initial=0.0)), 0.0)
        return sum(top(v) for _, v in self.nodes) + sum(top(v) for _, v in self.edges)

    def scaled(self, k: float) -> "LinearForm":
        """The form times ``k``."""
        return LinearForm(tuple((i, v * k) for i, v in self.nodes),
                          tuple((i, v * k) for i, v in self.edges))

    def restricted(self, keep: list[np.ndarray], edge_ix: list[tuple[np.ndarray, np.ndarray]]
                   ) -> "LinearForm":
        """The form on a problem whose node ``i`` kept signatures ``keep[i]`` and edge ``i``
        keys ``edge_ix[i]`` (:func:`~autoddl.formulations.dominance.prune_dominated`)."""
        return LinearForm(tuple((i, v[keep[i]]) for i, v in self.nodes),
                          tuple((i, v[np.ix_(*edge_ix[i])]) for i, v in self.edges))


@dataclass(frozen=True, eq=False)
class RecomputeOption:
    """One way to recompute a group's copies: per recomputed copy, the critical seconds it adds,
    the bytes it frees, and the bytes live while it is recomputed."""

    kind: str
    extra_s: LinearForm
    saved_bytes: LinearForm
    live_bytes: LinearForm


@dataclass(frozen=True, eq=False)
class RecomputeGroup:
    """A layer (``copies`` 1) or a representative of ``copies`` identical layers, in memory and
    stage group ``group``; ``fixed``: counts forced per option (``--recompute`` given)."""

    name: str
    copies: int
    group: int
    options: tuple[RecomputeOption, ...]
    fixed: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        assert self.fixed is None or (len(self.fixed) == len(self.options)
                                      and sum(self.fixed) <= self.copies)

    def default_counts(self) -> tuple[int, ...]:
        """The counts of a choice that names none: the forced ones, else no recomputation."""
        return self.fixed if self.fixed is not None else (0,) * len(self.options)

    def count_choices(self) -> Iterator[tuple[int, ...]]:
        """Every allowed count vector (for brute force on tiny problems)."""
        if self.fixed is not None:
            yield self.fixed
            return
        for counts in itertools.product(range(self.copies + 1), repeat=len(self.options)):
            if sum(counts) <= self.copies:
                yield counts


def count_slots(groups: Sequence[RecomputeGroup]) -> int:
    """Entries a choice vector holds after its nodes: one count per group option."""
    return sum(len(g.options) for g in groups)


def counts_of(groups: Sequence[RecomputeGroup], choice: Sequence[int], num_nodes: int
              ) -> list[tuple[int, ...]]:
    """Each group's counts from a choice vector (its defaults where the vector has none)."""
    out, k = [], num_nodes
    for g in groups:
        n = len(g.options)
        out.append(tuple(int(c) for c in choice[k:k + n]) if len(choice) >= k + n
                   else g.default_counts())
        k += n
    return out


def recompute_terms(problem: Any, choice: Sequence[int]) -> tuple[dict[int, float],
                                                                  dict[int, float]]:
    """(critical seconds, memory bytes) the recomputation of ``choice`` adds per group."""
    crit: dict[int, float] = {}
    mem: dict[int, float] = {}
    live: dict[int, float] = {}
    groups = problem.recompute
    for g, counts in zip(groups, counts_of(groups, choice, len(problem.nodes))):
        for opt, r in zip(g.options, counts):
            if r <= 0:
                continue
            crit[g.group] = crit.get(g.group, 0.0) + r * opt.extra_s.value(problem, choice)
            mem[g.group] = mem.get(g.group, 0.0) - r * opt.saved_bytes.value(problem, choice)
            live[g.group] = max(live.get(g.group, 0.0), opt.live_bytes.value(problem, choice))
    for grp, v in live.items():
        mem[grp] = mem.get(grp, 0.0) + v
    return crit, mem


def all_count_choices(groups: Sequence[RecomputeGroup]) -> Iterator[tuple[int, ...]]:
    """Every allowed tail of a choice vector (the groups' counts, flattened)."""
    for combo in itertools.product(*[list(g.count_choices()) for g in groups]):
        yield tuple(c for counts in combo for c in counts)


def restrict_groups(problem: Any, choice: Sequence[int]) -> tuple[RecomputeGroup, ...]:
    """``problem``'s recompute groups on the problem of one signature per node (``choice``'s),
    each edge keyed by its one pair: what a plan's own problem carries."""
    keep = [np.array([int(c)]) for c in choice[:len(problem.nodes)]]
    pairs = [(np.array([e.src_key[choice[e.src]]]), np.array([e.dst_key[choice[e.dst]]]))
             for e in problem.edges]

    def cut(o: RecomputeOption) -> RecomputeOption:
        return RecomputeOption(o.kind, o.extra_s.restricted(keep, pairs),
                               o.saved_bytes.restricted(keep, pairs),
                               o.live_bytes.restricted(keep, pairs))

    return tuple(RecomputeGroup(g.name, g.copies, g.group, tuple(cut(o) for o in g.options),
                                g.fixed) for g in problem.recompute)


def memory_floor(problem: Any) -> Any:
    """``problem`` without its recompute groups, each node's and edge's memory lowered by the
    most recomputation could free through it (every copy of a group by, term by term, its most
    freeing option; the live layer left out): below every plan's memory, recomputation
    included, so a bound computed on it holds."""
    node_mem = [np.array(n.memory_bytes, float) for n in problem.nodes]
    edge_mem = [np.array(e.memory_bytes, float) for e in problem.edges]
    for g in problem.recompute:
        nodes: dict[int, np.ndarray] = {}
        edges: dict[int, np.ndarray] = {}
        for o in g.options:
            for v, vals in o.saved_bytes.nodes:
                nodes[v] = np.maximum(nodes.get(v, 0.0), vals)
            for i, vals in o.saved_bytes.edges:
                edges[i] = np.maximum(edges.get(i, 0.0), np.nan_to_num(vals, posinf=0.0))
        for v, vals in nodes.items():
            node_mem[v] = node_mem[v] - g.copies * vals
        for i, vals in edges.items():
            edge_mem[i] = edge_mem[i] - g.copies * vals
    return dataclasses.replace(
        problem, recompute=(),
        nodes=tuple(dataclasses.replace(n, memory_bytes=m) for n, m in zip(problem.nodes,
                                                                           node_mem)),
        edges=tuple(dataclasses.replace(e, memory_bytes=m) for e, m in zip(problem.edges,
                                                                           edge_mem)))


def fill_counts(problem: Any, choice: Sequence[int], capacity_bytes: float) -> np.ndarray:
    """A choice vector of ``choice``'s signatures with recomputation counts that fit memory
    where some do (a heuristic for screening's plans, not an optimum): the defaults if they fit;
    else options taken whole in order of seconds added per byte freed, the last one cut back
    to the fewest copies that still fit."""
    n = len(problem.nodes)
    base = [int(c) for c in choice[:n]]
    groups = problem.recompute
    counts = [list(g.default_counts()) for g in groups]

    def vec() -> np.ndarray:
        return np.array(base + [c for cs in counts for c in cs], dtype=int)

    def fits() -> bool:
        return problem.evaluate(vec())[1] <= capacity_bytes * (1 + 1e-12)

    if not groups or fits():
        return vec()
    items = []
    for gi, g in enumerate(groups):
        if g.fixed is None:
            for oi, o in enumerate(g.options):
                freed = o.saved_bytes.value(problem, base)
                if freed > 0:
                    items.append((o.extra_s.value(problem, base) / freed, gi, oi))
    for _, gi, oi in sorted(items):
        room = groups[gi].copies - sum(counts[gi])
        if room <= 0:
            continue
        counts[gi][oi] += room
        if fits():
            lo, hi = counts[gi][oi] - room, counts[gi][oi]  # hi fits; find the fewest
            while hi - lo > 1:
                counts[gi][oi] = (lo + hi) // 2
                lo, hi = (lo, counts[gi][oi]) if fits() else (counts[gi][oi], hi)
            counts[gi][oi] = hi
            break
    return vec()


def _bits(copies: int) -> list[int]:
    """Powers of two whose sums make every count 0..copies."""
    return [1 << j for j in range(max(copies, 1).bit_length())]


@dataclass
class _OptionCols:
    """Columns of one group option: binary digits, their cost and freed-memory columns, z."""

    bits: list[int] = field(default_factory=list)
    b: list[int] = field(default_factory=list)


class RecomputeRows:
    """The recomputation constraint family of :class:`~autoddl.formulations.sharding
    .ShardingModel` (module docstring); mixed in, it uses the model's column and row helpers."""

    def recompute(self) -> None:
        r"""Counts as binary digits; cost, freed and live memory of each recomputed copy."""
        self.recompute_cols: list[list[_OptionCols]] = []
        groups = self.problem.recompute
        live_cap: dict[int, float] = {}
        for g in groups:
            for opt in g.options:
                live_cap[g.group] = max(live_cap.get(g.group, 0.0), opt.live_bytes.upper())
        u_col = {}
        for grp, cap in live_cap.items():
            if cap > 0:
                u_col[grp] = self._new_cols(np.zeros(1), np.array([cap]), integer=False)
                self._group.append(grp)
        for g in groups:
            cols = []
            count_terms: list[tuple[np.ndarray, np.ndarray]] = []
            for o, opt in enumerate(g.options):
                oc = _OptionCols(bits=_bits(g.copies))
                oc.b = [self._new_cols(np.zeros(1), np.zeros(1), integer=True)
                        for _ in oc.bits]
                for _ in oc.b:
                    self._group.append(g.group)
                self._option_rows(g, opt, oc, u_col.get(g.group), live_cap.get(g.group, 0.0))
                b_cols, b_vals = np.array(oc.b), np.array(oc.bits, float)
                count_terms.append((b_cols, b_vals))
                if g.fixed is not None:
                    self._add_row(b_cols, b_vals, float(g.fixed[o]), float(g.fixed[o]))
                cols.append(oc)
            if g.fixed is None and sum(t[1].sum() for t in count_terms) > g.copies:
                self._add_row(np.concatenate([t[0] for t in count_terms]),
                              np.concatenate([t[1] for t in count_terms]), -np.inf,
                              float(g.copies))
            self.recompute_cols.append(cols)

    def _form_column(self, form: LinearForm, cap: float, group: int) -> int:
        """A continuous column equal to ``form`` / ``cap`` (in [0, 1]): one dense row, so that
        the rows of each binary digit read one column instead of the whole form."""
        col = self._new_cols(np.zeros(1), np.zeros(1), integer=False)
        self._group.append(group)
        cols, vals = self.form_terms(form)
        self._add_row(np.append(cols, col), np.append(vals / cap, -1.0), 0.0, 0.0)
        return col

    def _option_rows(self, g: RecomputeGroup, opt: RecomputeOption, oc: _OptionCols,
                     u: int | None, live_cap: float) -> None:
        """The rows of one option's digits: cost, freed memory, live memory."""
        f_cap, s_cap = opt.extra_s.upper(), opt.saved_bytes.upper()
        phi = self._form_column(opt.extra_s, f_cap, g.group) if f_cap > 0 else None
        sigma = self._form_column(opt.saved_bytes, s_cap, g.group) if s_cap > 0 else None
        for bit, b in zip(oc.bits, oc.b):
            if phi is not None:  # F/F̄ - c + b <= 1
                c = self._new_cols(np.array([bit * f_cap]), np.zeros(1), integer=False)
                self._group.append(g.group)
                self._add_row(np.array([phi, c, b]), np.array([1.0, -1.0, 1.0]), -np.inf, 1.0)
            if sigma is not None:  # w <= S/S̄, w <= b
                w = self._new_cols(np.zeros(1), np.array([-bit * s_cap]), integer=False)
                self._group.append(g.group)
                self._add_row(np.array([w, sigma]), np.array([1.0, -1.0]), -np.inf, 0.0)
                self._add_row(np.array([w, b]), np.array([1.0, -1.0]), -np.inf, 0.0)
        if u is None or live_cap <= 0 or opt.live_bytes.upper() <= 0:
            return
        z = self._new_cols(np.zeros(1), np.zeros(1), integer=False)
        self._group.append(g.group)
        for b in oc.b:  # z >= b_j: z is 1 once any copy is recomputed; and L/L̄ - u + z <= 1
            self._add_row(np.array([b, z]), np.array([1.0, -1.0]), -np.inf, 0.0)
        lam = self._form_column(opt.live_bytes, live_cap, g.group)
        self._add_row(np.array([lam, u, z]), np.array([1.0, -1.0, 1.0]), -np.inf, 1.0)

    def recompute_counts(self, x: np.ndarray) -> list[int]:
        """The counts of a solution vector, flattened as in a choice vector."""
        out = []
        for cols in getattr(self, "recompute_cols", []):
            for oc in cols:
                out.append(int(sum(bit * round(float(x[b])) for bit, b in zip(oc.bits, oc.b))))
        return out
