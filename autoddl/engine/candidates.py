r"""Branch and bound over candidates: the best plan of many (mesh, pipeline degree) ILPs, fast.

A plan is the best over candidates :math:`c` (meshes, pipeline degrees) of the optimum
:math:`z_c` of each candidate's ILP. Solving every ILP is what makes big clusters slow (61
candidates for 1,024 GPUs, 3-axis ones with 200k variables; 190 for 2,520), so the search runs
in two phases:

1. **Screen.** Every candidate's costs are built and its Lagrangian tree relaxation
   (:mod:`autoddl.formulations.bounds`) gives, in a fraction of a second, a lower bound
   :math:`\ell_c \le z_c` and a feasible plan of cost :math:`u_c \ge z_c`. The incumbent is the
   cheapest of those plans: :math:`U = \min_c u_c`.
2. **Solve, best bound first.** In increasing :math:`\ell_c`: a candidate with
   :math:`\ell_c \ge U (1 - \text{gap})` cannot improve on the incumbent beyond the requested
   gap and is *pruned* unsolved; otherwise its ILP is solved with the cutoff row
   :math:`\text{objective} \le U (1 - \text{gap})` (an infeasible answer proves
   :math:`z_c \ge U (1 - \text{gap})`: *dominated*) and a better plan becomes the incumbent.

The result is exact: at the end :math:`U \le z_c` (within the solver's gap) for every candidate
solved to optimality, :math:`U (1-\text{gap}) \le z_c` for every dominated one and
:math:`U (1-\text{gap}) \le \ell_c \le z_c` for every pruned one. Under a time limit the
candidates left unsolved keep their :math:`\ell_c`, and the plan reports the global bound
:math:`\min(U, \min_c \text{bound}_c)` and its gap.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autoddl.engine.costs import CostedGraph
from autoddl.formulations.bounds import tree_bound
from autoddl.formulations.milp import SolveResult, SolveStatus, relative_gap
from autoddl.formulations.sharding import ShardingProblem

INF = float("inf")


@dataclass(frozen=True, eq=False)
class Prepared:
    """A candidate whose costs are built, ready to be bounded and solved.

    ``solve(cutoff, time_limit_s)`` runs its ILP and returns a Candidate (planner.Candidate);
    ``make(choice, result)`` turns a signature index per node of ``problem`` into one.
    """

    label: str
    stages: int
    costed: CostedGraph
    problem: ShardingProblem | None  # what the fast bound screens; None: never screened
    offset_s: float  # added to the problem's objective (the pipeline bubble)
    build_s: float
    solve: Callable[[float, float | None], object]
    make: Callable[[np.ndarray, SolveResult], object]
    uses_cutoff: bool = True  # whether ``solve`` honours its cutoff (infeasible = dominated)


@dataclass(frozen=True)
class SearchResult:
    """The best candidate (or None), every candidate's record, the ILPs solved, the proof."""

    best: object | None
    records: list[dict]
    solved: list
    bound: float  # a lower bound on every plan of every candidate
    gap: float | None
    timed_out: bool


@dataclass(frozen=True)
class Job:
    """A candidate not built yet: its label, pipeline degree, mesh shape and how to build it."""

    label: str
    stages: int
    shape: tuple[int, ...]
    build: Callable[[], Prepared]

    def record(self) -> dict:
        """The start of this candidate's record in the plan file."""
        return {"mesh": self.label, "stages": self.stages, "shape": list(self.shape),
                "build_s": None, "lower_bound": None, "heuristic": None}


#: the jobs of the search in progress, read by forked screening workers (set before forking)
_JOBS: list[Job] = []


def _screen(i: int) -> tuple[int, dict, np.ndarray | None]:
    """Build candidate ``i`` and bound it: (i, its record, the heuristic plan's choice)."""
    return _bound(i, _JOBS[i].build())


def _bound(i: int, prep: Prepared) -> tuple[int, dict, np.ndarray | None]:
    """Bound built candidate ``i``: (i, its record, the heuristic plan's choice)."""
    rec = {**_JOBS[i].record(), "build_s": prep.build_s}
    if prep.problem is None:
        return i, rec, None
    t1 = time.perf_counter()
    b = tree_bound(prep.problem)
    ub = b.upper_bound + prep.offset_s
    rec.update(lower_bound=b.lower_bound + prep.offset_s, heuristic=ub if np.isfinite(ub) else None,
               bound_s=time.perf_counter() - t1)
    return i, rec, b.choice


def default_workers() -> int:
    """Processes to screen candidates with: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _screen_all(jobs: list[Job], workers: int, deadline: float,
                log: Callable[[str], None] | None = None,
                built: dict[int, Prepared] | None = None
                ) -> list[tuple[dict, np.ndarray | None] | None]:
    """Every candidate's record and heuristic choice (None where the deadline came first),
    in ``workers`` forked processes when there are enough candidates to pay for them;
    ``log`` hears "screening k/N" about ten times. Screened in this process, the built
    candidates are kept in ``built`` for the solve phase."""
    global _JOBS
    out: list[tuple[dict, np.ndarray | None] | None] = [None] * len(jobs)
    _JOBS = jobs
    every = max(1, len(jobs) // 10)

    def done(k: int) -> None:
        if log and (k % every == 0 or k == len(jobs)):
            log(f"screening {k}/{len(jobs)} candidates")
    try:
        if workers > 1 and len(jobs) >= 8 and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(workers) as pool:
                for k, (i, rec, choice) in enumerate(
                        pool.imap_unordered(_screen, range(len(jobs))), 1):
                    out[i] = (rec, choice)
                    done(k)
                    if time.perf_counter() > deadline:
                        pool.terminate()
                        break
        else:
            for i in range(len(jobs)):
                if time.perf_counter() > deadline:
                    break
                prep = jobs[i].build()
                if built is not None:
                    built[i] = prep
                _, rec, choice = _bound(i, prep)
                out[i] = (rec, choice)
                done(i + 1)
    finally:
        _JOBS = []
    return out


def search(jobs: list[Job], *, mip_rel_gap: float = 1e-6,
           time_limit_s: float | None = None, screen: bool = True, workers: int | None = None,
           log: Callable[[str], None] | None = None) -> SearchResult:
    """The best plan over ``jobs`` (see the module docstring); ``screen=False`` solves every
    candidate's ILP in the given order, as a check of the screening. Screening runs in
    ``workers`` processes (default: the CPUs available)."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s if time_limit_s else INF
    best, best_obj = None, INF
    built: dict[int, Prepared] = {}

    def prepared(i: int) -> Prepared:
        if i not in built:
            built[i] = jobs[i].build()
        return built[i]

    preps: list[tuple[int, float, dict]] = []
    unscreened = 0
    if screen:
        screened = _screen_all(jobs, workers or default_workers(), deadline, log, built)
        unscreened = sum(g is None for g in screened)
        heur = None
        for i, got in enumerate(screened):
            if got is None:  # not screened before the deadline: nothing known
                preps.append((i, -INF, jobs[i].record()))
                continue
            rec, choice = got
            lb = rec["lower_bound"] if rec["lower_bound"] is not None else -INF
            preps.append((i, lb, rec))
            if choice is not None and rec["heuristic"] < best_obj:
                heur, best_obj = (i, choice, rec), rec["heuristic"]
        if heur is not None:
            i, choice, rec = heur
            r = SolveResult("tree relaxation (heuristic)", SolveStatus.FEASIBLE, None, best_obj,
                            rec["lower_bound"], relative_gap(best_obj, rec["lower_bound"]),
                            rec["bound_s"])
            best = prepared(i).make(choice, r)
        if log:
            log(f"screened {sum(g is not None for g in screened)} of {len(jobs)} candidates in "
                f"{time.perf_counter() - t0:.2f} s"
                + (f"; best heuristic plan {best_obj:.6g} s" if best is not None else ""))
    else:
        preps = [(i, -INF, jobs[i].record()) for i in range(len(jobs))]
    records, solved, bounds = [], [], []
    order = sorted(range(len(preps)), key=lambda i: preps[i][1]) if screen \
        else list(range(len(preps)))
    timed_out = unscreened > 0
    for n, j in enumerate(order):
        i, lb, rec = preps[j]
        records.append(rec)
        if best is not None and lb >= best_obj * (1 - mip_rel_gap) - 1e-15:
            rec.update(status="pruned", objective=None, gap=None, time_s=0.0, variables=None)
            bounds.append(lb)
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            timed_out = True
            rec.update(status="not solved (time limit)", objective=None, gap=None, time_s=0.0,
                       variables=None)
            bounds.append(lb)
            continue
        prep = prepared(i)
        rec["build_s"] = prep.build_s
        # only a plan better than the best by more than the gap matters: what cannot reach
        # that comes back infeasible (dominated), proving z_c >= best (1 - gap)
        cut = best_obj * (1 - mip_rel_gap) if prep.uses_cutoff else INF
        c = prep.solve(cut, None if not np.isfinite(remaining) else remaining)
        solved.append(c)
        r = c.result
        status = r.status.value
        if r.status is SolveStatus.OPTIMAL:
            bounds.append(min(r.objective, r.bound if r.bound is not None else r.objective))
        elif r.status is SolveStatus.INFEASIBLE:
            if np.isfinite(cut):
                status = "dominated"  # proven unable to beat the best plan known before it
            bounds.append(cut)  # inf without a cutoff: no plan at all
        else:  # time limit: what the solver proved, at least the screening bound
            timed_out = True
            bounds.append(max(lb, r.bound if r.bound is not None else -INF))
        rec.update(status=status, objective=r.objective, gap=r.gap, time_s=r.time_s,
                   variables=c.num_cols)
        if c.choice is not None and r.objective < best_obj:
            best, best_obj = c, r.objective
        if log:  # the global gap so far: unsolved candidates bounded by the next (sorted) bound
            rest = [preps[k][1] for k in order[n + 1:]]
            low = min([best_obj] + bounds + rest)
            now = (f"; best {best_obj:.6g} s, global gap {100 * relative_gap(best_obj, low):.3g} %"
                   if best is not None and np.isfinite(low) else "")
            log(f"ILP {n + 1}/{len(order)} {prep.label}: {status}"
                + (f", objective {r.objective:.6g} s" if r.objective is not None else "")
                + (f" (bound {lb:.6g} s)" if np.isfinite(lb) else "") + now)
    bound = min([best_obj] + bounds)
    gap = relative_gap(best_obj, bound) if best is not None else None
    for rec in records:  # plan files hold finite numbers or null
        for k in ("lower_bound", "heuristic", "objective"):
            if rec.get(k) is not None and not np.isfinite(rec[k]):
                rec[k] = None
    if best is not None:
        # a dominated candidate's bound is best (1 - gap): the global gap is the requested one
        # up to rounding
        status = (SolveStatus.OPTIMAL
                  if gap is not None and gap <= max(mip_rel_gap, 1e-9) * (1 + 1e-6)
                  else SolveStatus.FEASIBLE)
        best = dataclasses.replace(best, result=dataclasses.replace(
            best.result, status=status, bound=bound if np.isfinite(bound) else None, gap=gap))
    pruned = sum(r["status"] in ("pruned", "dominated") for r in records)
    if log:
        log(f"{len(solved)} ILPs solved, {pruned} candidates pruned or dominated, "
            f"{time.perf_counter() - t0:.2f} s")
    return SearchResult(best, records, solved, bound, gap, timed_out)
