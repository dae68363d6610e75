"""Tests for the solver backends: every backend against brute-force enumeration and each other."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from autoddl.errors import UserError
from autoddl.formulations.backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    available_backends,
    solve,
)
from autoddl.formulations.milp import MILP, SolveStatus

ALL = list(BACKENDS)
AVAILABLE = available_backends()


@dataclass
class Assignment:
    """A random assignment-like MILP and what brute force says about it."""

    milp: MILP
    choices: list[int]  # strategies per node
    x_index: list[list[int]]  # column of x[v, s]
    best: float | None  # brute-force optimum (None: infeasible)
    best_choice: tuple[int, ...] | None


def make_assignment(seed: int, n_nodes: int = 4, cost_scale: float = 1.0, log_costs: bool = False,
                    offset: float = 0.0, mem_quantile: float = 0.4,
                    base_cost: float = 0.0, mem_divisor: float = 1.0) -> Assignment:
    """One-hot x[v,s], flow y[e,a,b] in [0,1] with marginal rows, a memory <= row; brute-forced."""
    rng = np.random.default_rng(seed)
    choices = [int(rng.integers(2, 4)) for _ in range(n_nodes)]
    edges = [(v, v + 1) for v in range(n_nodes - 1)]
    if n_nodes >= 3:
        edges.append((0, n_nodes - 1))

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        if log_costs:  # seconds spanning 1e-9 .. 1e2
            return 10.0 ** rng.uniform(-9, 2, size=shape)
        return rng.uniform(0.0, 1.0, size=shape) * cost_scale

    node_cost = [draw((k,)) + base_cost for k in choices]
    edge_cost = {e: draw((choices[e[0]], choices[e[1]])) for e in edges}
    mem = [rng.integers(1, 100, size=k) / mem_divisor for k in choices]

    c: list[float] = []
    integ: list[bool] = []
    lo: list[float] = []
    up: list[float] = []
    x_index = []
    for v, k in enumerate(choices):
        x_index.append(list(range(len(c), len(c) + k)))
        c += node_cost[v].tolist()
        integ += [True] * k
    y_index = {}
    for e in edges:
        u, v = e
        for a in range(choices[u]):
            for b in range(choices[v]):
                y_index[e, a, b] = len(c)
                c.append(float(edge_cost[e][a, b]))
                integ.append(False)
    n = len(c)
    lo, up = [0.0] * n, [1.0] * n
    rows, cols, vals, rlo, rup = [], [], [], [], []

    def row(entries: list[tuple[int, float]], lower: float, upper: float) -> None:
        r = len(rlo)
        for j, a in entries:
            rows.append(r)
            cols.append(j)
            vals.append(a)
        rlo.append(lower)
        rup.append(upper)

    for v in range(n_nodes):
        row([(j, 1.0) for j in x_index[v]], 1.0, 1.0)
    for e in edges:  # marginals: sum_b y[e,a,b] = x[u,a] and sum_a y[e,a,b] = x[v,b]
        u, v = e
        for a in range(choices[u]):
            flow = [(y_index[e, a, b], 1.0) for b in range(choices[v])]
            row(flow + [(x_index[u][a], -1.0)], 0.0, 0.0)
        for b in range(choices[v]):
            flow = [(y_index[e, a, b], 1.0) for a in range(choices[u])]
            row(flow + [(x_index[v][b], -1.0)], 0.0, 0.0)

    combos = list(itertools.product(*[range(k) for k in choices]))
    total_mem = np.array([sum(mem[v][s] for v, s in enumerate(cb)) for cb in combos])
    # The budget lies halfway between two distinct totals: no combination sits on the boundary.
    q = float(np.quantile(total_mem, mem_quantile))
    above = total_mem[total_mem > q]
    budget = (q + float(above.min())) / 2 if above.size else q + 1.0
    if mem_quantile == 0.0:  # below the leanest combination: infeasible
        budget = float(total_mem.min()) / 2
    row([(x_index[v][s], mem[v][s]) for v in range(n_nodes) for s in range(choices[v])],
        -np.inf, budget)

    best, best_choice = None, None
    for cb, m in zip(combos, total_mem):
        if m > budget:
            continue
        cost = sum(node_cost[v][s] for v, s in enumerate(cb))
        cost += sum(edge_cost[(u, v)][cb[u], cb[v]] for u, v in edges)
        if best is None or cost < best:
            best, best_choice = float(cost), cb
    if best is not None:
        best += offset

    milp = MILP(
        c=np.array(c), a_rows=np.array(rows), a_cols=np.array(cols), a_vals=np.array(vals),
        row_lower=np.array(rlo, dtype=float), row_upper=np.array(rup, dtype=float),
        col_lower=np.array(lo), col_upper=np.array(up), integrality=np.array(integ), offset=offset,
        continuous_integral=True,  # flow variables: integral once the one-hot columns are
    )
    milp.check()
    return Assignment(milp, choices, x_index, best, best_choice)


def test_all_backends_available() -> None:
    """Every backend's package is a dependency of this project, so all must be usable here."""
    assert AVAILABLE == ALL
    assert DEFAULT_BACKEND in AVAILABLE


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_brute_force(backend: str, seed: int) -> None:
    """Objective equals brute force; x feasible; bound below objective; integers exact."""
    # Memory coefficients: integers, decimals (exact CP-SAT row scaling), sevenths (approximate).
    inst = make_assignment(seed, n_nodes=4 + seed % 2, log_costs=seed >= 2,
                           mem_divisor=(1.0, 100.0, 7.0, 1.0)[seed])
    assert inst.best is not None
    res = solve(inst.milp, backend=backend)
    assert res.status is SolveStatus.OPTIMAL, res.message
    assert res.has_solution and res.x is not None
    assert inst.milp.is_feasible(res.x)
    assert res.objective == pytest.approx(inst.best, rel=1e-6)
    assert res.objective == pytest.approx(inst.milp.evaluate(res.x), rel=1e-12)
    assert res.bound is not None and res.bound <= res.objective + 1e-9 * abs(res.objective)
    assert res.gap is not None and res.gap <= 1e-5
    assert res.time_s > 0
    xi = res.x[inst.milp.integrality]
    assert np.array_equal(xi, np.round(xi))  # integer columns are exactly integral
    if backend == "ortools-cpsat":
        assert (res.extra["approximate_rows"] > 0) == (seed == 2)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_tiny_costs_and_offset(backend: str) -> None:
    """Costs of ~1e-9 s must still be optimized (no absolute gap/tolerance swallows them)."""
    inst = make_assignment(7, n_nodes=5, cost_scale=1e-9, offset=3.5)
    res = solve(inst.milp, backend=backend)
    assert res.status is SolveStatus.OPTIMAL, res.message
    # The objective carries the offset; the 1e-9 s costs on top of it are optimized exactly.
    assert res.objective == pytest.approx(inst.best, rel=1e-12)
    assert res.objective - 3.5 == pytest.approx(inst.best - 3.5, rel=1e-5)
    assert res.bound is not None and 3.5 <= res.bound <= res.objective + 1e-12


def test_cpsat_keeps_tiny_coefficients() -> None:
    """With a 1e2 s base cost on every choice, only 1e-9 s differences pick the optimum: CP-SAT's
    integer scaling must keep them (exact optimum at mip_rel_gap=0)."""
    inst = make_assignment(11, n_nodes=4, cost_scale=1e-9, base_cost=100.0, mem_quantile=1.0)
    res = solve(inst.milp, backend="ortools-cpsat", mip_rel_gap=0.0)
    assert res.status is SolveStatus.OPTIMAL
    chosen = tuple(int(np.argmax(res.x[idx])) for idx in inst.x_index)
    assert chosen == inst.best_choice
    assert res.objective == pytest.approx(inst.best, rel=1e-14)
    assert res.bound is not None and res.bound <= res.objective


@pytest.mark.parametrize("backend", AVAILABLE)
def test_infeasible(backend: str) -> None:
    """A memory budget nothing fits (brute force agrees), and an LP-feasible 2x = 1, x integer."""
    inst = make_assignment(3, mem_quantile=0.0)
    assert inst.best is None
    parity = MILP(c=np.array([1.0]), a_rows=np.array([0]), a_cols=np.array([0]),
                  a_vals=np.array([2.0]), row_lower=np.array([1.0]), row_upper=np.array([1.0]),
                  col_lower=np.zeros(1), col_upper=np.ones(1), integrality=np.ones(1, dtype=bool))
    for milp in (inst.milp, parity):
        res = solve(milp, backend=backend)
        assert res.status is SolveStatus.INFEASIBLE, res.message
        assert not res.has_solution and res.x is None and res.objective is None


def _hard_milp(seed: int, n: int = 60, m: int = 40) -> MILP:
    """A random multi-dimensional knapsack-like covering program (many near-ties)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 30, size=(m, n)).astype(float)
    rows, cols = np.nonzero(a)
    return MILP(
        c=rng.uniform(1, 2, size=n), a_rows=rows, a_cols=cols, a_vals=a[rows, cols],
        row_lower=a.sum(axis=1) * 0.31, row_upper=np.full(m, np.inf),
        col_lower=np.zeros(n), col_upper=np.full(n, 3.0), integrality=np.ones(n, dtype=bool),
    )


@pytest.mark.parametrize("backend", AVAILABLE)
def test_time_limit(backend: str) -> None:
    milp = _hard_milp(5)
    res = solve(milp, backend=backend, time_limit_s=0.05, mip_rel_gap=0.0)
    assert res.status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE, SolveStatus.NO_SOLUTION)
    assert res.has_solution == (res.x is not None)
    if res.x is not None:
        assert milp.is_feasible(res.x)
        if res.bound is not None:
            assert res.bound <= res.objective + 1e-9
    assert res.time_s < 10


@pytest.mark.parametrize("backend", AVAILABLE)
def test_pure_lp_and_empty(backend: str) -> None:
    """An LP (no integer columns): bound equals objective; a model without columns is trivial."""
    milp = MILP(
        c=np.array([-1.0, -1.0]), a_rows=np.array([0, 0]), a_cols=np.array([0, 1]),
        a_vals=np.array([1.0, 2.0]), row_lower=np.array([-np.inf]), row_upper=np.array([4.0]),
        col_lower=np.zeros(2), col_upper=np.array([3.0, 5.0]), integrality=np.zeros(2, dtype=bool),
        offset=1.0, continuous_integral=True,  # as before the flag existed: CP-SAT rounds
    )
    res = solve(milp, backend=backend)
    assert res.status is SolveStatus.OPTIMAL, res.message
    expected = 1.0 - 3.5 if backend != "ortools-cpsat" else 1.0 - 3.0  # CP-SAT: all integer
    assert res.objective == pytest.approx(expected, abs=1e-9)
    assert res.bound == pytest.approx(res.objective, abs=1e-9)
    empty = MILP(c=np.zeros(0), a_rows=np.zeros(0, int), a_cols=np.zeros(0, int),
                 a_vals=np.zeros(0), row_lower=np.zeros(0), row_upper=np.zeros(0),
                 col_lower=np.zeros(0), col_upper=np.zeros(0), integrality=np.zeros(0, bool),
                 offset=2.0)
    res = solve(empty, backend=backend)
    assert res.status is SolveStatus.OPTIMAL and res.objective == 2.0


def test_duplicate_coo_entries_are_summed() -> None:
    """COO duplicates mean a sum (as MILP.is_feasible reads them) in every backend."""
    milp = MILP(
        c=np.array([-1.0]), a_rows=np.array([0, 0]), a_cols=np.array([0, 0]),
        a_vals=np.array([1.0, 1.0]), row_lower=np.array([-np.inf]), row_upper=np.array([5.0]),
        col_lower=np.zeros(1), col_upper=np.array([10.0]), integrality=np.ones(1, dtype=bool),
    )
    for backend in AVAILABLE:
        res = solve(milp, backend=backend)
        assert res.x is not None and res.x[0] == 2.0, backend


def test_backends_agree_and_are_deterministic() -> None:
    """Same optimum everywhere, and the same x on every repeat even with many tied optima."""
    inst = make_assignment(21, n_nodes=7)
    tied = MILP(**{**inst.milp.__dict__, "c": np.round(inst.milp.c * 3)})  # costs in {0,1,2,3}
    hard = _hard_milp(1, n=30, m=20)
    hard = MILP(**{**hard.__dict__, "c": np.round(hard.c)})
    objs = {}
    for backend in AVAILABLE:
        for milp in (tied, hard):
            first = solve(milp, backend=backend)
            for _ in range(2):
                again = solve(milp, backend=backend)
                assert np.array_equal(first.x, again.x), backend
        objs[backend] = (solve(inst.milp, backend=backend).objective, first.objective)
    for k in range(2):
        values = [o[k] for o in objs.values()]
        assert max(values) - min(values) <= 1e-6 * abs(values[0]), objs


def test_edge_cases() -> None:
    """No rows; an empty row that excludes 0; a column in no row and no objective."""
    no_rows = MILP(c=np.array([1.0, -2.0]), a_rows=np.zeros(0, int), a_cols=np.zeros(0, int),
                   a_vals=np.zeros(0), row_lower=np.zeros(0), row_upper=np.zeros(0),
                   col_lower=np.array([-1.0, 0.0]), col_upper=np.array([1.0, 2.5]),
                   integrality=np.array([True, True]))
    empty_row = MILP(**{**no_rows.__dict__, "row_lower": np.array([1.0]),
                        "row_upper": np.array([2.0])})
    unused = MILP(c=np.array([0.0, 1.0]), a_rows=np.array([0]), a_cols=np.array([1]),
                  a_vals=np.array([1.0]), row_lower=np.array([1.0]), row_upper=np.array([np.inf]),
                  col_lower=np.array([2.0, 0.0]), col_upper=np.array([5.0, 3.0]),
                  integrality=np.array([True, True]))
    for backend in AVAILABLE:
        r = solve(no_rows, backend=backend)
        assert r.status is SolveStatus.OPTIMAL and list(r.x) == [-1.0, 2.0], backend
        assert solve(empty_row, backend=backend).status is SolveStatus.INFEASIBLE, backend
        r = solve(unused, backend=backend)
        assert r.objective == 1.0 and unused.is_feasible(r.x), backend


def test_unknown_backend_and_bad_args() -> None:
    milp = make_assignment(0).milp
    with pytest.raises(UserError, match="known backends: highs"):
        solve(milp, backend="gurobi")
    with pytest.raises(UserError):
        solve(milp, time_limit_s=0.0)
    unbounded = MILP(**{**milp.__dict__, "col_upper": np.full(milp.num_cols, np.inf)})
    with pytest.raises(UserError, match="finite bounds"):
        solve(unbounded, backend="ortools-cpsat")


_ORDER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from autoddl.formulations.backends import solve
    from autoddl.formulations.milp import MILP
    assert not {"pulp", "highspy", "ortools"} & set(sys.modules), "a solver imported too early"
    data = dict(np.load(sys.argv[1]))
    best, offset = float(data.pop("best")), float(data.pop("offset"))
    milp = MILP(**data, offset=offset, continuous_integral=True)
    for name in sys.argv[2:]:
        res = solve(milp, backend=name)
        assert res.objective is not None, (name, res.message)
        assert abs(res.objective - best) <= 1e-6 * abs(best), (name, res.objective, best)
    print("ok")
    """
)


@pytest.mark.parametrize("order", ["pulp-first", "ortools-first"])
def test_all_backends_in_one_process(order: str, tmp_path: Path) -> None:
    """All backends in one fresh interpreter, pulp's first or last; a segfault fails only this
    test, and nothing may reach stdout but the script's own "ok"."""
    inst = make_assignment(4)
    fields = ("c", "a_rows", "a_cols", "a_vals", "row_lower", "row_upper", "col_lower",
              "col_upper", "integrality", "offset")
    path = tmp_path / "model.npz"
    np.savez(path, best=inst.best, **{f: getattr(inst.milp, f) for f in fields})
    pulps = [b for b in AVAILABLE if b.startswith("pulp")]
    others = [b for b in AVAILABLE if b not in pulps]
    names = pulps + others if order == "pulp-first" else others + pulps
    proc = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT, str(path), *names],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (names, proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "ok\n", proc.stdout


def test_raw_pulp_import_first_does_not_crash() -> None:
    """A user importing pulp before any backend: ortools-highs, whose in-process class refuses
    there (pulp's RTLD_GLOBAL highspy would crash OR-Tools' HiGHS), still solves, in its worker
    process, which never imports pulp."""
    script = textwrap.dedent(
        """
        import pulp
        import numpy as np
        from autoddl.formulations.backends import BACKENDS, solve
        from autoddl.formulations.milp import MILP
        m = MILP(c=np.array([-1.0]), a_rows=np.array([0]), a_cols=np.array([0]),
                 a_vals=np.array([1.0]), row_lower=np.array([-np.inf]),
                 row_upper=np.array([2.5]), col_lower=np.zeros(1), col_upper=np.array([9.0]),
                 integrality=np.ones(1, dtype=bool))
        inner = BACKENDS["ortools-highs"].inner.solve(m, None, 1e-6)
        print(inner.status.value, "pulp" in inner.message)
        r = solve(m, backend="ortools-highs")
        print(r.status.value, r.objective)
        print(solve(m, backend="ortools-scip").objective)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["error", "True", "optimal", "-2.0", "-2.0"]


def test_highs_scheduler_started_elsewhere() -> None:
    """Other code ran HiGHS first with 1 thread: HiGHS then refuses threads=2, so the HiGHS
    backends must adapt instead of failing."""
    script = textwrap.dedent(
        """
        import highspy
        import numpy as np
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        h.addVar(0.0, 1.0)
        h.run()
        from autoddl.formulations.backends import solve
        from autoddl.formulations.milp import MILP
        m = MILP(c=np.array([-1.0]), a_rows=np.array([0]), a_cols=np.array([0]),
                 a_vals=np.array([1.0]), row_lower=np.array([-np.inf]),
                 row_upper=np.array([2.5]), col_lower=np.zeros(1), col_upper=np.array([9.0]),
                 integrality=np.ones(1, dtype=bool))
        print(solve(m, backend="highs").objective, solve(m, backend="pulp-highs").objective)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["-2.0", "-2.0"]


@pytest.mark.parametrize("seed", range(3))
def test_proof_mode_keeps_the_optimum(seed: int) -> None:
    """A MILP marked ``incumbent_near`` (HiGHS then skips its primal heuristics) still reaches
    the brute-force optimum, and a pure LP solved unpresolved equals the presolved one."""
    import dataclasses

    inst = make_assignment(seed, n_nodes=4 + seed % 2, log_costs=seed >= 3)
    near = solve(dataclasses.replace(inst.milp, incumbent_near=True), backend="highs")
    assert near.status is SolveStatus.OPTIMAL
    assert near.objective == pytest.approx(inst.best, rel=1e-6)
    hard = _hard_milp(seed, n=20, m=12)
    plain = solve(hard, backend="highs")
    proof = solve(dataclasses.replace(hard, incumbent_near=True), backend="highs")
    assert proof.objective == pytest.approx(plain.objective, rel=1e-6)
    relaxed = dataclasses.replace(hard, integrality=np.zeros(hard.num_cols, dtype=bool))
    lp = solve(relaxed, backend="highs")  # unpresolved (the backend's choice for LPs)
    other = solve(relaxed, backend="ortools-highs")
    assert lp.objective == pytest.approx(other.objective, rel=1e-7)
