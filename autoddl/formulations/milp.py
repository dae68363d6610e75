"""A solver-neutral mixed-integer linear program in array form.

    minimize    c · x + offset
    subject to  row_lower <= A x <= row_upper
                col_lower <= x <= col_upper
                x_j integer for every j with integrality[j]

``A`` is given as COO triplets (``a_rows``, ``a_cols``, ``a_vals``) so that large models are built
with numpy, never one Python object per variable. Backends in :mod:`autoddl.formulations.backends`
translate it to their solver's own form. This module imports no solver and no torch.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import numpy as np

INF = float("inf")


@dataclass(frozen=True, eq=False)
class MILP:
    """min c·x + offset s.t. row_lower <= A x <= row_upper, col bounds, integrality."""

    c: np.ndarray
    a_rows: np.ndarray
    a_cols: np.ndarray
    a_vals: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integrality: np.ndarray
    offset: float = 0.0
    #: every continuous column is integral at an optimum once the integer columns are (flow
    #: variables): solvers that only take integers (CP-SAT) may then treat them as integers
    continuous_integral: bool = False
    #: a known plan (bounding the objective by a cutoff row) is within a few per cent of this
    #: MILP's LP bound: the solver mostly has to prove that nothing better exists, so primal
    #: heuristics may be skipped
    incumbent_near: bool = False
    #: continuous columns whose smallest positive value in a solution may be tiny (the step's
    #: T and X, a share of memory): reduced-cost fixing, which needs a nonzero column to be at
    #: least 1, must leave them free (None: none such)
    fractional: np.ndarray | None = None

    @property
    def num_cols(self) -> int:
        """Number of variables."""
        return int(self.c.shape[0])

    @property
    def num_rows(self) -> int:
        """Number of constraints."""
        return int(self.row_lower.shape[0])

    def check(self) -> None:
        """Assert the arrays are consistent (internal invariant)."""
        n, m = self.num_cols, self.num_rows
        assert self.col_lower.shape == (n,) and self.col_upper.shape == (n,)
        assert self.integrality.shape == (n,) and self.integrality.dtype == bool
        assert self.row_upper.shape == (m,)
        assert self.a_rows.shape == self.a_cols.shape == self.a_vals.shape
        if self.a_rows.size:
            assert 0 <= self.a_rows.min() and self.a_rows.max() < m
            assert 0 <= self.a_cols.min() and self.a_cols.max() < n
        assert np.all(np.isfinite(self.c))

    def evaluate(self, x: np.ndarray) -> float:
        """Objective value of an assignment ``x``."""
        return float(self.c @ x + self.offset)

    def is_feasible(self, x: np.ndarray, tol: float = 1e-6) -> bool:
        """Whether ``x`` satisfies every constraint, bound and integrality (within ``tol``)."""
        ax = np.zeros(self.num_rows)
        np.add.at(ax, self.a_rows, self.a_vals * x[self.a_cols])
        scale = 1.0 + np.abs(self.row_lower[np.isfinite(self.row_lower)]).max(initial=0.0)
        if np.any(ax < self.row_lower - tol * scale) or np.any(ax > self.row_upper + tol * scale):
            return False
        if np.any(x < self.col_lower - tol) or np.any(x > self.col_upper + tol):
            return False
        xi = x[self.integrality]
        return bool(np.all(np.abs(xi - np.round(xi)) <= tol))


def restrict_columns(milp: MILP, keep: np.ndarray) -> MILP:
    """``milp`` with only the columns where ``keep`` is True (the others held at zero, which
    their bounds must allow). Rows left empty are dropped where zero satisfies them and kept
    (empty, infeasible) where it does not, so the smaller model is infeasible exactly when the
    original with those columns at zero is."""
    assert np.all((milp.col_lower[~keep] <= 0.0) & (milp.col_upper[~keep] >= 0.0))
    new_col = np.cumsum(keep) - 1
    sel = keep[milp.a_cols]
    rows = milp.a_rows[sel]
    used = np.zeros(milp.num_rows, bool)
    used[rows] = True
    used |= (milp.row_lower > 0.0) | (milp.row_upper < 0.0)
    new_row = np.cumsum(used) - 1
    return dataclasses.replace(
        milp, c=milp.c[keep], a_rows=new_row[rows], a_cols=new_col[milp.a_cols[sel]],
        a_vals=milp.a_vals[sel], row_lower=milp.row_lower[used], row_upper=milp.row_upper[used],
        col_lower=milp.col_lower[keep], col_upper=milp.col_upper[keep],
        integrality=milp.integrality[keep],
        fractional=None if milp.fractional is None else milp.fractional[keep])


class SolveStatus(enum.Enum):
    """Normalized solver outcome, the same for every backend."""

    OPTIMAL = "optimal"  # proven optimal within the requested gap
    FEASIBLE = "feasible"  # a solution, but the limit hit before the proof
    INFEASIBLE = "infeasible"  # proven: no assignment satisfies the constraints
    NO_SOLUTION = "no_solution"  # the limit hit before any solution was found
    ERROR = "error"  # the solver failed


@dataclass(frozen=True, eq=False)
class SolveResult:
    """What a backend returns: status, values, objective, best bound, relative gap, wall time."""

    backend: str
    status: SolveStatus
    x: np.ndarray | None
    objective: float | None
    bound: float | None
    gap: float | None
    time_s: float
    message: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def has_solution(self) -> bool:
        """Whether ``x`` holds a usable assignment."""
        return self.x is not None and self.status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """|objective − bound| / max(|objective|, tiny); None when either is unknown."""
    if objective is None or bound is None or not np.isfinite(bound):
        return None
    return abs(objective - bound) / max(abs(objective), 1e-12)
