"""Solver backends for :class:`~autoddl.formulations.milp.MILP`: one ``solve`` call, many solvers.

===================  =========================================================================
name                 solver and API
===================  =========================================================================
``highs``            HiGHS via ``highspy``; the model is passed as numpy CSC arrays in one call
``ortools-highs``    HiGHS bundled in OR-Tools, via ``ortools.linear_solver.pywraplp``
``ortools-scip``     SCIP via ``pywraplp``
``ortools-cbc``      CBC via ``pywraplp``
``ortools-cpsat``    CP-SAT via ``ortools.sat.python.cp_model`` (all columns integer, see below)
``pulp-cbc``         PuLP's bundled CBC binary (``PULP_CBC_CMD``)
``pulp-highs``       PuLP's in-process HiGHS class (``pulp.HiGHS``, which drives ``highspy``)
===================  =========================================================================

OR-Tools MIP solvers use ``pywraplp`` (MPSolver) rather than MathOpt because it is the only
OR-Tools API reaching HiGHS, SCIP and CBC alike (MathOpt has no CBC), loads a whole model as one
proto, is silent by default and has uniform gap/time-limit/bound calls. CP-SAT uses its own
``cp_model`` API because it needs an integer model whose scaling we control; see
:class:`~autoddl.formulations.backends._ortools.CpSatBackend` for the exact rules (every column
integer, finite bounds required, objective scaled by a power of two to ~2**50, result objective
recomputed as ``milp.evaluate(x)``).

Every result is normalized the same way: ``x`` as float64 with integer columns ``np.round``-ed,
``objective = milp.evaluate(x)`` (offset included), ``bound`` the best dual bound (offset included;
the objective itself for a pure LP or when a solver proves optimality without reporting a bound),
``gap = relative_gap(objective, bound)``, ``time_s`` the wall time of the call, and status
OPTIMAL / FEASIBLE / INFEASIBLE / NO_SOLUTION / ERROR (with ``message``). Solvers are silent on
stdout, use at most 2 threads, and give the same answer for the same input (absent time limits).

LP-based backends hand the solver the objective times a power of two that centers the costs
around 1 (exact; see :func:`~autoddl.formulations.backends._common.objective_scale`): costs in
seconds, down to 1e-9, would otherwise drown in solvers' absolute tolerances.

No solver library is imported by this module: each backend imports its package inside its own
functions, in an order that lets all of them live in one process (``import pulp`` first would break
OR-Tools' HiGHS, so the PuLP backends load OR-Tools before pulp; see ``_ortools``). The planner
calls :func:`preload` once, before it forks screening processes or starts any thread: it imports
OR-Tools (before any pulp) and ``highspy`` (through its one cached loader,
:func:`~autoddl.formulations.backends._highs.load_highspy`), so no solver module is first imported
while other threads or processes run (a racy ``import highspy`` failed with ``generic_type: type
"ObjSense" is already registered!``).

**Crash isolation.** The OR-Tools backends (``ortools-highs``, ``ortools-scip``, ``ortools-cbc``,
``ortools-cpsat``) solve in a worker process (:mod:`~autoddl.formulations.backends._isolated`):
a segmentation fault or abort in their native code (seen in CBC's ``Solve``) becomes a result
with status ERROR, ``extra["crashed"] = True`` and a message naming the signal. The in-process
backends (``highs``, ``pulp-*``) are not isolated: HiGHS through ``highspy`` has not crashed here,
and it is the fallback. :func:`solve_or_fall_back` is the policy the planner applies:

* the user named no backend (the default search): a crashed solve is solved again by the first
  available in-process backend of :data:`CRASH_FALLBACK` (``highs``), within what is left of the
  time limit; the result's ``message`` and ``extra["fallback"]`` say which solver crashed, how,
  and which one answered (the planner prints it with ``-v`` and keeps it in the plan's solver
  info);
* the user named the crashed backend (``--backend ortools-cbc``): no silent substitution (a
  benchmark of that backend must not measure another); :class:`SolverError` (exit code 2, one
  line) names the backend and the signal and suggests another backend.

The isolation costs about 2.5 ms per solve, measured here: 2.4 ms on a 29-column MILP, 2.8 ms
on a 21,838-column GPT sharding MILP (whose CBC solve takes 0.8 s), plus 0.4-1.0 s once per
planning process to start the worker (and again after a crash); details in ``_isolated``, where
``AUTODDL_FAULT_SOLVER=segv`` (tests) makes the worker crash on purpose.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

from autoddl.errors import SolverError, UserError
from autoddl.formulations.backends import _highs, _ortools
from autoddl.formulations.backends._common import Backend
from autoddl.formulations.backends._highs import HighsBackend
from autoddl.formulations.backends._isolated import IsolatedBackend
from autoddl.formulations.backends._ortools import CpSatBackend, PywraplpBackend
from autoddl.formulations.backends._pulp import PulpBackend
from autoddl.formulations.milp import MILP, SolveResult

__all__ = ["BACKENDS", "CRASH_FALLBACK", "DEFAULT_BACKEND", "Backend", "available_backends",
           "default_backend", "default_search", "get_backend", "preload", "solve", "solve_or_fall_back"]

#: The backend that proved optimality fastest on the sharding ILPs of
#: experiments/backend_speed.py (results/backends.md: e.g. 0.32 s vs 1.5-2.9 s for the HiGHS
#: backends on a 22,592-variable 2x2-mesh GPT problem, 8.4 s vs 11.5-17 s on a 289,327-variable
#: 3-axis one). Where OR-Tools is missing, :func:`default_backend` falls back in this order.
DEFAULT_BACKEND = "ortools-cbc"
_FALLBACK_ORDER = ("ortools-cbc", "highs", "pulp-cbc", "ortools-highs", "pulp-highs",
                   "ortools-scip", "ortools-cpsat")

#: Every backend, by name, in order of preference.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        HighsBackend(),
        IsolatedBackend(PywraplpBackend("ortools-highs", "HIGHS")),
        IsolatedBackend(PywraplpBackend("ortools-scip", "SCIP")),
        IsolatedBackend(PywraplpBackend("ortools-cbc", "CBC")),
        IsolatedBackend(CpSatBackend()),
        PulpBackend("pulp-cbc", "cbc"),
        PulpBackend("pulp-highs", "highs"),
    )
}


#: above this many variables the default backend is HiGHS: CBC proves small sharding ILPs
#: fastest (results/backends.md) but took 212 s against HiGHS's 58 s on the 21,624-variable
#: GPT-3 175B problem of the 128x8 mesh (results/solve_scaling.md)
LARGE_MILP_COLS = 5000


#: in-process backends that solve again what a crashed (isolated) backend could not, in order
CRASH_FALLBACK = ("highs", "pulp-cbc", "pulp-highs")


def preload() -> None:
    """Import the installed solver libraries now, once: OR-Tools first (so that a later ``import
    pulp`` cannot break it), then ``highspy``. Call before forking processes or starting
    threads; later calls cost nothing."""
    _ortools.preload()
    if importlib.util.find_spec("highspy") is not None:
        _highs.load_highspy()


def available_backends() -> list[str]:
    """Names of the backends usable in this environment, in :data:`BACKENDS` order."""
    return [name for name, b in BACKENDS.items() if b.available()]


def default_backend() -> str:
    """:data:`DEFAULT_BACKEND` if installed, else the next installed one in fallback order."""
    for name in _FALLBACK_ORDER:
        if BACKENDS[name].available():
            return name
    raise UserError("no solver backend is installed: `pip install ortools` (or highspy, pulp)")


def default_search() -> str:
    """What solves each ILP when the user names no backend, in words (``autoddl backends``;
    :func:`autoddl.formulations.solving.solve_lp_first`, ``autoddl.engine.planner.size_backend``)."""
    last = default_backend()
    if not BACKENDS["highs"].available():
        return f"without --backend every ILP is solved by {last}"
    large = ("" if last == "highs" else
             f" ({last} for ILPs of at most {LARGE_MILP_COLS:,} variables whose step has no "
             "slowest-stage or exposed-communication term, else highs)")
    return ("without --backend each ILP is first solved by highs as a plain linear program "
            "(fractions allowed), and that answer is kept where it comes out in whole numbers; "
            "otherwise autoddl's branch and bound searches (its linear programs on highs), and "
            f"where it gives up the ILP goes to a MILP solver{large}. With --backend NAME the "
            "linear program still comes first, then NAME solves every ILP itself")


def get_backend(name: str | None) -> Backend:
    """The backend called ``name`` (None: the default); :class:`UserError` if unknown or its
    package is missing."""
    name = default_backend() if name is None else name
    backend = BACKENDS.get(name)
    if backend is None:
        raise UserError(f"unknown solver backend {name!r}; known backends: {', '.join(BACKENDS)}")
    if not backend.available():
        raise UserError(f"solver backend {name!r} is not available here: "
                        f"install it with `pip install {backend.package}`")
    return backend


def solve(
    milp: MILP,
    backend: str | None = None,
    time_limit_s: float | None = None,
    mip_rel_gap: float = 1e-6,
) -> SolveResult:
    """Minimize ``milp`` with the named backend (None: :func:`default_backend`) and return a normalized :class:`SolveResult`.

    ``time_limit_s`` (None: unlimited) bounds the solver's run; when it is hit, the status is
    FEASIBLE with the best solution found or NO_SOLUTION. ``mip_rel_gap`` is the relative gap at
    which a MIP counts as solved (status OPTIMAL). Raises :class:`UserError` for an unknown or
    unavailable backend, or a model the backend cannot take (CP-SAT with infinite bounds).
    """
    if time_limit_s is not None and not time_limit_s > 0:
        raise UserError(f"time limit must be positive seconds, got {time_limit_s}")
    if not 0 <= mip_rel_gap < 1:
        raise UserError(f"mip_rel_gap must be in [0, 1), got {mip_rel_gap}")
    milp.check()
    return get_backend(backend).solve(milp, time_limit_s, mip_rel_gap)


def solve_or_fall_back(
    milp: MILP,
    backend: str | None = None,
    *,
    named: bool = False,
    time_limit_s: float | None = None,
    mip_rel_gap: float = 1e-6,
) -> SolveResult:
    """:func:`solve`, with the crash policy of the module docstring: where ``backend``'s process
    crashed, solve again with the first available :data:`CRASH_FALLBACK` backend (saying so in
    ``message`` and ``extra["fallback"]``), or, when the user ``named`` that backend, raise
    :class:`SolverError`."""
    t0 = time.perf_counter()
    r = solve(milp, backend=backend, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    if not r.extra.get("crashed"):
        return r
    name = backend or default_backend()
    spare = next((b for b in CRASH_FALLBACK if b != name and BACKENDS[b].available()), None)
    if named:
        hint = f", e.g. --backend {spare}" if spare else ""
        how = r.message.split(": ", 1)[-1]  # "its solver process was killed by SIGSEGV (...)"
        raise SolverError(f"solver backend {name!r} crashed: {how}; choose another "
                          f"backend{hint}")
    if spare is None:
        return r
    left = None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - t0), 1e-3)
    note = f"{r.message}; solved with {spare} instead"
    again = solve(milp, backend=spare, time_limit_s=left, mip_rel_gap=mip_rel_gap)
    return dataclasses.replace(again, message=(note + "; " + again.message).rstrip("; "),
                               extra={**again.extra, "fallback": note},
                               time_s=time.perf_counter() - t0)
