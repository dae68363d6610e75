r"""Activation recomputation chosen by the MILP: per layer, or per repeated layer with a count.

A *recompute group* is one layer of the model, or one representative standing for :math:`R`
identical layers (the middle layers of a reduced graph, a pipeline stage's layers). Each of its
options :math:`o` (``"full"``: the layer keeps only its inputs and runs its forward again in
backward; ``"selective"``: only attention's score stash, Korthikanti et al. 2022) is taken by
an integer count :math:`r_o` of the :math:`R` copies, :math:`\sum_o r_o \le R`. Per recomputed
copy, with the sharding choice :math:`x` fixed, an option

* adds :math:`F_o(x)` critical seconds (the forward of the recomputed ops and of the
  conversions between them, once more),
* frees :math:`S_o(x)` bytes (the activations not kept),
* needs :math:`L_o(x)` bytes live while it is recomputed (one copy's recomputed activations:
  once per memory group, for the largest recomputing option there).

:math:`F, S, L` are linear in the choice (:class:`LinearForm`: per-signature and per-edge-pair
values), so the step and memory are *bilinear* in :math:`(r, x)`. Exact in linear rows
(:meth:`RecomputeRows.recompute`), by spreading the count over the chosen columns: for every
one-hot set :math:`J` the forms touch (a node's signatures, an edge's pairs), continuous
:math:`z_j = r\,x_j` with :math:`\sum_{j \in J} z_j = r` and :math:`0 \le z_j \le R\,x_j`;
with :math:`x` binary this forces :math:`z_j = r` on the chosen column and 0 elsewhere, so
:math:`r F_o(x) = \sum_j f_j z_j` and :math:`r S_o(x) = \sum_j s_j z_j` are linear. Its LP
relaxation charges recomputed copies at the (fractional) sharding's own rates. The count is
one-hot over its values, :math:`r = \sum_k k\,q_k` (so every integer column lies in a one-hot
group). The live layer: per memory group one :math:`u \in [0,1]` with
:math:`L_o(x)/\bar L - u - q_{o,0} \le 0`; the memory row gets :math:`\bar L u`, at least
:math:`\max_{o: r_o > 0} L_o(x)` (:math:`\bar L`: an upper bound of the forms,
:meth:`LinearForm.upper`). Forced counts (``--recompute`` given) are folded into the costs
instead (:func:`fold_fixed`).

This module imports no torch and no solver.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
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

    def lower(self) -> float:
        """A lower bound over every choice (the sum of each term's smallest finite value)."""
        def low(v: np.ndarray) -> float:
            f = v[np.isfinite(v)]
            return float(f.min(initial=0.0))
        return sum(low(v) for _, v in self.nodes) + sum(low(v) for _, v in self.edges)

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


def fold_fixed(problem: Any) -> Any:
    """``problem`` with every forced recomputation folded into its node and edge costs and
    memory (exact: linear for fixed counts); those groups keep only their live layer."""
    if not any(g.fixed is not None for g in problem.recompute):
        return problem
    cost = [np.array(n.cost_s, float) for n in problem.nodes]
    mem = [np.array(n.memory_bytes, float) for n in problem.nodes]
    e_cost = [np.array(e.cost_s, float) for e in problem.edges]
    e_mem = [np.array(e.memory_bytes, float) for e in problem.edges]
    groups = []
    for g in problem.recompute:
        if g.fixed is None:
            groups.append(g)
            continue
        options = []
        for o, r in zip(g.options, g.fixed):
            for v, vals in o.extra_s.nodes:
                cost[v] = cost[v] + r * vals
            for v, vals in o.saved_bytes.nodes:
                mem[v] = mem[v] - r * vals
            for i, vals in o.extra_s.edges:
                e_cost[i] = e_cost[i] + r * np.nan_to_num(vals, posinf=0.0)
            for i, vals in o.saved_bytes.edges:
                e_mem[i] = e_mem[i] - r * np.nan_to_num(vals, posinf=0.0)
            options.append(RecomputeOption(o.kind, LinearForm(), LinearForm(), o.live_bytes))
        groups.append(RecomputeGroup(g.name, g.copies, g.group, tuple(options), g.fixed))
    return dataclasses.replace(
        problem, recompute=tuple(groups),
        nodes=tuple(dataclasses.replace(n, cost_s=c, memory_bytes=m)
                    for n, c, m in zip(problem.nodes, cost, mem)),
        edges=tuple(dataclasses.replace(e, cost_s=c, memory_bytes=m)
                    for e, c, m in zip(problem.edges, e_cost, e_mem)))


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


class RecomputeRows:
    """The recomputation constraint family of :class:`~autoddl.formulations.sharding
    .ShardingModel` (module docstring); mixed in, it uses the model's column and row helpers."""

    def recompute(self) -> None:
        r"""Per group option an integer count, its copies spread over the signatures (and edge
        pairs) chosen; cost and freed memory on those columns; the live layer's memory."""
        self.recompute_cols: list[list[int]] = []
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
        self.live_cols = list(u_col.values())
        for g in groups:
            counts = []
            for o, opt in enumerate(g.options):
                r, q0 = self._count(g, None if g.fixed is None else g.fixed[o])
                self._spread(g, opt, r)
                self._live(g, opt, q0, u_col.get(g.group), live_cap.get(g.group, 0.0))
                counts.append(r)
            if g.fixed is None and len(counts) > 1:
                self._add_row(np.array(counts), np.ones(len(counts)), -np.inf, float(g.copies))
            self.recompute_cols.append(counts)

    def _count(self, g: RecomputeGroup, fixed: int | None) -> tuple[int, int]:
        r"""A count :math:`r = \sum_k k\,q_k` with binary :math:`q` one-hot over 0..R (the
        integers are one-hot groups, which the LP branch and bound of
        :mod:`autoddl.formulations.branching` branches on); ``fixed``: only that value.
        Returns (r's column, :math:`q_0`'s column)."""
        values = np.arange(g.copies + 1, dtype=float)
        q = self._new_cols(np.zeros(len(values)), np.zeros(len(values)), integer=True)
        if fixed is not None:
            self._ub[-1][:] = 0.0
            self._ub[-1][fixed] = 1.0
        self._group.append(g.group)
        qs = q + np.arange(len(values))
        self._add_row(qs, np.ones(len(values)), 1.0, 1.0)
        r = self._new_cols(np.zeros(1), np.zeros(1), integer=False)
        self._ub[-1][:] = g.copies
        self._group.append(g.group)
        self._add_row(np.append(qs, r), np.append(-values, 1.0), 0.0, 0.0)
        return r, q

    def _blocks(self, forms: Sequence[LinearForm]) -> list[np.ndarray]:
        """The one-hot column sets (a node's x, an edge's y, or the x an edge folds onto) that
        the terms of ``forms`` lie on, each once."""
        starts: dict[int, np.ndarray] = {}
        for form in forms:
            for v, vals in form.nodes:
                starts.setdefault(self.x_start[v], self.x_start[v] + np.arange(len(vals)))
            for i_e, _ in form.edges:
                block = self.y_blocks[i_e]
                if block is not None:
                    starts.setdefault(block[0], block[0] + np.arange(len(block[1])))
                else:
                    side = self._folded[i_e][0]
                    k = len(self.problem.nodes[side].cost_s)
                    starts.setdefault(self.x_start[side], self.x_start[side] + np.arange(k))
        return list(starts.values())

    def _spread(self, g: RecomputeGroup, opt: RecomputeOption, r: int) -> None:
        r"""Copies :math:`z_k = r \sum_{j \in k} x_j` per class k of columns of one one-hot set
        that cost and free the same (exact for binary x and integer r:
        :math:`\sum_k z_k = r`, :math:`0 \le z_k \le R \sum_{j \in k} x_j`), costing the
        form's seconds and freeing its bytes."""
        f_cols, f_vals = self.form_terms(opt.extra_s)
        s_cols, s_vals = self.form_terms(opt.saved_bytes)
        extra = dict(zip(f_cols.tolist(), f_vals.tolist()))
        freed = dict(zip(s_cols.tolist(), s_vals.tolist()))
        for cols in self._blocks([opt.extra_s, opt.saved_bytes]):
            cost = np.array([extra.get(int(c), 0.0) for c in cols])
            mem = -np.array([freed.get(int(c), 0.0) for c in cols])
            # columns of equal (seconds, bytes) share one z: z_k <= R · (their x's sum)
            classes, which = np.unique(np.stack([cost, mem], axis=1), axis=0,
                                       return_inverse=True)
            which = which.reshape(-1)
            z = self._new_cols(classes[:, 0], classes[:, 1], integer=False)
            self._ub[-1][:] = g.copies
            self._group.append(g.group)
            zs = z + np.arange(len(classes))
            self._add_row(np.append(zs, r), np.append(np.ones(len(zs)), -1.0), 0.0, 0.0)
            for k, zk in enumerate(zs):
                members = cols[which == k]
                self._add_row(np.append(zk, members),
                              np.append(1.0, np.full(len(members), -float(g.copies))), -np.inf,
                              0.0)

    def _live(self, g: RecomputeGroup, opt: RecomputeOption, q0: int, u: int | None,
              live_cap: float) -> None:
        r"""The live layer: :math:`L(x)/\bar L - u - q_0 \le 0` (:math:`q_0`: no copy
        recomputed)."""
        if u is None or live_cap <= 0 or opt.live_bytes.upper() <= 0:
            return
        cols, vals = self.form_terms(opt.live_bytes)
        self._add_row(np.concatenate([cols, [u, q0]]),
                      np.concatenate([vals / live_cap, [-1.0, -1.0]]), -np.inf, 0.0)

    def recompute_counts(self, x: np.ndarray) -> list[int]:
        """The counts of a solution vector, flattened as in a choice vector."""
        return [int(round(float(x[r]))) for counts in getattr(self, "recompute_cols", [])
                for r in counts]
