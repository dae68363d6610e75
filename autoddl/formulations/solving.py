r"""How one candidate's MILP is solved: LP first, then branch and bound, then a MILP backend, with
the best valid bound kept, and no plan over the memory cap.

* :func:`solve_lp_first` solves the LP relaxation (infeasible or integral: that is the answer),
  fixes columns by reduced costs against the cutoff, runs the LP branch and bound of
  :mod:`autoddl.formulations.branching` and, where it gives up, a MILP backend
  (:func:`~autoddl.formulations.backends.solve_or_fall_back`: a crashed OR-Tools process is
  solved again by ``highs``, or is a :class:`~autoddl.errors.SolverError` when the user named
  it). Whatever stops early (a time limit), the result keeps the **best valid lower bound** at
  hand, the largest of the LP relaxation's value, the branch and bound's tree bound and the
  backend's own bound (each bounds every plan of the model, so their maximum does too), and the
  best plan either search found.
* :func:`solve_within_capacity` checks every plan a solve returns against the memory cap
  strictly (:func:`~autoddl.formulations.sharding.within_capacity`: float rounding only,
  :data:`~autoddl.formulations.sharding.MEMORY_RTOL`). Solvers accept rows violated by up to
  their feasibility tolerance (HiGHS: 1e-7 of the row, which is the cap): a plan 2e-8 over a
  48 MB cap (1 byte) came back "optimal". Such a plan is refused and the MILP solved again with
  the memory rows' right-hand side lowered to :math:`1 - \delta` (the rows are memory / cap
  :math:`\le 1`), :math:`\delta` twice the violation at first and at least doubled on every
  further try, until the plan fits (or :data:`MAX_TIGHTENINGS` tries fail: status ERROR).

**What the proof then covers.** The re-solve's bound is a lower bound on every plan using at most
:math:`(1 - \delta)` × the cap per device, not on the few plans in the last :math:`\delta` of it
(a byte or a few in the case above; a tolerance-based solver cannot tell those from the plans
just over the cap). The result says so: ``extra["proof_capacity_bytes"]`` is
:math:`(1 - \delta)` × the cap, and the planner reports it with the plan. Without a tightening
the bound covers every plan within the cap.

This module imports no torch and no solver (the backends import theirs).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from autoddl.formulations.backends import BACKENDS, solve, solve_or_fall_back
from autoddl.formulations.branching import branch_and_bound
from autoddl.formulations.milp import MILP, SolveResult, SolveStatus, relative_gap, \
    restrict_columns
from autoddl.formulations.sharding import MEMORY_RTOL

#: an LP bound this close below the cutoff leaves the MILP mostly a proof
#: (:attr:`MILP.incumbent_near`)
NEAR_CUTOFF = 0.02
#: relative margin of reduced-cost fixing: a column is fixed when the LP bound plus its reduced
#: cost exceeds the cutoff by more than this fraction of the cutoff (scale-free; the LP's own
#: error is ~1e-9 of the objective)
FIXING_RTOL = 1e-6
#: tightenings of the memory rows tried before a solve is given up (:func:`solve_within_capacity`)
MAX_TIGHTENINGS = 6


def solve_lp_first(milp: MILP, backend: str, time_limit_s: float | None,
                   mip_rel_gap: float, lp_first: bool = True,
                   cutoff: float = float("inf"), branch: bool = False,
                   named: bool = False) -> SolveResult:
    """Solve the LP relaxation first: where it is infeasible, or integral, it is already the
    answer (and the proof); otherwise solve the MILP with ``backend``, after **reduced-cost
    fixing** against ``cutoff`` (the objective of a known plan): every solution satisfies
    :math:`z \\ge z_{LP} + \\sum_j d_j x_j` for the LP's reduced costs :math:`d_j \\ge 0` of
    columns at zero, so a column with :math:`z_{LP} + d_j >` cutoff is 0 in every plan at
    least as good as the known one and is fixed there (exact), and removed from the model. An
    LP bound within ``NEAR_CUTOFF`` of the cutoff marks the MILP :attr:`~MILP.incumbent_near`.
    With ``branch`` (no backend named by the user) the MILP goes to the LP branch and bound of
    :mod:`autoddl.formulations.branching` first, and to ``backend`` only if that gives up.
    ``named``: the user named ``backend`` (a crash of its process is then an error, not a
    fallback). The result carries the best valid bound of the module docstring."""
    if not lp_first:
        return solve_or_fall_back(milp, backend, named=named, time_limit_s=time_limit_s,
                                  mip_rel_gap=mip_rel_gap)
    lp_backend = "highs" if BACKENDS["highs"].available() else backend
    t0 = time.perf_counter()
    lp = solve(dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality)),
               backend=lp_backend, time_limit_s=time_limit_s)
    if lp.status is SolveStatus.INFEASIBLE:
        return dataclasses.replace(lp, backend=f"{lp_backend} (LP)")
    lp_bound = lp.objective if lp.status is SolveStatus.OPTIMAL else None
    if lp.status is SolveStatus.OPTIMAL and lp.x is not None:
        xi = lp.x[milp.integrality]
        if np.all(np.abs(xi - np.round(xi)) <= 1e-7):
            x = lp.x.copy()
            x[milp.integrality] = np.round(xi)
            if milp.is_feasible(x):
                obj = milp.evaluate(x)
                return SolveResult(f"{lp_backend} (LP, integral)", SolveStatus.OPTIMAL, x, obj,
                                   lp.objective, relative_gap(obj, lp.objective),
                                   time.perf_counter() - t0)
    dual = lp.extra.get("col_dual")
    full = milp
    keep = np.ones(milp.num_cols, bool)
    if lp.status is SolveStatus.OPTIMAL and dual is not None and np.isfinite(cutoff):
        slack = cutoff - lp.objective + FIXING_RTOL * abs(cutoff)
        keep = ~((lp.x <= 1e-9) & (dual > slack)) & (milp.col_upper > 0.0)
        if milp.fractional is not None:  # a tiny positive value costs only d_j times it
            keep |= milp.fractional
        # the fixed columns leave the model: solvers' presolve would spend seconds on them
        milp = dataclasses.replace(restrict_columns(milp, keep),
                                   incumbent_near=lp.objective >= cutoff * (1 - NEAR_CUTOFF))

    def left() -> float | None:
        return None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - t0),
                                                     1e-3)
    r = searched = branch_and_bound(milp, mip_rel_gap, left()) if branch else None
    if r is None or r.extra.get("gave_up"):
        r = solve_or_fall_back(milp, backend, named=named, time_limit_s=left(),
                               mip_rel_gap=mip_rel_gap)
        r = combine(r, searched, lp_bound, mip_rel_gap)
    if r.x is not None and not keep.all():
        x = np.zeros(full.num_cols)
        x[keep] = r.x
        r = dataclasses.replace(r, x=x)
    return dataclasses.replace(r, time_s=time.perf_counter() - t0)


def combine(r: SolveResult, searched: SolveResult | None, lp_bound: float | None,
            mip_rel_gap: float) -> SolveResult:
    """The MILP backend's result ``r``, with the plan of a branch and bound that gave up
    (``searched``) where it is better, and the largest valid bound of the three (the LP
    relaxation's ``lp_bound``, the tree bound, the backend's). A proven infeasibility stands."""
    if r.status is SolveStatus.INFEASIBLE:
        return r
    if searched is not None and searched.has_solution and (
            not r.has_solution or searched.objective < r.objective):
        status = SolveStatus.OPTIMAL if r.status is SolveStatus.OPTIMAL else SolveStatus.FEASIBLE
        r = dataclasses.replace(r, backend=searched.backend, status=status, x=searched.x,
                                objective=searched.objective)
    known = [b for b in (lp_bound, None if searched is None else searched.bound,
                         None if r.status is SolveStatus.ERROR else r.bound)
             if b is not None and np.isfinite(b)]
    bound = max(known) if known else None
    if bound is not None and r.objective is not None:
        bound = min(bound, r.objective)
    gap = relative_gap(r.objective, bound)
    status = r.status
    if status is SolveStatus.FEASIBLE and gap is not None and gap <= mip_rel_gap:
        status = SolveStatus.OPTIMAL  # the bounds together prove it
    return dataclasses.replace(r, status=status, bound=bound, gap=gap)


def tightened(milp: MILP, rows: list[int], delta: float) -> MILP:
    """``milp`` with the right-hand sides of ``rows`` lowered by ``delta``."""
    upper = milp.row_upper.copy()
    upper[rows] = upper[rows] - delta
    return dataclasses.replace(milp, row_upper=upper)


def solve_within_capacity(
    milp: MILP,
    memory_rows: list[int],
    capacity_bytes: float,
    memory_of: Callable[[np.ndarray], float],
    solve_fn: Callable[[MILP, float | None], SolveResult],
    time_limit_s: float | None,
) -> SolveResult:
    """``solve_fn(milp, time limit)``, solved again with the memory rows (memory / cap
    :math:`\\le 1`) tightened while the plan's memory (``memory_of(x)``, bytes per device)
    exceeds ``capacity_bytes`` (module docstring). A tightened result has
    ``extra["proof_capacity_bytes"]``, the memory per device its bound covers."""
    t0 = time.perf_counter()
    r = solve_fn(milp, time_limit_s)
    delta = 0.0
    for attempt in range(MAX_TIGHTENINGS + 1):
        if not r.has_solution or not memory_rows or not np.isfinite(capacity_bytes):
            break
        over = memory_of(r.x) / capacity_bytes - 1.0
        if over <= MEMORY_RTOL:
            break
        if attempt == MAX_TIGHTENINGS:
            r = SolveResult(r.backend, SolveStatus.ERROR, None, None, None, None, r.time_s,
                            f"every plan the solver returned exceeds the memory cap (the last "
                            f"by {over:.3g} of it, after {attempt} tightenings)")
            break
        delta = max(2.0 * delta, delta + 2.0 * over)
        left = None if time_limit_s is None else max(
            time_limit_s - (time.perf_counter() - t0), 1e-3)
        r = solve_fn(tightened(milp, memory_rows, delta), left)
    if delta > 0.0:
        r = dataclasses.replace(r, time_s=time.perf_counter() - t0, extra={
            **r.extra, "proof_capacity_bytes": capacity_bytes * (1.0 - delta)})
    return r
