"""Helpers shared by every solver backend: the backend base class, canonical sparse forms of a
:class:`~autoddl.formulations.milp.MILP`, result assembly, and a way to keep native solver banners
off stdout. Imports no solver.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from autoddl.formulations.milp import MILP, SolveResult, SolveStatus, relative_gap

#: The most threads (or CP-SAT workers) any backend uses.
MAX_THREADS = 2


class Backend:
    """A solver backend: a name, a cheap availability check and ``solve``."""

    name: str = ""
    #: The pip package a user installs to make this backend available.
    package: str = ""

    def available(self) -> bool:
        """Whether the solver can be imported here (imports lazily, never at module import)."""
        raise NotImplementedError

    def solve(self, milp: MILP, time_limit_s: float | None, mip_rel_gap: float) -> SolveResult:
        """Solve ``milp`` within ``time_limit_s`` seconds (None: no limit) to ``mip_rel_gap``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


@dataclass(frozen=True)
class Compressed:
    """A canonical compressed sparse matrix: duplicates summed, zeros dropped, sorted indices.

    ``start`` has one entry per major index plus one (rows for CSR, columns for CSC); ``index``
    holds minor indices and ``value`` the coefficients.
    """

    start: np.ndarray
    index: np.ndarray
    value: np.ndarray

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.value.shape[0])


def compress(milp: MILP, by: str) -> Compressed:
    """The constraint matrix of ``milp`` as canonical CSR (``by="row"``) or CSC (``by="col"``).

    Duplicate COO entries are summed (as :meth:`MILP.is_feasible` does), zeros dropped, and entries
    sorted, so the result is deterministic for a given model. Vectorized, no per-entry Python loop.
    """
    assert by in ("row", "col")
    rows = np.asarray(milp.a_rows, dtype=np.int64)
    cols = np.asarray(milp.a_cols, dtype=np.int64)
    vals = np.asarray(milp.a_vals, dtype=np.float64)
    if by == "row":
        major, minor, n_major = rows, cols, milp.num_rows
    else:
        major, minor, n_major = cols, rows, milp.num_cols
    if vals.size:
        order = np.lexsort((minor, major))
        major, minor, vals = major[order], minor[order], vals[order]
        new = np.empty(vals.shape[0], dtype=bool)
        new[0] = True
        new[1:] = (major[1:] != major[:-1]) | (minor[1:] != minor[:-1])
        first = np.flatnonzero(new)
        vals = np.add.reduceat(vals, first)
        major, minor = major[first], minor[first]
        keep = vals != 0.0
        major, minor, vals = major[keep], minor[keep], vals[keep]
    counts = np.bincount(major, minlength=n_major)
    start = np.zeros(n_major + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    return Compressed(start=start, index=minor, value=vals)


def trivial_result(backend: str, milp: MILP, t0: float) -> SolveResult:
    """The result for a model without columns (no solver needed): feasible iff 0 fits every row."""
    x = np.zeros(0)
    if milp.is_feasible(x):
        obj = float(milp.offset)
        return SolveResult(backend, SolveStatus.OPTIMAL, x, obj, obj, 0.0, time.perf_counter() - t0)
    return SolveResult(backend, SolveStatus.INFEASIBLE, None, None, None, None,
                       time.perf_counter() - t0)


def finish(
    backend: str,
    milp: MILP,
    status: SolveStatus,
    x: np.ndarray | None,
    bound: float | None,
    t0: float,
    message: str = "",
    extra: dict | None = None,
) -> SolveResult:
    """Assemble a normalized :class:`SolveResult`.

    ``x`` is the solver's raw assignment (or None); integer columns are rounded with ``np.round``
    and the objective is recomputed exactly as ``milp.evaluate(x)`` so it matches ``x`` for every
    backend. ``bound`` must already include ``milp.offset``; a non-finite bound becomes None. For a
    proven optimum without a reported bound, and for a pure LP, the bound is the objective; a bound
    above the objective (numerical noise) is clipped to it. ``time_s`` is measured from ``t0``.
    """
    elapsed = time.perf_counter() - t0
    has_x = status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE) and x is not None
    if status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE) and not has_x:
        status = SolveStatus.ERROR
        message = message or "the solver reported a solution but returned none"
    if not has_x:
        b = bound if bound is not None and np.isfinite(bound) else None
        if status in (SolveStatus.INFEASIBLE, SolveStatus.ERROR):
            b = None
        return SolveResult(backend, status, None, None, b, None, elapsed, message, extra or {})
    x = np.asarray(x, dtype=np.float64).copy()
    x[milp.integrality] = np.round(x[milp.integrality])
    objective = milp.evaluate(x)
    if bound is None or not np.isfinite(bound):
        bound = objective if status is SolveStatus.OPTIMAL else None
    if status is SolveStatus.OPTIMAL and not milp.integrality.any():
        bound = objective
    if bound is not None:
        bound = min(float(bound), objective)
    gap = relative_gap(objective, bound)
    return SolveResult(backend, status, x, objective, bound, gap, elapsed, message, extra or {})


#: :func:`objective_scale` keeps the largest scaled cost within [1, 2**_MAX_COST_BITS).
_MAX_COST_BITS = 20


def objective_scale(c: np.ndarray) -> float:
    """A power of two s (exact to apply) centering the nonzero |c·s| around 1 geometrically.

    LP-based solvers compare objective values with absolute tolerances (dual feasibility 1e-7,
    SCIP's epsilon 1e-9, HiGHS' 1e-6 absolute gap); costs in seconds, often 1e-9..1e-3, would
    drown in them. Centering on the geometric mean puts typical costs (and so typical optimal
    objectives) near 1, while the largest scaled cost is kept within [1, 2**20). Backends hand the
    solver ``c * s`` and divide its bound by ``s``; ``x`` and the reported objective are unaffected.
    """
    mag = np.abs(c[c != 0.0])
    if mag.size == 0:
        return 1.0
    top = math.floor(math.log2(float(mag.max())))
    k = -round(float(np.mean(np.log2(mag))))
    k = min(max(k, -top), _MAX_COST_BITS - 1 - top)
    return 2.0**k


def all_bounds_finite(milp: MILP) -> bool:
    """Whether every column has finite bounds (then the model cannot be unbounded)."""
    return bool(np.all(np.isfinite(milp.col_lower)) and np.all(np.isfinite(milp.col_upper)))


def fill_missing(milp: MILP, x: np.ndarray) -> np.ndarray:
    """Replace NaN entries of ``x`` (columns a solver dropped) by the in-bounds value nearest 0."""
    missing = np.isnan(x)
    if missing.any():
        lo = np.where(milp.integrality, np.ceil(milp.col_lower), milp.col_lower)
        x[missing] = np.clip(0.0, lo, milp.col_upper)[missing]
    return x


@contextlib.contextmanager
def stdout_silenced() -> Iterator[None]:
    """Redirect the process-level stdout (file descriptor 1) to /dev/null for the block.

    Native solver code writes banners with C stdio, which ``sys.stdout`` redirection cannot catch.
    Use only around short calls (constructing a solver object), never around a long solve, since
    it silences every thread of the process.
    """
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError):
        pass
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # push buffered C output into /dev/null, not later
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
