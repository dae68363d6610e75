r"""Branch and bound over candidates: the best plan of many (mesh, pipeline degree) ILPs, fast.

A plan is the best over candidates :math:`c` (meshes, pipeline degrees) of the optimum
:math:`z_c` of each candidate's ILP. Solving every ILP is what makes big clusters slow (61
candidates for 1,024 GPUs, 3-axis ones with 200k variables; 190 for 2,520), so the search runs
in two phases:

1. **Screen.** Every candidate's costs are built and its Lagrangian tree relaxation
   (:mod:`autoddl.formulations.bounds`) gives, in a fraction of a second, a lower bound
   :math:`\ell_c \le z_c` and a feasible plan of cost :math:`u_c \ge z_c`. The incumbent is the
   cheapest of those plans: :math:`U = \min_c u_c`. The *seeds* (unpipelined meshes of one or
   two axes, cheap to build) are screened first; their best plan :math:`U_0` then lets every
   other candidate stop after one tree pass when its relaxation without memory,
   :math:`\ell^0_c = L_c(0) \le \ell_c`, is already :math:`\ge U_0 (1 - \text{gap})` (51 of
   GPT-3 175B's 61 candidates): it keeps :math:`\ell^0_c` as its bound. While the worker
   processes screen the others, this process solves the ILP of the seed with the least bound,
   with the cutoff :math:`U_0 (1 - \text{gap})`: candidates are solved in parallel with the
   screening. The records do not depend on the number of workers.
2. **Solve, unpipelined candidates first, each kind best bound first**
   (:func:`_solve_order`). In that order: a candidate with
   :math:`\ell_c \ge U (1 - \text{gap})` cannot improve on the incumbent beyond the requested
   gap and is *pruned* unsolved; otherwise its ILP is solved with the cutoff row
   :math:`\text{objective} \le U (1 - \text{gap})` (an infeasible answer proves
   :math:`z_c \ge U (1 - \text{gap})`: *dominated*) and a better plan becomes the incumbent.

The result is exact: at the end :math:`U \le z_c` (within the solver's gap) for every candidate
solved to optimality, :math:`U (1-\text{gap}) \le z_c` for every dominated one and
:math:`U (1-\text{gap}) \le \ell_c \le z_c` for every pruned one. Under a time limit the
candidates left unsolved keep their :math:`\ell_c`, one whose ILP was cut short keeps the best
bound its solve proved (LP relaxation, tree or solver bound; at least :math:`\ell_c`, at most its
cutoff), and the plan reports the global bound :math:`\min(U, \min_c \text{bound}_c)` and its
gap.

Every threshold is relative, :math:`U (1 - \text{gap})` exactly, with no absolute term: costs are
seconds of any magnitude (a 90 µs objective once ended "feasible" at gap 1.0000109e-6 because of
an absolute 1e-15 in the pruning test), so pruning and the final check agree at any scale.

**Forking the screening processes.** The pool is started with ``fork`` (the jobs are closures,
which other start methods cannot send), and only when no other Python thread runs in this process
(otherwise the candidates are screened here: the records do not depend on it). A fork copies the
locks of every thread; Python's import locks are taken only by threads running Python, so with
this one alone no child can inherit a half-done import. Native threads (torch's intra-op pool,
HiGHS' scheduler) hold no Python lock, and the children run only numpy code (the tree
relaxation), never torch or a solver. The planner imports the solver libraries before (see
:func:`autoddl.formulations.backends.preload`), so no import of one happens while the pool's
threads run beside the seed solve in this process, and the OR-Tools solvers run in their own
spawned worker process, never in a fork.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autoddl.engine.costs import CostedGraph
from autoddl.engine.provenance import SCREENING_FINDER
from autoddl.formulations.bounds import TreeBound
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
    """A candidate not built yet: its label, pipeline degree, mesh shape and how to build it.

    A *derived* candidate names its ``parent`` (an index into the same job list) and a
    ``bound_scale`` r with :math:`z \\ge r\\,\\ell` for every lower bound :math:`\\ell` of the
    parent's plans (interleaved pipelines: their v = 1 candidate,
    :func:`autoddl.engine.programs.interleave_bound_scale`): it is screened after every other
    candidate, and not even built when :math:`r\\,\\ell` already reaches the best plan found."""

    label: str
    stages: int
    shape: tuple[int, ...]
    build: Callable[[], Prepared]
    interleave: int = 1
    parent: int | None = None
    bound_scale: float = 1.0

    def record(self) -> dict:
        """The start of this candidate's record in the plan file."""
        return {"mesh": self.label, "stages": self.stages, "shape": list(self.shape),
                **({"interleave": self.interleave} if self.interleave > 1 else {}),
                "build_s": None, "lower_bound": None, "heuristic": None}



#: the jobs of the search in progress, read by forked screening workers (set before forking)
_JOBS: list[Job] = []


def _default_sigterm() -> None:
    """A screening worker dies of SIGTERM at once (``Pool.terminate``). The handler it would
    inherit (:func:`~autoddl.errors.raise_on_sigterm`) runs only between bytecodes: a signal
    landing just before the worker blocks on the task queue's lock was seen and then never
    acted on, and ``terminate`` waited for that worker forever (seen once while timing plans)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _screen(task: tuple[int, float]) -> tuple[int, dict, np.ndarray | None]:
    """Build candidate ``task[0]`` and bound it (pruning at ``task[1]``, see :func:`_bound`)."""
    i, prune_at = task
    return _bound(i, _JOBS[i].build(), prune_at)


def _bound(i: int, prep: Prepared, prune_at: float = INF, job: Job | None = None
           ) -> tuple[int, dict, np.ndarray | None]:
    """Bound built candidate ``i`` (``job``, default the ``i``-th of the screening): (i, its
    record, the heuristic plan's choice). A candidate whose relaxation without memory (one tree
    pass) is already ``>= prune_at`` (a known plan's cost, less the gap) stops there, with that
    bound and no plan of its own."""
    rec = {**(job or _JOBS[i]).record(), "build_s": prep.build_s}
    if prep.problem is None:
        return i, rec, None
    t1 = time.perf_counter()
    relaxation = TreeBound(prep.problem)
    if np.isfinite(prune_at):
        lb0 = relaxation.solve(np.zeros(len(relaxation.groups)))[0] + prep.offset_s
        if lb0 >= prune_at:
            rec.update(lower_bound=lb0, bound_s=time.perf_counter() - t1)
            return i, rec, None
    b = relaxation.best()
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


def seed_jobs(jobs: list[Job]) -> list[int]:
    """The candidates screened first, for a plan to prune the others with: the unpipelined
    meshes of one or two axes (cheap to build; with a fast and a slow axis, where the plans
    of data and tensor parallelism lie). Empty when that is every candidate."""
    first = [i for i, j in enumerate(jobs) if j.stages == 1 and len(j.shape) <= 2]
    return first if len(first) < len(jobs) else []


Screened = list[tuple[dict, np.ndarray | None] | None]


def _from_parent(job: Job, out: Screened) -> tuple[dict, None]:
    """A derived candidate's record, unbuilt: its parent's screening bound, scaled."""
    assert job.parent is not None
    got = out[job.parent]
    lb = None if got is None or got[0]["lower_bound"] is None \
        else job.bound_scale * got[0]["lower_bound"]
    return {**job.record(), "lower_bound": lb, "bound_s": 0.0, "bound_from": "parent"}, None


def _screen_all(jobs: list[Job], workers: int, deadline: float, gap: float,
                log: Callable[[str], None] | None = None,
                built: dict[int, Prepared] | None = None,
                meanwhile: Callable[[Screened, float], None] | None = None) -> Screened:
    """Every candidate's record and heuristic choice (None where the deadline came first), in
    ``workers`` forked processes when there are enough candidates to pay for them.

    Two phases: the :func:`seed_jobs` are bounded fully; the cheapest plan they give, less the
    gap, then prunes each other candidate whose relaxation without memory reaches it (one tree
    pass instead of a search over multipliers). ``meanwhile(seed results, prune_at)`` runs in
    this process while the workers screen the rest. Derived candidates (:class:`Job`) are not
    built: they get their parent's bound, scaled (:func:`search` bounds them when it must).
    ``log`` hears "screening k/N" about ten times. Screened in this process, the built
    candidates are kept in ``built``."""
    global _JOBS
    out: Screened = [None] * len(jobs)
    _JOBS = jobs
    every = max(1, len(jobs) // 10)
    done = 0

    def report() -> None:
        if log and (done % every == 0 or done == len(jobs)):
            log(f"screening {done}/{len(jobs)} candidates")

    seeds = seed_jobs(jobs)
    derived = [i for i, j in enumerate(jobs) if j.parent is not None]
    rest = sorted(set(range(len(jobs))) - set(seeds) - set(derived))
    phases = [p for p in (seeds, rest) if p]

    def prune_at() -> float:
        if not seeds:
            return INF
        ubs = [out[i][0]["heuristic"] for i in seeds
               if out[i] is not None and out[i][0]["heuristic"] is not None]
        return min(ubs) * (1 - gap) if ubs else INF

    def here(ids: list[int], cut: float):
        """Screen in this process, lazily, keeping what was built; none past the deadline."""
        for i in ids:
            if time.perf_counter() > deadline:
                return
            prep = jobs[i].build()
            if built is not None:
                built[i] = prep
            yield _bound(i, prep, cut)

    parallel = (workers > 1 and len(jobs) >= 8 and "fork" in mp.get_all_start_methods()
                and threading.active_count() == 1)  # fork only without other Python threads
    pool = (mp.get_context("fork").Pool(workers, initializer=_default_sigterm) if parallel
            else None)
    if log:
        log(f"screening {len(jobs)} candidates in {workers if pool else 1} process(es)")
    try:
        for phase, ids in enumerate(phases):
            cut = prune_at() if phase else INF
            results = (pool.imap_unordered(_screen, [(i, cut) for i in ids]) if pool
                       else here(ids, cut))  # the pool starts at once, ``here`` when iterated
            if meanwhile is not None and phase == len(phases) - 1:
                meanwhile(out, cut)
            for i, rec, choice in results:
                out[i] = (rec, choice)
                done += 1
                report()
                if time.perf_counter() > deadline:
                    return out
        for i in derived:
            out[i] = _from_parent(jobs[i], out)
            done += 1
        report()
    finally:
        if pool is not None:
            pool.terminate()
        _JOBS = []
    return out


def _solve_order(jobs: list[Job], preps: list[tuple[int, float, dict]]) -> list[int]:
    """Unpipelined candidates first, then pipelined ones, each best bound first; derived
    candidates last, under the best plan of the others and their parent's proof. Unpipelined
    ILPs are the quickest to solve, and their best plan is the cutoff that proves most
    pipelines dominated at their LP (GPT-3 175B with recomputation chosen per layer: a
    2-stage pipeline's ILP solved first, under the screening's 46 s plan, ran past 10 minutes).
    The order changes the time, never the answer."""
    return sorted(range(len(preps)), key=lambda j: (jobs[preps[j][0]].parent is not None,
                                                    jobs[preps[j][0]].stages > 1,
                                                    preps[j][1]))


def _bound_derived(job: Job, i: int, prepared: Callable[[int], Prepared], lb: float, rec: dict,
                   proven: dict[int, float], prune_at: float, build: bool) -> float:
    """The bound of derived candidate ``i`` (screening bound ``lb``, record ``rec``, updated):
    its parent's proven bound, scaled; if that is below ``prune_at`` and ``build``, the larger
    of it and the candidate's own screening (:func:`_bound`, built now)."""
    if job.parent in proven and job.bound_scale * proven[job.parent] > lb:
        lb = job.bound_scale * proven[job.parent]
        rec.update(lower_bound=lb, bound_from="parent")
    if not build or lb >= prune_at or rec.get("bound_from") != "parent":
        return lb
    _, own, _ = _bound(i, prepared(i), prune_at, job)
    if own["lower_bound"] is not None and own["lower_bound"] > lb:
        lb = own["lower_bound"]
        own["bound_from"] = "screening"
    else:
        own.update(lower_bound=lb, bound_from="parent")
    rec.update(own)
    return lb


def _outcome(r: SolveResult, lb: float, cut: float) -> tuple[str, float]:
    """(record status, lower bound on the candidate's plans) of a solved candidate with
    screening bound ``lb``, solved with cutoff ``cut``."""
    if r.status is SolveStatus.OPTIMAL:
        return r.status.value, min(r.objective, r.bound if r.bound is not None else r.objective)
    if r.status is SolveStatus.INFEASIBLE:
        # proven unable to beat the best plan known before it; inf without a cutoff: no plan
        return ("dominated" if np.isfinite(cut) else r.status.value), cut
    # stopped early: what the solve proved (up to its cutoff), at least the screening's bound
    return r.status.value, max(lb, min(r.bound, cut) if r.bound is not None else -INF)


def _ilp_line(n: int, total: int, label: str, status: str, r: SolveResult, lb: float,
              best_obj: float | None, low: float) -> str:
    """The log line of the n-th ILP: its outcome, the best plan and the global gap so far."""
    now = (f"; best {best_obj:.6g} s, global gap {100 * relative_gap(best_obj, low):.3g} %"
           if best_obj is not None and np.isfinite(low) else "")
    words = "no plan better than the best so far" if status == "dominated" else status
    return (f"ILP {n}/{total} {label}: {words}"
            + (f", objective {r.objective:.6g} s" if r.objective is not None else "")
            + (f" (screening's lower bound {lb:.6g} s)" if np.isfinite(lb) else "") + now
            + (f" [{r.extra['fallback']}]" if r.extra.get("fallback") else ""))


def _proven(best: object | None, bound: float, mip_rel_gap: float) -> tuple[object | None,
                                                                            float | None]:
    """``best`` with the global proof as its result's status, bound and gap; and the gap."""
    if best is None:
        return None, None
    gap = relative_gap(best.result.objective, bound)
    # a dominated candidate's bound is best (1 - gap): the global gap is the requested one up
    # to rounding
    status = (SolveStatus.OPTIMAL
              if gap is not None and gap <= max(mip_rel_gap, 1e-9) * (1 + 1e-6)
              else SolveStatus.FEASIBLE)
    return dataclasses.replace(best, result=dataclasses.replace(
        best.result, status=status, bound=bound if np.isfinite(bound) else None, gap=gap)), gap


def _from_screening(jobs: list[Job], screened: Screened, prepared: Callable[[int], Prepared]
                    ) -> tuple[list[tuple[int, float, dict]], object | None, float]:
    """(index, bound, record) per candidate, and the best heuristic plan with its cost."""
    preps, heur, best_obj = [], None, INF
    for i, got in enumerate(screened):
        if got is None:  # not screened before the deadline: nothing known
            preps.append((i, -INF, jobs[i].record()))
            continue
        rec, choice = got
        lb = rec["lower_bound"] if rec["lower_bound"] is not None else -INF
        preps.append((i, lb, rec))
        if choice is not None and rec["heuristic"] < best_obj:
            heur, best_obj = (i, choice, rec), rec["heuristic"]
    if heur is None:
        return preps, None, INF
    i, choice, rec = heur
    r = SolveResult(SCREENING_FINDER, SolveStatus.FEASIBLE, None, best_obj,
                    rec["lower_bound"], relative_gap(best_obj, rec["lower_bound"]),
                    rec["bound_s"])
    return preps, prepared(i).make(choice, r), best_obj


def _screen_phase(jobs: list[Job], workers: int, deadline: float, mip_rel_gap: float,
                  log: Callable[[str], None] | None, built: dict[int, Prepared],
                  prepared: Callable[[int], Prepared], presolved: dict[int, object]
                  ) -> tuple[list[tuple[int, float, dict]], object | None, float, int]:
    """Screen every candidate (:func:`_screen_all`), solving meanwhile the ILP of the seed with
    the least bound into ``presolved``: (index, bound, record) per candidate, the best plan
    (heuristic, or that seed's) and its cost, and how many candidates the deadline left
    unscreened."""
    t0 = time.perf_counter()

    def solve_a_seed(seen: Screened, cut: float) -> None:
        """While workers screen the rest: solve the ILP of the seed with the least bound."""
        seeds = [(got[0]["lower_bound"], i) for i, got in enumerate(seen)
                 if got is not None and got[0]["lower_bound"] is not None]
        if not seeds or not np.isfinite(cut):
            return
        _, i = min(seeds)
        remaining = deadline - time.perf_counter()
        if remaining > 0:  # half of what is left: the screening must finish too
            presolved[i] = (prepared(i).solve(cut, remaining / 2 if np.isfinite(remaining)
                                              else None), cut)

    screened = _screen_all(jobs, workers, deadline, mip_rel_gap, log, built, solve_a_seed)
    unscreened = sum(g is None for g in screened)
    preps, best, best_obj = _from_screening(jobs, screened, prepared)
    for c, _ in presolved.values():  # the seed solved meanwhile: the incumbent from the start
        if c.choice is not None and c.result.objective < best_obj:
            best, best_obj = c, c.result.objective
    if log:
        log(f"screened {len(jobs) - unscreened} of {len(jobs)} candidates in "
            f"{time.perf_counter() - t0:.2f} s"
            + (f"; best plan so far {best_obj:.6g} s" if best is not None else ""))
    return preps, best, best_obj, unscreened


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

    presolved: dict[int, object] = {}
    if screen:
        preps, best, best_obj, unscreened = _screen_phase(
            jobs, workers or default_workers(), deadline, mip_rel_gap, log, built, prepared,
            presolved)
    else:
        preps, unscreened = [(i, -INF, jobs[i].record()) for i in range(len(jobs))], 0
    records, solved, bounds = [], [], []
    order = _solve_order(jobs, preps) if screen else list(range(len(preps)))
    timed_out = unscreened > 0
    proven: dict[int, float] = {}  # candidate -> the lower bound its outcome proved
    for n, j in enumerate(order):
        i, lb, rec = preps[j]
        records.append(rec)
        if jobs[i].parent is not None:
            lb = _bound_derived(jobs[i], i, prepared, lb, rec, proven,
                                best_obj * (1 - mip_rel_gap) if best is not None else INF,
                                screen and time.perf_counter() < deadline)
        proven[i] = lb
        if best is not None and lb >= best_obj * (1 - mip_rel_gap) and i not in presolved:
            rec.update(status="pruned", objective=None, gap=None, time_s=0.0, variables=None)
            bounds.append(lb)
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0 and i not in presolved:
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
        if i in presolved:  # solved during the screening, with a cutoff at least as loose
            c, cut = presolved.pop(i)
        else:
            c = prep.solve(cut, None if not np.isfinite(remaining) else remaining)
        solved.append(c)
        r = c.result
        status, bound = _outcome(r, lb, cut)
        bounds.append(bound)
        proven[i] = bound
        timed_out = timed_out or (time_limit_s is not None and status in (
            SolveStatus.FEASIBLE.value, SolveStatus.NO_SOLUTION.value))
        rec.update(status=status, objective=r.objective, gap=r.gap, time_s=r.time_s,
                   variables=c.num_cols,
                   **{k: r.extra[k] for k in ("fallback", "proof_capacity_bytes")
                      if k in r.extra})
        if c.choice is not None and r.objective < best_obj:
            best, best_obj = c, r.objective
        if log:  # the global gap so far: unsolved candidates bounded by the next (sorted) bound
            low = min([best_obj] + bounds + [preps[k][1] for k in order[n + 1:]])
            log(_ilp_line(n + 1, len(order), prep.label, status, r, lb,
                          best_obj if best is not None else None, low))
    bound = min([best_obj] + bounds)
    for rec in records:  # plan files hold finite numbers or null
        for k in ("lower_bound", "heuristic", "objective"):
            if rec.get(k) is not None and not np.isfinite(rec[k]):
                rec[k] = None
    best, gap = _proven(best, bound, mip_rel_gap)
    pruned = sum(r["status"] in ("pruned", "dominated") for r in records)
    if log:
        log(f"{len(solved)} ILPs solved, {pruned} candidates ruled out (by their screening "
            f"bound or ILP), {time.perf_counter() - t0:.2f} s")
    return SearchResult(best, records, solved, bound, gap, timed_out)
