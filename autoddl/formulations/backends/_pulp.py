"""PuLP backends: ``pulp-cbc`` (PuLP's bundled CBC binary, ``PULP_CBC_CMD``) and ``pulp-highs``
(PuLP's in-process ``HiGHS`` class, which drives ``highspy``).

PuLP builds one Python object per variable and per row, so these backends are for cross-checking
and for environments without the others, not for large models.

Import order: ``import pulp`` loads highspy's native library with ``RTLD_GLOBAL``, which breaks
OR-Tools' bundled HiGHS if OR-Tools is loaded afterwards; :func:`_import_pulp` therefore loads
OR-Tools first (see :mod:`autoddl.formulations.backends._ortools`). PuLP's CBC is run without
threads (CBC's parallel search is not deterministic); HiGHS gets 2.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from autoddl.formulations.backends import _highs, _ortools
from autoddl.formulations.backends._common import (
    Backend,
    compress,
    fill_missing,
    finish,
    objective_scale,
    trivial_result,
)
from autoddl.formulations.milp import MILP, SolveResult, SolveStatus


def _import_pulp() -> Any:
    """Import pulp, after OR-Tools' native library (if installed) so both can coexist, and after
    ``highspy`` (through its one loader, :func:`~autoddl.formulations.backends._highs.load_highspy`)
    so that pulp finds it imported."""
    _ortools.preload()
    if importlib.util.find_spec("highspy") is not None:
        _highs.load_highspy()
    import pulp

    return pulp


def _build(pulp: Any, milp: MILP, scale: float) -> tuple[Any, list[Any]]:
    """``milp`` (objective times ``scale``, no offset) as an ``LpProblem`` and its variables."""
    prob = pulp.LpProblem("autoddl", pulp.LpMinimize)
    # PuLP >= 3.3 deprecates constructing LpVariable directly in favour of prob.add_variable.
    new_var = getattr(prob, "add_variable", None) or pulp.LpVariable
    xs = [
        new_var(f"x{j}", lo if np.isfinite(lo) else None, up if np.isfinite(up) else None,
                pulp.LpInteger if integer else pulp.LpContinuous)
        for j, (lo, up, integer) in enumerate(zip(milp.col_lower.tolist(), milp.col_upper.tolist(),
                                                  milp.integrality.tolist()))
    ]
    cs = (milp.c * scale).tolist()
    prob.setObjective(pulp.LpAffineExpression([(xs[j], cs[j]) for j in np.flatnonzero(milp.c)]))
    csr = compress(milp, "row")
    start, index, value = csr.start.tolist(), csr.index.tolist(), csr.value.tolist()
    for i, (lo, up) in enumerate(zip(milp.row_lower.tolist(), milp.row_upper.tolist())):
        s, e = start[i], start[i + 1]
        terms = [(xs[j], a) for j, a in zip(index[s:e], value[s:e])]
        if not terms:  # PuLP cannot hold an empty row: check it here
            if lo > 1e-9 or up < -1e-9:
                raise _EmptyRowInfeasible
            continue
        if lo == up:
            rows = [(pulp.LpConstraintEQ, lo, f"r{i}")]
        else:
            rows = [(pulp.LpConstraintGE, lo, f"r{i}l")] if np.isfinite(lo) else []
            rows += [(pulp.LpConstraintLE, up, f"r{i}u")] if np.isfinite(up) else []
        for sense, rhs, name in rows:
            prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), sense,
                                                 rhs=rhs, name=name))
    return prob, xs


class _EmptyRowInfeasible(Exception):
    """A row without coefficients whose bounds exclude 0."""


class PulpBackend(Backend):
    """A solver reached through PuLP: ``cbc`` (``PULP_CBC_CMD``) or ``highs`` (``HiGHS``)."""

    package = "pulp"

    def __init__(self, name: str, solver: str) -> None:
        assert solver in ("cbc", "highs")
        self.name = name
        self.solver = solver
        self.package = "pulp" if solver == "cbc" else "pulp highspy"
        self._available: bool | None = None

    def available(self) -> bool:
        """Whether pulp is installed and its solver works here (cached after the first call)."""
        if self._available is None:
            ok = importlib.util.find_spec("pulp") is not None
            if ok and self.solver == "highs":
                ok = importlib.util.find_spec("highspy") is not None
            if ok:
                pulp = _import_pulp()
                ok = bool(self._make(pulp, None, 1e-6, threads=None).available())
            self._available = ok
        return self._available

    def _make(self, pulp: Any, time_limit_s: float | None, mip_rel_gap: float,
              threads: int | None) -> Any:
        """The PuLP solver object, silent and configured (``threads`` for HiGHS only)."""
        if self.solver == "cbc":
            with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC for PuLP 4
                warnings.simplefilter("ignore", DeprecationWarning)
                return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=mip_rel_gap)
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=mip_rel_gap,
                          threads=threads, mip_abs_gap=0.0, random_seed=0)

    def solve(self, milp: MILP, time_limit_s: float | None, mip_rel_gap: float) -> SolveResult:
        """Solve through PuLP; see :func:`autoddl.formulations.backends.solve` for the contract."""
        t0 = time.perf_counter()
        if milp.num_cols == 0:
            return trivial_result(self.name, milp, t0)
        pulp = _import_pulp()
        scale = objective_scale(milp.c)
        try:
            prob, xs = _build(pulp, milp, scale)
        except _EmptyRowInfeasible:
            return finish(self.name, milp, SolveStatus.INFEASIBLE, None, None, t0)
        if time_limit_s is not None:
            time_limit_s = max(float(time_limit_s), 1e-3)
        crashed = ""
        try:
            # highs_threads() also lets the process' first Highs print its banner into /dev/null.
            threads = _highs.highs_threads() if self.solver == "highs" else None
            prob.solve(self._make(pulp, time_limit_s, mip_rel_gap, threads))
        except (pulp.PulpSolverError, IndexError) as exc:
            crashed = f"PuLP: {exc!r}"

        def values() -> np.ndarray:
            raw = [np.nan if v.varValue is None else float(v.varValue) for v in xs]
            return fill_missing(milp, np.array(raw, dtype=np.float64))

        if self.solver == "highs" and getattr(prob, "solverModel", None) is not None:
            # Read HiGHS itself: PuLP reports a time-limited run with a solution as "Optimal".
            status, has_x, bound, msg = _highs.highs_outcome(prob.solverModel, milp)
            if has_x and crashed:
                status, msg = SolveStatus.ERROR, crashed
            x = values() if has_x and not crashed else None
            if bound is not None:
                bound = bound / scale + milp.offset
            return finish(self.name, milp, status, x, bound, t0, msg)
        if crashed:
            return finish(self.name, milp, SolveStatus.ERROR, None, None, t0, crashed)
        return self._cbc_result(pulp, prob, milp, values, t0, time_limit_s)

    def _cbc_result(self, pulp: Any, prob: Any, milp: MILP, values: Callable[[], np.ndarray],
                    t0: float, time_limit_s: float | None) -> SolveResult:
        """Normalize PuLP's (status, sol_status) pair for CBC; CBC reports no bound."""
        st, sol = prob.status, prob.sol_status
        if sol == pulp.LpSolutionOptimal and st == pulp.LpStatusOptimal:
            return finish(self.name, milp, SolveStatus.OPTIMAL, values(), None, t0)
        if sol == pulp.LpSolutionIntegerFeasible:
            return finish(self.name, milp, SolveStatus.FEASIBLE, values(), None, t0,
                          "PuLP CBC: limit reached")
        if st == pulp.LpStatusInfeasible or sol == pulp.LpSolutionInfeasible:
            return finish(self.name, milp, SolveStatus.INFEASIBLE, None, None, t0)
        if st == pulp.LpStatusNotSolved and time_limit_s is not None:
            return finish(self.name, milp, SolveStatus.NO_SOLUTION, None, None, t0,
                          "PuLP CBC: limit reached without a solution")
        return finish(self.name, milp, SolveStatus.ERROR, None, None, t0,
                      f"PuLP CBC: status {pulp.LpStatus.get(st, st)}, solution status {sol}")
