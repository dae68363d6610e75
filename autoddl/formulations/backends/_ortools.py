"""OR-Tools backends: ``ortools-highs``, ``ortools-scip``, ``ortools-cbc`` and ``ortools-cpsat``.

API choice. The three MIP solvers go through ``ortools.linear_solver.pywraplp`` (MPSolver), not
MathOpt: MPSolver is the one OR-Tools API that reaches all of HiGHS, SCIP *and* CBC (MathOpt has
no CBC), it takes a whole model as one ``MPModelProto`` (built here with one protobuf call per
column and per row, no per-nonzero calls), it is silent by default, and it exposes the relative
MIP gap, the time limit and the best bound uniformly. CP-SAT instead goes through its own
``ortools.sat.python.cp_model`` API: pywraplp's MP-to-CP-SAT conversion rescales float
coefficients with its own precision heuristics, whereas CP-SAT needs an integer model and we want
to control that scaling (see :class:`CpSatBackend`).

Import order hazard (the "pulp before OR-Tools' HiGHS segfaults" problem; it hits MPSolver's HiGHS
exactly as it does MathOpt's). ``import pulp`` loads highspy's ``_core`` library with
``RTLD_GLOBAL``; if OR-Tools' native library is loaded *after* that, its bundled (older, 1.12)
HiGHS binds to highspy's (1.16) symbols and segfaults in ``HighsSolveProto``. Once OR-Tools is
loaded its bindings are fixed (Python loads extensions with ``RTLD_NOW``), so the pulp backends
call :func:`preload` before importing pulp, and :class:`PywraplpBackend` ``("HIGHS")`` refuses
(status ERROR, no crash) in a process where pulp got there first. SCIP, CBC and CP-SAT are
unaffected. The registered OR-Tools backends run these classes in a worker process
(:mod:`~autoddl.formulations.backends._isolated`) that never imports pulp, so there
``ortools-highs`` works whatever the planner's process imported first.

OR-Tools' HiGHS returns no incumbent when its time limit hits (MPSolver status 99): such runs are
NO_SOLUTION even when HiGHS had found solutions; use the ``highs`` backend for time-limited runs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from typing import Any

import numpy as np

from autoddl.errors import UserError
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

_highs_clobbered: bool | None = None  # None: OR-Tools not loaded by us yet


def _libortools_loaded() -> bool:
    """Whether OR-Tools' native library is already mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libortools" in f.read()
    except OSError:
        return any(m.startswith("ortools.") and m.count(".") >= 2 for m in sys.modules)


def _import_pywraplp() -> Any:
    """Import pywraplp, noting whether pulp's RTLD_GLOBAL highspy was loaded before it."""
    global _highs_clobbered
    if _highs_clobbered is None:
        _highs_clobbered = "pulp" in sys.modules and not _libortools_loaded()
    from ortools.linear_solver import pywraplp

    return pywraplp


def preload() -> None:
    """Load OR-Tools' native library now (if installed) so a later ``import pulp`` is harmless."""
    if importlib.util.find_spec("ortools") is not None:
        _import_pywraplp()


def _proto(milp: MILP, scale: float) -> Any:
    """``milp`` (objective times ``scale``, no offset) as an ``MPModelProto``: one call per column
    and per row."""
    from ortools.linear_solver import linear_solver_pb2

    proto = linear_solver_pb2.MPModelProto()
    add_var = proto.variable.add
    for lo, up, cj, integer in zip(milp.col_lower.tolist(), milp.col_upper.tolist(),
                                   (milp.c * scale).tolist(), milp.integrality.tolist()):
        add_var(lower_bound=lo, upper_bound=up, objective_coefficient=cj, is_integer=integer)
    csr = compress(milp, "row")
    start, index, value = csr.start.tolist(), csr.index.tolist(), csr.value.tolist()
    add_row = proto.constraint.add
    for i, (lo, up) in enumerate(zip(milp.row_lower.tolist(), milp.row_upper.tolist())):
        s, e = start[i], start[i + 1]
        add_row(lower_bound=lo, upper_bound=up, var_index=index[s:e], coefficient=value[s:e])
    return proto


class PywraplpBackend(Backend):
    """A MIP solver (HiGHS, SCIP or CBC) through OR-Tools' MPSolver (``pywraplp``)."""

    package = "ortools"

    def __init__(self, name: str, solver_id: str) -> None:
        self.name = name
        self.solver_id = solver_id
        self._available: bool | None = None

    def available(self) -> bool:
        """Whether OR-Tools is installed and was built with this solver."""
        if self._available is None:
            ok = importlib.util.find_spec("ortools") is not None
            if ok:
                ok = _import_pywraplp().Solver.CreateSolver(self.solver_id) is not None
            self._available = ok
        return self._available

    def solve(self, milp: MILP, time_limit_s: float | None, mip_rel_gap: float) -> SolveResult:
        """Solve with MPSolver; see :func:`autoddl.formulations.backends.solve` for the contract."""
        t0 = time.perf_counter()
        if milp.num_cols == 0:
            return trivial_result(self.name, milp, t0)
        pywraplp = _import_pywraplp()
        if self.solver_id == "HIGHS" and _highs_clobbered:
            return finish(self.name, milp, SolveStatus.ERROR, None, None, t0,
                          "pulp was imported before OR-Tools in this process, which makes "
                          "OR-Tools' HiGHS crash; use the autoddl backends before importing pulp")
        from ortools.linear_solver import linear_solver_pb2

        solver = pywraplp.Solver.CreateSolver(self.solver_id)
        scale = objective_scale(milp.c)
        err = solver.LoadModelFromProto(_proto(milp, scale))
        if err:
            return finish(self.name, milp, SolveStatus.ERROR, None, None, t0, f"OR-Tools: {err}")
        solver.SuppressOutput()
        if self.solver_id == "HIGHS":
            # Mutes HiGHS' banner; HiGHS' default absolute gap (1e-6) is too coarse for seconds.
            solver.SetSolverSpecificParametersAsString(
                f"output_flag=false\nmip_abs_gap=0\nthreads={MAX_THREADS}\nrandom_seed=0")
        # SCIP and CBC run single-threaded (their parallel modes are not deterministic).
        if time_limit_s is not None:
            solver.SetTimeLimit(max(1, int(math.ceil(time_limit_s * 1000))))  # 0 would mean none
        params = pywraplp.MPSolverParameters()
        is_mip = bool(milp.integrality.any())
        if is_mip:
            params.SetDoubleParam(params.RELATIVE_MIP_GAP, float(mip_rel_gap))
        if self.solver_id == "CBC":  # CBC's cut generators print to C stdout mid-solve
            with stdout_silenced():
                code = solver.Solve(params)
        else:
            code = solver.Solve(params)
        response = linear_solver_pb2.MPSolutionResponse()
        solver.FillSolutionResponseProto(response)
        x: np.ndarray | None = np.array(response.variable_value, dtype=np.float64)
        bound: float | None = None
        msg = ""
        if code in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            optimal = code == pywraplp.Solver.OPTIMAL
            status = SolveStatus.OPTIMAL if optimal else SolveStatus.FEASIBLE
            if is_mip:
                bound = solver.Objective().BestBound() / scale + milp.offset
            if status is SolveStatus.FEASIBLE:
                msg = f"OR-Tools {self.solver_id}: limit reached"
        elif code == pywraplp.Solver.INFEASIBLE or (
            code == pywraplp.Solver.UNBOUNDED and all_bounds_finite(milp)
        ):
            status = SolveStatus.INFEASIBLE
        elif time_limit_s is not None and code not in (pywraplp.Solver.ABNORMAL,
                                                       pywraplp.Solver.MODEL_INVALID):
            # NOT_SOLVED, or 99 (unknown): OR-Tools' HiGHS returns no incumbent on a time limit.
            status = SolveStatus.NO_SOLUTION
            msg = f"OR-Tools {self.solver_id}: limit reached without a solution (status {code})"
        else:
            status = SolveStatus.ERROR
            msg = f"OR-Tools {self.solver_id}: status {code} {response.status_str}".strip()
        if status not in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE) or x.shape != milp.c.shape:
            x = None  # finish() turns a claimed solution without x into ERROR
        return finish(self.name, milp, status, x, bound, t0, msg)


#: CP-SAT's objective is scaled so that sum_j |c_j| * max|x_j| is at most 2**_OBJ_BITS.
_OBJ_BITS = 50
#: Rows with non-decimal coefficients are scaled so their largest one is ~2**_ROW_BITS.
_ROW_BITS = 30


def _row_scale(vals: np.ndarray) -> tuple[float, bool]:
    """A factor making ``vals`` integral: (10**k, True) if some k <= 9 does exactly, else an
    approximate (2**b, False)."""
    for k in range(10):
        f = 10.0**k
        sv = vals * f
        if np.all(np.abs(sv - np.round(sv)) <= 1e-9 + 1e-12 * np.abs(sv)):  # float noise only
            return f, True
    return 2.0 ** (_ROW_BITS - math.ceil(math.log2(float(np.abs(vals).max())))), False


class CpSatBackend(Backend):
    """CP-SAT through ``ortools.sat.python.cp_model``, on an integer copy of the model.

    * Every column is treated as integer. This is exact for the models this project builds: their
      continuous columns are pairwise "flow" variables y[e,a,b] >= 0 whose marginal rows
      (sum_b y = x[u,a], sum_a y = x[v,b]) force them to the 0/1 indicator of the chosen pair
      whenever the one-hot x are binary. A model with other continuous columns (a float makespan,
      say) would be solved as if they were integers. Bounds must be finite (else
      :class:`UserError`); they are rounded inwards.
    * Rows whose coefficients become integral after multiplying by 10**k (k <= 9) are exact; bounds
      are rounded inwards (the activity is an integer). Other rows are scaled so their largest
      coefficient is ~2**30 and rounded: a relative error of ~2**-31 per coefficient.
    * The float objective c (seconds, ~1e-9..1e2) is scaled by the power of two S that makes
      sum_j |c_j| * max(|lo_j|, |up_j|) ~ 2**50 and rounded, so each coefficient is kept to an
      absolute error <= 1/(2S), i.e. a relative ~2**-51 of the largest possible objective; tiny
      coefficients survive as long as they matter at that precision. The reported objective is
      recomputed exactly as ``milp.evaluate(x)``; the bound is CP-SAT's bound divided by S, lowered
      by the worst-case rounding error, so it stays a valid bound on the unscaled objective.
    * One worker by default: measured here, two workers (CP-SAT's portfolio) return different
      optimal ``x`` from run to run on models with ties, and ``interleave_search`` (CP-SAT's
      deterministic parallel mode) was ~10x slower than one worker. ``CpSatBackend(num_workers=2)``
      trades determinism of ``x`` for the portfolio (the optimal objective is unaffected).
    """

    name = "ortools-cpsat"
    package = "ortools"

    def __init__(self, num_workers: int = 1) -> None:
        assert 1 <= num_workers <= MAX_THREADS
        self.num_workers = num_workers

    def available(self) -> bool:
        """Whether OR-Tools (with CP-SAT) is installed (checked without importing it)."""
        return importlib.util.find_spec("ortools") is not None

    def solve(self, milp: MILP, time_limit_s: float | None, mip_rel_gap: float) -> SolveResult:
        """Solve with CP-SAT; see :func:`autoddl.formulations.backends.solve` for the contract."""
        t0 = time.perf_counter()
        if milp.num_cols == 0:
            return trivial_result(self.name, milp, t0)
        if not all_bounds_finite(milp):
            raise UserError("backend ortools-cpsat needs finite bounds on every variable; "
                            "use another backend (e.g. highs)")
        if not milp.continuous_integral and not bool(milp.integrality.all()):
            raise UserError("backend ortools-cpsat takes integer variables only, and this model "
                            "has continuous ones (pipeline transfers and memory, the slowest stage, "
                            "exposed communication): use another "
                            "backend (e.g. ortools-cbc or highs)")
        preload()  # CP-SAT shares OR-Tools' native library: bind it before any later pulp import
        from ortools.sat.python import cp_model

        lo = np.ceil(milp.col_lower - 1e-9)
        up = np.floor(milp.col_upper + 1e-9)
        if np.any(lo > up):
            return finish(self.name, milp, SolveStatus.INFEASIBLE, None, None, t0)
        model = cp_model.CpModel()
        ilo_, iup_ = lo.astype(np.int64).tolist(), up.astype(np.int64).tolist()
        xs = [model.new_int_var(a, b, "") for a, b in zip(ilo_, iup_)]
        csr = compress(milp, "row")
        approx_rows = 0
        for i in range(milp.num_rows):
            s, e = int(csr.start[i]), int(csr.start[i + 1])
            rlo, rup = float(milp.row_lower[i]), float(milp.row_upper[i])
            if s == e:
                if rlo > 1e-9 or rup < -1e-9:
                    return finish(self.name, milp, SolveStatus.INFEASIBLE, None, None, t0)
                continue
            vals = csr.value[s:e]
            f, exact = _row_scale(vals)
            approx_rows += not exact
            coeffs = np.round(vals * f).astype(np.int64).tolist()
            cols = csr.index[s:e].tolist()
            # The row's exact integer activity range; infinite row bounds become these.
            terms = [(a * ilo_[j], a * iup_[j]) for a, j in zip(coeffs, cols)]
            amin, amax = sum(min(t) for t in terms), sum(max(t) for t in terms)
            tol = 1e-9 * max(1.0, abs(rlo) * f if math.isfinite(rlo) else 1.0,
                             abs(rup) * f if math.isfinite(rup) else 1.0)
            ilo = max(amin, math.ceil(rlo * f - tol)) if math.isfinite(rlo) else amin
            iup = min(amax, math.floor(rup * f + tol)) if math.isfinite(rup) else amax
            if ilo > iup:
                return finish(self.name, milp, SolveStatus.INFEASIBLE, None, None, t0)
            row = [xs[j] for j in cols]
            model.add_linear_constraint(cp_model.LinearExpr.weighted_sum(row, coeffs), ilo, iup)
        scale, c_int, err = self._objective(milp.c, lo, up)
        nz = np.flatnonzero(c_int)
        model.minimize(cp_model.LinearExpr.weighted_sum([xs[j] for j in nz.tolist()],
                                                        c_int[nz].tolist()))
        solver = cp_model.CpSolver()
        p = solver.parameters
        p.num_workers = self.num_workers
        p.random_seed = 0
        p.log_search_progress = False
        p.relative_gap_limit = float(mip_rel_gap)
        if time_limit_s is not None:
            p.max_time_in_seconds = max(float(time_limit_s), 1e-3)
        code = solver.solve(model)
        x = None
        bound: float | None = None
        if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            status = SolveStatus.OPTIMAL if code == cp_model.OPTIMAL else SolveStatus.FEASIBLE
            x = np.array(list(solver.response_proto.solution), dtype=np.float64)
            bound = float(solver.best_objective_bound) / scale - err + milp.offset
        elif code == cp_model.INFEASIBLE:
            status = SolveStatus.INFEASIBLE
        elif code == cp_model.UNKNOWN:
            status = SolveStatus.NO_SOLUTION
        else:
            status = SolveStatus.ERROR
        msg = ""
        if status is SolveStatus.ERROR:
            msg = f"CP-SAT: {solver.status_name(code)} {model.validate()}".strip()
        elif approx_rows and x is not None and not milp.is_feasible(x):
            msg = f"CP-SAT: {approx_rows} rows were scaled approximately; x violates one slightly"
        elif status in (SolveStatus.FEASIBLE, SolveStatus.NO_SOLUTION):
            msg = "CP-SAT: limit reached"
        extra = {"objective_scale": scale, "approximate_rows": approx_rows}
        return finish(self.name, milp, status, x, bound, t0, msg, extra)

    @staticmethod
    def _objective(
        c: np.ndarray, lo: np.ndarray, up: np.ndarray
    ) -> tuple[float, np.ndarray, float]:
        """(scale S, integer coefficients round(c*S), worst-case |error| of c·x in the original
        units)."""
        reach = np.maximum(np.abs(lo), np.abs(up))
        total = float(np.abs(c) @ reach)
        if total == 0.0:
            return 1.0, np.zeros(c.shape[0], dtype=np.int64), 0.0
        scale = 2.0 ** math.floor(_OBJ_BITS - math.log2(total))
        c_int = np.round(c * scale)
        err = float(np.abs(c - c_int / scale) @ reach)
        return scale, c_int.astype(np.int64), err
