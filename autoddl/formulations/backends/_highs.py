"""The ``highs`` backend: HiGHS through ``highspy``, the model passed as numpy arrays in one call.

The constraint matrix goes to ``Highs.passModel``'s raw-array overload as canonical CSC (duplicates
summed, sorted), so building the model is vectorized: no Python object or call per variable. The
helpers :func:`new_highs` and :func:`highs_outcome` are shared with the ``pulp-highs`` backend,
which drives the same library.

Silence: ``highspy`` prints a banner to C stdout when the first ``Highs`` object of the process is
constructed, before any option can be set; :func:`new_highs` constructs that first object with
file descriptor 1 pointed at /dev/null, and every object gets ``output_flag=false``.

Loading: every use of ``highspy`` in this package goes through :func:`load_highspy`, which imports
it once per process, under a lock. ``highspy``'s pybind11 module cannot be initialised twice: an
import that failed or raced half way left ``ImportError: generic_type: type "ObjSense" is already
registered!`` for every later one. The planner loads it up front
(:func:`autoddl.formulations.backends.preload`), before any screening process forks or any thread
exists, so no import happens while other threads run.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import time
from types import ModuleType
from typing import Any

import numpy as np

from autoddl.formulations.backends._common import (
    MAX_THREADS,
    Backend,
    all_bounds_finite,
    compress,
    finish,
    objective_scale,
    stdout_silenced,
    trivial_result,
)
from autoddl.formulations.milp import MILP, SolveResult, SolveStatus

_banner_done = False
_highspy: ModuleType | None = None
_load_lock = threading.Lock()

# HiGHS C-API constants for passModel's raw-array overload.
_COLWISE = 1
_MINIMIZE = 1


def load_highspy() -> ModuleType:
    """The ``highspy`` module, imported once per process (the one loader of this package)."""
    global _highspy
    if _highspy is None:
        with _load_lock:
            if _highspy is None:
                _highspy = importlib.import_module("highspy")
    return _highspy


def new_highs() -> Any:
    """A silent ``highspy.Highs`` object (the process' first one is built with stdout muted)."""
    global _banner_done
    highspy = load_highspy()
    if not _banner_done:
        with stdout_silenced():
            h = highspy.Highs()
        _banner_done = True
    else:
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


_threads: int | None = None


def highs_threads() -> int:
    """The ``threads`` option to give HiGHS: 2, or 0 (keep what exists) once the process' HiGHS
    thread scheduler was started by other code with another count. HiGHS fixes the scheduler's
    size at its first run in a process, and refuses to run (kError, status "Not Set") if a later
    ``threads`` option disagrees; a tiny probe run finds out once and starts it with 2 if unset.
    """
    global _threads
    if _threads is None:
        highspy = load_highspy()
        probe = new_highs()
        probe.setOptionValue("threads", MAX_THREADS)
        probe.addVar(0.0, 1.0)
        ok = probe.run() != highspy.HighsStatus.kError
        _threads = MAX_THREADS if ok else 0
    return _threads


def configure(h: Any, time_limit_s: float | None, mip_rel_gap: float) -> None:
    """Set the options every HiGHS solve of this package uses (threads, gaps, limit, seed)."""
    h.setOptionValue("threads", highs_threads())
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    # Only the relative gap decides; HiGHS' default absolute gap (1e-6) would stop early on
    # objectives measured in seconds.
    h.setOptionValue("mip_abs_gap", 0.0)
    if time_limit_s is not None:
        h.setOptionValue("time_limit", max(float(time_limit_s), 1e-3))


#: HiGHS' primal heuristics, off when a known plan is near the LP bound
_HEURISTICS = ("mip_heuristic_run_feasibility_jump", "mip_heuristic_run_rens",
               "mip_heuristic_run_rins", "mip_heuristic_run_root_reduced_cost",
               "mip_heuristic_run_shifting", "mip_heuristic_run_zi_round")


def tune(h: Any, milp: MILP) -> None:
    """Options by kind of model, as measured on the GPT-3 175B candidates
    (``experiments/results/solve_scaling.md``): a pure LP runs unpresolved (presolve's search for
    dependent equations took 4 of 5 s on the 205k-column LP relaxation, the simplex 0.4 s); a
    MILP whose known plan is near its LP bound (:attr:`MILP.incumbent_near`) runs without primal
    heuristics (half of the 24 s that proved a 3-axis candidate dominated went to them; where
    the MILP has a better plan to find, they pay: 30 s against 81 s on GPT-529.6B's)."""
    if not milp.integrality.any():
        h.setOptionValue("presolve", "off")
    elif milp.incumbent_near:
        h.setOptionValue("mip_heuristic_effort", 0.0)
        for name in _HEURISTICS:
            h.setOptionValue(name, False)


def pass_model(h: Any, milp: MILP, scale: float, csc: Any = None) -> Any:
    """Hand ``milp`` to ``h`` in one ``passModel`` call (canonical CSC arrays, objective times
    ``scale``); returns HiGHS' status."""
    csc = csc if csc is not None else compress(milp, "col")
    f64 = np.float64
    return h.passModel(
        milp.num_cols, milp.num_rows, csc.nnz, _COLWISE, _MINIMIZE, 0.0,
        np.ascontiguousarray(milp.c * scale, dtype=f64),
        np.ascontiguousarray(milp.col_lower, dtype=f64),
        np.ascontiguousarray(milp.col_upper, dtype=f64),
        np.ascontiguousarray(milp.row_lower, dtype=f64),
        np.ascontiguousarray(milp.row_upper, dtype=f64),
        csc.start[:-1].astype(np.int32), csc.index.astype(np.int32), csc.value.astype(f64),
        milp.integrality.astype(np.int32),
    )


def highs_outcome(h: Any, milp: MILP) -> tuple[SolveStatus, bool, float | None, str]:
    """Read a solved ``Highs`` object: (status, whether a primal solution exists, bound, message).

    The bound is in the solver's units (objective as passed, without ``milp.offset``). Limits of
    any kind (time, iterations, solutions, interrupt, objective target) give FEASIBLE with a
    solution, NO_SOLUTION without.
    """
    highspy = load_highspy()
    ms = highspy.HighsModelStatus
    status = h.getModelStatus()
    info = h.getInfo()
    has_x = int(info.primal_solution_status) == int(highspy.kSolutionStatusFeasible)
    is_mip = bool(milp.integrality.any())
    bound: float | None = float(info.mip_dual_bound) if is_mip else None
    if status == ms.kOptimal:
        if not is_mip:
            bound = float(info.objective_function_value)
        return SolveStatus.OPTIMAL, has_x, bound, ""
    if status == ms.kInfeasible:
        return SolveStatus.INFEASIBLE, False, None, ""
    if status == ms.kUnboundedOrInfeasible and all_bounds_finite(milp):
        return SolveStatus.INFEASIBLE, False, None, ""  # bounded columns: cannot be unbounded
    limits = {"kTimeLimit", "kIterationLimit", "kSolutionLimit", "kInterrupt", "kHighsInterrupt",
              "kObjectiveBound", "kObjectiveTarget", "kMemoryLimit"}
    if status.name in limits:
        msg = f"HiGHS: {h.modelStatusToString(status)}"
        return (SolveStatus.FEASIBLE if has_x else SolveStatus.NO_SOLUTION), has_x, bound, msg
    return SolveStatus.ERROR, False, None, f"HiGHS: {h.modelStatusToString(status)}"


class HighsBackend(Backend):
    """HiGHS via ``highspy``: vectorized model passing, 2 threads, silent, deterministic."""

    name = "highs"
    package = "highspy"

    def available(self) -> bool:
        """Whether ``highspy`` is installed (checked without importing it)."""
        return importlib.util.find_spec("highspy") is not None

    def solve(self, milp: MILP, time_limit_s: float | None, mip_rel_gap: float) -> SolveResult:
        """Solve with HiGHS; see :func:`autoddl.formulations.backends.solve` for the contract."""
        t0 = time.perf_counter()
        if milp.num_cols == 0:
            return trivial_result(self.name, milp, t0)
        csc = compress(milp, "col")
        if csc.nnz > np.iinfo(np.int32).max:
            return finish(self.name, milp, SolveStatus.ERROR, None, None, t0,
                          "HiGHS: more than 2^31 nonzeros")
        h = new_highs()
        configure(h, time_limit_s, mip_rel_gap)
        tune(h, milp)
        scale = objective_scale(milp.c)
        rc = pass_model(h, milp, scale, csc)
        if rc == load_highspy().HighsStatus.kError:
            return finish(self.name, milp, SolveStatus.ERROR, None, None, t0,
                          "HiGHS rejected the model (passModel)")
        h.run()  # the model status, not run()'s return code, says what happened
        status, has_x, bound, msg = highs_outcome(h, milp)
        x = np.array(h.getSolution().col_value, dtype=np.float64) if has_x else None
        if bound is not None:
            bound = bound / scale + milp.offset
        info = h.getInfo()
        extra = {"nodes": int(info.mip_node_count)} if milp.integrality.any() else {}
        sol = h.getSolution()
        if not milp.integrality.any() and status is SolveStatus.OPTIMAL and sol.dual_valid:
            extra["col_dual"] = np.array(sol.col_dual, dtype=np.float64) / scale  # reduced costs
        return finish(self.name, milp, status, x, bound, t0, msg, extra)
