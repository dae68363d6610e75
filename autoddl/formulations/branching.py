r"""LP branch and bound over one-hot groups, guided by the knapsack row that binds.

The sharding and pipeline MILPs pick one option per group: every integer column :math:`j` is
binary and lies in exactly one **group** row :math:`\sum_{j \in G} x_j = 1`. Their LP relaxations
are nearly integral except where a knapsack row binds (memory per device, or the cutoff row
:math:`c \cdot x \le U`): the LP then mixes two plans, e.g. 53 % of a fast plan over the memory
cap and 47 % of a slower one that fits. General MILP solvers spend their time at the root on cut
separation for such models (about 13 of 17 s for a 205k-column GPT-3 candidate); branching on the
groups that carry the mix closes the same gap in a handful of LPs (7 LPs, 0.8 s).

**Search.** A node is a set of columns fixed at zero; its LP value :math:`z` bounds every integral
point in it from below. Nodes are expanded best bound first:

* **prune** when the LP is infeasible or :math:`z \ge U (1 - \text{gap})`, :math:`U` the best
  integral point found;
* an LP solution integral on the integer columns (and feasible) is a new incumbent;
* otherwise **branch** on a group :math:`G` with fractional values. With :math:`\pi_r` the dual of
  inequality row :math:`r` and :math:`a_{rj}` its coefficients, the group maximizing
  :math:`|\pi_r| \cdot (\max_{j \in S} a_{rj} - \min_{j \in S} a_{rj})` over rows :math:`r`
  (:math:`S` the group's LP support) is split at the midpoint :math:`t` of that range: one child
  fixes :math:`\{j \in G : a_{rj} \le t\}` at zero, the other :math:`\{j \in G : a_{rj} > t\}`.
  Without such a row, the support's largest column is fixed at zero in one child and the rest of
  the group in the other.

Every integral point of a node picks one column of :math:`G`, so it lies in exactly one child: the
search is complete, and its answer exact. At the end :math:`U` is optimal within the gap (or, with
no incumbent, the model is infeasible: with a cutoff row, "nothing beats the cutoff"). The search
gives up after ``max_lps`` LPs or at its time limit: it then returns what it has, status FEASIBLE
(an incumbent) or NO_SOLUTION, with ``extra["gave_up"] = True`` and the **tree bound**, the least
LP bound over the open nodes, the node in hand and the pruned leaves (every integral point lies in
one of them, so it bounds them all; None before the root LP is solved); the caller then hands the
model to a general MILP solver and keeps the better of the two bounds. This module imports HiGHS
(``highspy``, through its one loader) lazily, for the LPs.
"""

from __future__ import annotations

import dataclasses
import heapq
import time

import numpy as np

from autoddl.formulations.milp import INF, MILP, SolveResult, SolveStatus, relative_gap

#: LP values this far from 0 or 1 count as fractional
INTEGRALITY_TOL = 1e-6
#: LPs the search may solve before it hands the model to a MILP solver
MAX_LPS = 200
#: LPs between two dives (the first dive starts at the root)
DIVE_EVERY = 25


def one_hot_groups(milp: MILP) -> list[np.ndarray] | None:
    """The integer columns of each equality row :math:`\\sum_{j \\in G} x_j = 1` (all
    coefficients 1, all columns binary integers), or None unless every integer column is in
    exactly one such row."""
    ints = milp.integrality
    if not ints.any():
        return None
    if np.any(milp.col_lower[ints] != 0.0) or np.any(milp.col_upper[ints] > 1.0):
        return None
    rows, cols, vals = milp.a_rows, milp.a_cols, milp.a_vals
    eq_one = (milp.row_lower == 1.0) & (milp.row_upper == 1.0)
    bad = np.zeros(milp.num_rows, bool)  # a row with a non-1 coefficient or a continuous column
    np.logical_or.at(bad, rows, (vals != 1.0) | ~ints[cols])
    group_rows = eq_one & ~bad
    sel = group_rows[rows]
    count = np.bincount(cols[sel], minlength=milp.num_cols)
    if np.any(count[ints] != 1):
        return None
    order = np.argsort(rows[sel], kind="stable")
    r, c = rows[sel][order], cols[sel][order]
    cuts = np.flatnonzero(np.diff(r)) + 1
    return [g for g in np.split(c, cuts) if len(g)]


class _LP:
    """The LP relaxation in one HiGHS object, re-solved warm after bound changes."""

    def __init__(self, milp: MILP) -> None:
        from autoddl.formulations.backends._common import objective_scale
        from autoddl.formulations.backends._highs import (
            configure, load_highspy, new_highs, pass_model,
        )

        self.milp = milp
        self.scale = objective_scale(milp.c)
        self.h = h = new_highs()
        configure(h, None, 0.0)
        h.setOptionValue("presolve", "off")  # see _highs.tune: a pure LP runs unpresolved
        pass_model(h, dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality)),
                   self.scale)
        self.optimal = load_highspy().HighsModelStatus.kOptimal
        self.all_cols = np.arange(milp.num_cols, dtype=np.int32)
        self.solves = 0

    def solve(self, upper: np.ndarray, time_limit_s: float) -> tuple[float, np.ndarray | None,
                                                                     np.ndarray | None, bool]:
        """(LP value, x, row duals, finished) with column upper bounds ``upper``; value inf and
        x None when infeasible; finished False when the time limit stopped it."""
        h = self.h
        h.changeColsBounds(len(upper), self.all_cols, self.milp.col_lower, upper)
        # HiGHS compares its limit with the run clock of the object, which adds up over runs
        h.setOptionValue("time_limit", h.getRunTime() + max(float(time_limit_s), 1e-3))
        h.run()
        self.solves += 1
        if h.getModelStatus() != self.optimal:
            name = h.modelStatusToString(h.getModelStatus())
            return INF, None, None, name == "Infeasible"
        sol = h.getSolution()
        value = h.getInfo().objective_function_value / self.scale + self.milp.offset
        return (value, np.array(sol.col_value), np.array(sol.row_dual) / self.scale, True)


def _branch(groups: list[np.ndarray], x: np.ndarray, duals: np.ndarray,
            ineq_rows: np.ndarray, row_coef: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The two column sets the children fix at zero (a partition of one fractional group)."""
    best, best_score = None, -1.0
    frac_groups = _fractional(groups, x)
    assert frac_groups, "branching on an integral LP solution"
    for g in frac_groups:
        support = x[g] > INTEGRALITY_TOL
        for k, r in enumerate(ineq_rows):
            if duals[r] == 0.0:
                continue
            a = row_coef[k][g]
            spread = float(a[support].max() - a[support].min())
            score = abs(float(duals[r])) * spread
            if score > best_score and spread > 0:
                best, best_score = (g, a, a[support]), score
    if best is not None:
        g, a, sup = best
        t = 0.5 * (float(sup.min()) + float(sup.max()))
        return g[a <= t], g[a > t]
    g = min(frac_groups, key=lambda g: float(x[g].max()))  # the most fractional group
    top = g[int(np.argmax(x[g]))]
    return np.array([top]), g[g != top]


def _fractional(groups: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """The groups whose LP values are not all 0 or 1."""
    return [g for g in groups
            if np.any((x[g] > INTEGRALITY_TOL) & (x[g] < 1 - INTEGRALITY_TOL))]


def _integral(milp: MILP, x: np.ndarray) -> np.ndarray | None:
    """``x`` with its integer columns rounded, if they are integral and the point feasible."""
    xi = x[milp.integrality]
    if np.any(np.abs(xi - np.round(xi)) > INTEGRALITY_TOL):
        return None
    x = x.copy()
    x[milp.integrality] = np.round(xi)
    return x if milp.is_feasible(x) else None


def _dive(lp: _LP, milp: MILP, groups: list[np.ndarray], upper: np.ndarray, x: np.ndarray,
          incumbent: float, deadline: float, budget: int) -> np.ndarray | None:
    """A plan found by diving from an LP solution ``x`` (node bounds ``upper``): repeatedly keep
    only the largest column of the fractional group closest to integral, and re-solve; None if
    the dive ends infeasible, above ``incumbent`` or out of LPs."""
    upper = upper.copy()
    for _ in range(budget):
        frac = _fractional(groups, x)
        if not frac:
            return _integral(milp, x)
        g = max(frac, key=lambda g: float(x[g].max()))
        upper[g[g != g[int(np.argmax(x[g]))]]] = 0.0
        z, x, _, finished = lp.solve(upper, deadline - time.perf_counter())
        if x is None or not finished or z >= incumbent:
            return None
    return None


def _gave_up(milp: MILP, best_x: np.ndarray | None, best_obj: float, bound: float,
             t0: float, lps: int) -> SolveResult:
    """The result of a search that stopped early: its incumbent (if any) and tree bound."""
    b = None if not np.isfinite(bound) else min(bound, best_obj)
    status = SolveStatus.FEASIBLE if best_x is not None else SolveStatus.NO_SOLUTION
    obj = None if best_x is None else best_obj
    return SolveResult("highs (LP branch and bound)", status, best_x, obj, b,
                       relative_gap(obj, b), time.perf_counter() - t0,
                       f"LP branch and bound gave up after {lps} LPs",
                       {"lps": lps, "gave_up": True})


def branch_and_bound(milp: MILP, mip_rel_gap: float, time_limit_s: float | None = None,
                     max_lps: int = MAX_LPS) -> SolveResult | None:
    """Solve ``milp`` by LP branch and bound over its one-hot groups (module docstring); None
    when it has no such structure or HiGHS is missing. A search that gives up (``max_lps``,
    the time limit) returns its incumbent and tree bound with ``extra["gave_up"]``."""
    from autoddl.formulations.backends._highs import HighsBackend

    if not HighsBackend().available():
        return None
    groups = one_hot_groups(milp)
    if groups is None:
        return None
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s if time_limit_s is not None else INF
    ineq_rows = np.flatnonzero(milp.row_lower != milp.row_upper)
    row_coef = []
    for r in ineq_rows:
        a = np.zeros(milp.num_cols)
        sel = milp.a_rows == r
        np.add.at(a, milp.a_cols[sel], milp.a_vals[sel])
        row_coef.append(a)
    lp = _LP(milp)
    best_x, best_obj, low = None, INF, INF  # incumbent; least bound of pruned leaves
    # open nodes: (parent's LP bound, tie-break, the columns the node fixes at zero beyond the
    # model's own bounds)
    heap: list[tuple[float, int, np.ndarray]] = [(-INF, 0, np.zeros(0, np.int64))]
    # a model cut off near its LP bound is mostly a proof: no plan to dive for at the root
    tick, next_dive = 1, DIVE_EVERY if milp.incumbent_near else 0
    def open_bound(bound: float) -> float:  # every integral point not yet excluded
        return min([low, bound] + [b for b, _, _ in heap])

    while heap:
        bound, _, fixed = heapq.heappop(heap)
        if bound >= best_obj * (1 - mip_rel_gap):
            low = min(low, bound)
            continue
        remaining = deadline - time.perf_counter()
        if lp.solves >= max_lps or remaining <= 0:
            return _gave_up(milp, best_x, best_obj, open_bound(bound), t0, lp.solves)
        upper = milp.col_upper.copy()
        upper[fixed] = 0.0
        z, x, duals, finished = lp.solve(upper, remaining)
        if not finished:
            return _gave_up(milp, best_x, best_obj, open_bound(bound), t0, lp.solves)
        if x is None or z >= best_obj * (1 - mip_rel_gap):
            low = min(low, z)
            continue
        if not _fractional(groups, x):
            xr = _integral(milp, x)
            if xr is None:  # integral but infeasible beyond tolerance: leave it to a MILP solver
                return _gave_up(milp, best_x, best_obj, open_bound(z), t0, lp.solves)
            if milp.evaluate(xr) < best_obj:
                best_x, best_obj = xr, milp.evaluate(xr)
            low = min(low, z)
            continue
        if lp.solves >= next_dive:  # a plan to prune with: dive from here
            found = _dive(lp, milp, groups, upper, x, best_obj * (1 - mip_rel_gap), deadline,
                          max_lps - lp.solves)
            if found is not None and milp.evaluate(found) < best_obj:
                best_x, best_obj = found, milp.evaluate(found)
            next_dive = lp.solves + DIVE_EVERY
            if z >= best_obj * (1 - mip_rel_gap):
                low = min(low, z)
                continue
        for part in _branch(groups, x, duals, ineq_rows, row_coef):
            heapq.heappush(heap, (z, tick, np.concatenate([fixed, part])))
            tick += 1
    elapsed = time.perf_counter() - t0
    name = "highs (LP branch and bound)"
    extra = {"lps": lp.solves}
    if best_x is None:
        return SolveResult(name, SolveStatus.INFEASIBLE, None, None, None, None, elapsed,
                           extra=extra)
    bound = min(best_obj, low)
    return SolveResult(name, SolveStatus.OPTIMAL, best_x, best_obj, bound,
                       relative_gap(best_obj, bound), elapsed, extra=extra)
