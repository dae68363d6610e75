r"""The sharding ILP: one signature per operator, minimum communication cost, memory-capped.

Given, for a fixed device mesh, every node's legal signatures and every edge's conversion costs,

.. math::

    \min \; \sum_{v}\sum_{s} c_{v,s}\, x_{v,s} \;+\; \sum_{e=(u,v)} \sum_{a,b} c_{e,a,b}\, y_{e,a,b}

subject to

* **one signature per node** — :meth:`ShardingModel.one_hot`:
  :math:`\sum_s x_{v,s} = 1`, :math:`x_{v,s} \in \{0, 1\}`;
* **edge flow (marginal linearization)** — :meth:`ShardingModel.edge_marginals`: for each edge
  :math:`e = (u, v)`, with :math:`a` ranging over the producer's output *keys* (its output
  placement) and :math:`b` over the consumer's input keys (the placement it reads and the gradient
  placement it returns),
  :math:`\sum_b y_{e,a,b} = \sum_{s:\,key_u(s)=a} x_{u,s}` and
  :math:`\sum_a y_{e,a,b} = \sum_{s:\,key_v(s)=b} x_{v,s}`, :math:`y \ge 0`. Pairs that no
  collective can convert have no variable. With :math:`x` integral exactly one :math:`y` per edge
  is 1, so :math:`y_{e,a,b} = x_{u,a} x_{v,b}` without a product;
* **memory per device** — :meth:`ShardingModel.memory`:
  :math:`\sum_{v,s} m_{v,s} x_{v,s} + \sum_{e,a,b} m_{e,a,b} y_{e,a,b} \le M`.

**The step time** (:class:`StepShape`). The costs :math:`c` above are the *critical* seconds
(compute, and communication nothing can hide). Two more families make the objective the step:

* **overlap** — :meth:`ShardingModel.overlap`: communication that may run behind compute (a
  weight's gradient reduction, ZeRO's gathers: :math:`h`, per node and edge pair) hides behind
  the backward compute :math:`w` (per node): the exposed part is one continuous
  :math:`X \ge \eta_g \sum_g h - \omega_g \sum_g w` for every group :math:`g`, :math:`X \ge 0`;
* **stages in parallel** — :meth:`ShardingModel.stage_max`: with groups standing for pipeline
  stages, :math:`T \ge \sigma_g C_g` for each group's critical sum :math:`C_g` (scaled to one
  stage's time per micro-batch), and the objective is
  :math:`\sum_g (1-\rho_g) C_g + b\,T + X`. The caller chooses :math:`\rho_g = b\lambda_g
  \sigma_g` with stage weights :math:`\lambda_g \ge 0` summing to 1, so that
  :math:`b\,T \ge \sum_g \rho_g C_g` (a max is at least any average): the objective is never
  below :math:`\sum c`, and every bound computed from the costs alone stays a lower bound.

Keys, not signatures, index :math:`y`: many signatures share an edge's placements, so the edge
variables number (distinct output placements) × (distinct input placements), not |S_u|·|S_v|.
An edge whose producer (or consumer) side has one key needs no :math:`y`: its cost lands on the
other side's :math:`x` directly.

This module imports no torch and no solver: it builds a :class:`~autoddl.formulations.milp.MILP`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from autoddl.formulations.milp import INF, MILP
from autoddl.formulations.recompute import (
    LinearForm, RecomputeGroup, RecomputeRows, all_count_choices, fold_fixed, recompute_terms,
)

#: relative slack allowed when checking a plan's memory against the cap outside a solver: float
#: rounding of a sum of terms (a few ulps of 1e-16 each) only, never a solver's tolerance (1e-7:
#: a byte of a 48 MB cap); below a byte for any device memory under 1 TB
MEMORY_RTOL = 1e-12


def within_capacity(memory_bytes: float, capacity_bytes: float) -> bool:
    """Whether a plan's memory fits a device (up to float rounding, :data:`MEMORY_RTOL`)."""
    return memory_bytes <= capacity_bytes * (1 + MEMORY_RTOL)


@dataclass(frozen=True, eq=False)
class NodeChoices:
    """A node's options: per signature a critical cost (s), memory per device (bytes),
    communication that may hide behind compute (``hidden_s``) and compute that can hide it
    (``window_s``)."""

    name: str
    cost_s: np.ndarray
    memory_bytes: np.ndarray
    group: int = 0  # memory group: the devices whose memory this counts against (a stage)
    hidden_s: np.ndarray | None = None
    window_s: np.ndarray | None = None

    def hidden(self) -> np.ndarray:
        """``hidden_s``, zeros when absent."""
        return np.zeros(len(self.cost_s)) if self.hidden_s is None else self.hidden_s

    def window(self) -> np.ndarray:
        """``window_s``, zeros when absent."""
        return np.zeros(len(self.cost_s)) if self.window_s is None else self.window_s


@dataclass(frozen=True, eq=False)
class EdgeChoices:
    """An edge's cost (s) and memory (bytes) over (producer key, consumer key); inf: forbidden."""

    src: int
    dst: int
    src_key: np.ndarray  # producer signature -> producer key
    dst_key: np.ndarray  # consumer signature -> consumer key
    cost_s: np.ndarray  # (num producer keys, num consumer keys)
    memory_bytes: np.ndarray
    group: int = 0  # memory group of the consumer
    hidden_s: np.ndarray | None = None  # communication that may hide behind compute

    def hidden(self) -> np.ndarray:
        """``hidden_s``, zeros (of ``cost_s``'s shape) when absent."""
        return np.zeros(self.cost_s.shape) if self.hidden_s is None else self.hidden_s


@dataclass(frozen=True)
class StepShape:
    """How groups' sums make the step time (module docstring): per group ``g`` the stage scale
    σ_g (0: no stage), the share ρ_g taken off its critical sum, the overlap scales η_g, ω_g;
    ``max_weight`` b. The default is one unpipelined group: step = C + max(0, H − W)."""

    max_weight: float = 0.0
    stage_scale: tuple[float, ...] = ()
    stage_share: tuple[float, ...] = ()
    hidden_scale: tuple[float, ...] = ()
    window_scale: tuple[float, ...] = ()

    @staticmethod
    def _at(values: tuple[float, ...], g: int, default: float) -> float:
        return values[g] if g < len(values) else default

    def sigma(self, g: int) -> float:
        """σ_g: a group's critical sum to one stage's time per micro-batch."""
        return self._at(self.stage_scale, g, 0.0)

    def rho(self, g: int) -> float:
        """ρ_g: the share of a group's critical sum the max term stands for."""
        return self._at(self.stage_share, g, 0.0)

    def eta(self, g: int) -> float:
        """η_g: a group's hidden sum to one stage's."""
        return self._at(self.hidden_scale, g, 1.0)

    def omega(self, g: int) -> float:
        """ω_g: a group's window sum to the compute one stage can hide it behind."""
        return self._at(self.window_scale, g, 1.0)

    def combine(self, crit: dict[int, float], hidden: dict[int, float],
                window: dict[int, float]) -> float:
        """The step time of per-group critical, hidden and window sums."""
        groups = set(crit) | set(hidden)
        total = sum(c * (1.0 - self.rho(g)) for g, c in crit.items())
        if self.max_weight:
            total += self.max_weight * max((self.sigma(g) * c for g, c in crit.items()),
                                           default=0.0)
        exposed = [self.eta(g) * hidden.get(g, 0.0) - self.omega(g) * window.get(g, 0.0)
                   for g in groups if hidden.get(g, 0.0) > 0]
        return total + max([0.0] + exposed)


@dataclass(frozen=True, eq=False)
class ShardingProblem:
    """Nodes (in topological order), edges, the memory capacity per device, and how the
    groups' costs make the step (:class:`StepShape`)."""

    nodes: tuple[NodeChoices, ...]
    edges: tuple[EdgeChoices, ...]
    memory_capacity_bytes: float
    shape: StepShape = StepShape()
    #: layers whose activations may be recomputed (:mod:`autoddl.formulations.recompute`); a
    #: choice vector then holds, after one signature per node, one count per group option
    recompute: tuple[RecomputeGroup, ...] = ()

    def evaluate(self, choice: np.ndarray) -> tuple[float, float]:
        """(step time in seconds, memory per device in bytes, the worst group's) of one
        signature per node (and the recomputation counts after them; defaults if absent)."""
        crit: dict[int, float] = {}
        hid: dict[int, float] = {}
        win: dict[int, float] = {}
        mem: dict[int, float] = {}

        def add(d: dict[int, float], g: int, v: float) -> None:
            d[g] = d.get(g, 0.0) + v

        for n, c in zip(self.nodes, choice):
            add(mem, n.group, float(n.memory_bytes[c]))
            add(crit, n.group, float(n.cost_s[c]))
            if n.hidden_s is not None:
                add(hid, n.group, float(n.hidden_s[c]))
            if n.window_s is not None:
                add(win, n.group, float(n.window_s[c]))
        for e in self.edges:
            a, b = e.src_key[choice[e.src]], e.dst_key[choice[e.dst]]
            add(crit, e.group, float(e.cost_s[a, b]))
            add(mem, e.group, float(e.memory_bytes[a, b]))
            if e.hidden_s is not None:
                add(hid, e.group, float(e.hidden_s[a, b]))
        if self.recompute:
            extra_crit, extra_mem = recompute_terms(self, choice)
            for g, v in extra_crit.items():
                add(crit, g, v)
            for g, v in extra_mem.items():
                add(mem, g, v)
        return self.shape.combine(crit, hid, win), max(mem.values(), default=0.0)

    def brute_force(self) -> tuple[float, np.ndarray | None]:
        """Exhaustive optimum (for tests on tiny problems): (cost, choice) or (inf, None);
        the choice holds the recomputation counts after the signatures."""
        best, arg = INF, None
        tails = list(all_count_choices(self.recompute))
        for combo in itertools.product(*[range(len(n.cost_s)) for n in self.nodes]):
            for tail in tails:
                choice = np.array(combo + tail, dtype=int)
                cost, mem = self.evaluate(choice)
                if cost < best and within_capacity(mem, self.memory_capacity_bytes):
                    best, arg = cost, choice
        return best, arg


def bound_pruning(problem: ShardingProblem, cutoff: float) -> tuple[list, list, float]:
    r"""Signatures and edge pairs that no plan cheaper than ``cutoff`` can use.

    A lower bound on any plan: :math:`LB_0 = \sum_v \min_s c_v + \sum_e \min_{a,b} c_e`
    (costs are non-negative). A plan using signature :math:`s` of :math:`v` costs at least
    :math:`LB_0` with :math:`v`'s term and its edges' terms replaced by their minima given
    :math:`s`; likewise for an edge pair. Whatever exceeds ``cutoff`` is removed: exact.
    Returns (keep masks per node, keep masks per edge, LB_0).
    """
    nodes, edges = problem.nodes, problem.edges
    node_min = [float(n.cost_s.min()) for n in nodes]
    finite = [np.where(np.isfinite(e.cost_s), e.cost_s, np.inf) for e in edges]
    edge_min = [float(c.min()) for c in finite]
    lb0 = sum(node_min) + sum(edge_min)
    lift = [n.cost_s - m for n, m in zip(nodes, node_min)]  # per node, per signature
    for e, c, m in zip(edges, finite, edge_min):
        if e.src == e.dst:
            continue  # a node's edge to itself (repeated layers): bounded by its minimum only
        row = c.min(axis=1) - m  # per producer key
        col = c.min(axis=0) - m  # per consumer key
        lift[e.src] = lift[e.src] + row[e.src_key]
        lift[e.dst] = lift[e.dst] + col[e.dst_key]
    tol = abs(cutoff) * 1e-9  # relative: costs are seconds of any magnitude
    keep_nodes = [lb0 + lf <= cutoff + tol for lf in lift]
    keep_edges = []
    for e, c, m in zip(edges, finite, edge_min):
        if e.src == e.dst:
            keep_edges.append(np.ones(c.shape, dtype=bool))
            continue
        best_src = np.full(c.shape[0], np.inf)
        np.minimum.at(best_src, e.src_key, np.where(keep_nodes[e.src],
                                                    nodes[e.src].cost_s, np.inf))
        best_dst = np.full(c.shape[1], np.inf)
        np.minimum.at(best_dst, e.dst_key, np.where(keep_nodes[e.dst],
                                                    nodes[e.dst].cost_s, np.inf))
        lb = (lb0 - m - node_min[e.src] - node_min[e.dst] + c + best_src[:, None]
              + best_dst[None, :])
        keep_edges.append(lb <= cutoff + tol)
    return keep_nodes, keep_edges, lb0


def _finite_abs_max(a: np.ndarray) -> float:
    """The largest finite magnitude in ``a`` (0 when it has none)."""
    return float(np.abs(a[np.isfinite(a)]).max(initial=0.0))


class ShardingModel(RecomputeRows):
    """Builds the MILP of a :class:`ShardingProblem` and reads assignments back."""

    #: fold an edge whose consumer side has one key onto the producer's x (no y variables);
    #: the pipeline model turns it off so that an edge's memory stays with its consumer's stage
    fold_into_producer = True

    def __init__(self, problem: ShardingProblem, cutoff: float = INF,
                 exposure: str | None = None, lean_group: int | None = None) -> None:
        """``cutoff``: an upper bound on the optimum (the cost of a known plan). Costs are
        non-negative, so a signature or an edge pair costing more on its own is in no optimal
        plan: it gets no variable (exact pruning). ``exposure``: which part of the overlap
        term's disjunction to model (:meth:`overlap`). ``lean_group``: minimize the memory of
        that memory group instead of the step (the leanest plan; no memory rows)."""
        self.lean_group = lean_group
        problem = fold_fixed(problem)  # forced recomputation: plain costs, no digits
        if lean_group is not None:
            problem = dataclasses.replace(problem, memory_capacity_bytes=INF)
        self.problem = problem
        self.exposure = exposure
        self.cutoff = cutoff
        self._cut_added = False
        self.keep_nodes: list | None = None
        self.keep_edges: list | None = None
        self.lower_bound = 0.0
        if np.isfinite(cutoff):
            self.keep_nodes, self.keep_edges, self.lower_bound = bound_pruning(problem, cutoff)
        self._c: list[np.ndarray] = []
        self._mem: list[np.ndarray] = []
        self._hid: list[np.ndarray] = []  # per column: hidden communication (s)
        self._win: list[np.ndarray] = []  # per column: compute that can hide it (s)
        self._ub: list[np.ndarray] = []
        self._int: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._cols: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self._rlo: list[float] = []
        self._rhi: list[float] = []
        self.num_cols = 0
        self.x_start: list[int] = []
        #: the memory rows (memory / capacity <= 1), one per memory group that can bind
        self.memory_rows: list[int] = []
        self.y_blocks: list[tuple[int, np.ndarray, np.ndarray] | None] = []
        #: edges without y: the side (node index) and key their values were folded onto
        self._folded: dict[int, tuple[int, np.ndarray, bool]] = {}
        #: the step's continuous columns: T (slowest stage) and X (exposed communication)
        self.t_step: int | None = None
        self.x_exposed: int | None = None
        self._add_x()
        self.step_unit_s = self._step_unit_s()
        self.one_hot()
        self.edge_marginals()
        self.recompute()
        self.memory()
        self.stage_max()
        self.overlap()

    # ---------------------------------------------------------------- helpers
    def _new_cols(self, cost: np.ndarray, mem: np.ndarray, integer: bool,
                  hid: np.ndarray | None = None, win: np.ndarray | None = None) -> int:
        start = self.num_cols
        self._c.append(np.array(cost, float))
        self._mem.append(np.array(mem, float))
        self._hid.append(np.zeros(len(cost)) if hid is None else np.array(hid, float))
        self._win.append(np.zeros(len(cost)) if win is None else np.array(win, float))
        self._ub.append(np.ones(len(cost)))
        self._int.append(np.full(len(cost), integer))
        self.num_cols += len(cost)
        return start

    def _step_unit_s(self) -> float:
        """The unit of the continuous columns T and X: the largest finite cost of any one
        choice. Costs of nanoseconds would otherwise sit below the solvers' absolute
        feasibility tolerances (1e-7 in HiGHS) and let T or X drift below their rows."""
        arrays = [a for n in self.problem.nodes for a in (n.cost_s, n.hidden_s, n.window_s)]
        arrays += [a for e in self.problem.edges for a in (e.cost_s, e.hidden_s)]
        big = max((_finite_abs_max(a) for a in arrays if a is not None), default=0.0)
        return big if big > 0 else 1.0

    def _sum_bound(self, blocks: list[np.ndarray]) -> float:
        """A finite upper bound on any plan's sum of ``blocks`` (column values), in step units:
        finite bounds on T and X keep every backend (CP-SAT too) applicable."""
        return sum(_finite_abs_max(b) for b in blocks) / self.step_unit_s + 1.0

    @property
    def has_step_rows(self) -> bool:
        """Whether the model holds the step's rows (slowest stage T, exposed communication X,
        or the covered part's exposure rows): harder for branch and bound than a plain sum."""
        return (self.t_step is not None or self.x_exposed is not None
                or self.exposure == "covered" or bool(self.problem.recompute))

    def _add_row(self, cols: np.ndarray, vals: np.ndarray, lo: float, hi: float) -> None:
        r = len(self._rlo)
        self._rows.append(np.full(len(cols), r))
        self._cols.append(np.asarray(cols, int))
        self._vals.append(np.asarray(vals, float))
        self._rlo.append(lo)
        self._rhi.append(hi)

    def _add_x(self) -> None:
        self._group: list[int] = []
        for n in self.problem.nodes:
            self.x_start.append(self._new_cols(n.cost_s, n.memory_bytes, integer=True,
                                               hid=n.hidden_s, win=n.window_s))
            if self.keep_nodes is not None:
                self._ub[-1][~self.keep_nodes[len(self.x_start) - 1]] = 0.0
            self._group.append(n.group)

    # ---------------------------------------------------------------- constraint families
    def one_hot(self) -> None:
        r"""Each node takes one signature: :math:`\sum_s x_{v,s} = 1`."""
        for v, n in enumerate(self.problem.nodes):
            k = len(n.cost_s)
            self._add_row(self.x_start[v] + np.arange(k), np.ones(k), 1.0, 1.0)

    def edge_marginals(self) -> None:
        r"""Per edge: :math:`\sum_b y_{a,b} = \sum_{key_u(s)=a} x_{u,s}`, and the same per b."""
        for i_e, e in enumerate(self.problem.edges):
            cost, mem, hid = e.cost_s, e.memory_bytes, e.hidden()
            if self.keep_edges is not None:
                cost = np.where(self.keep_edges[i_e], cost, np.inf)
            ks, kd = cost.shape
            # folding puts the edge's memory and time in the group of the side it lands on
            grouped = (mem.any() or hid.any()
                       or np.where(np.isfinite(cost), cost, 0.0).any())
            foldable_src = e.group == self.problem.nodes[e.src].group or not grouped
            foldable_dst = e.group == self.problem.nodes[e.dst].group or not grouped
            onto_dst = ks == 1 and foldable_dst
            if onto_dst or (kd == 1 and self.fold_into_producer
                            and foldable_src):  # no y: fold onto x
                self.y_blocks.append(None)
                side, key = (e.dst, e.dst_key) if onto_dst else (e.src, e.src_key)
                self._folded[i_e] = (side, key, onto_dst)
                row = cost[0, :] if onto_dst else cost[:, 0]
                mrow = mem[0, :] if onto_dst else mem[:, 0]
                hrow = hid[0, :] if onto_dst else hid[:, 0]
                start, k = self.x_start[side], len(key)
                add_c, add_m = row[key], mrow[key]
                bad = ~np.isfinite(add_c)
                self._c[side][:] += np.where(bad, 0.0, add_c)
                self._mem[side][:] += np.where(bad, 0.0, add_m)
                self._hid[side][:] += np.where(bad, 0.0, hrow[key])
                self._ub[side][bad] = 0.0
                assert start + k <= self.num_cols
                continue
            pa, pb = np.nonzero(np.isfinite(cost))
            start = self._new_cols(cost[pa, pb], mem[pa, pb], integer=False, hid=hid[pa, pb])
            self._group.append(e.group)
            self.y_blocks.append((start, pa, pb))
            ycols = start + np.arange(len(pa))
            for a in range(ks):
                xs = self.x_start[e.src] + np.nonzero(e.src_key == a)[0]
                ys = ycols[pa == a]
                self._add_row(np.concatenate([ys, xs]),
                              np.concatenate([np.ones(len(ys)), -np.ones(len(xs))]), 0.0, 0.0)
            for b in range(kd):
                xs = self.x_start[e.dst] + np.nonzero(e.dst_key == b)[0]
                ys = ycols[pb == b]
                self._add_row(np.concatenate([ys, xs]),
                              np.concatenate([np.ones(len(ys)), -np.ones(len(xs))]), 0.0, 0.0)

    def memory(self) -> None:
        r"""Memory per device: :math:`\sum m_{v,s} x_{v,s} + \sum m_{e,a,b} y_{e,a,b} \le M`,
        one row per memory group (pipeline stage)."""
        cap = float(self.problem.memory_capacity_bytes)
        if not np.isfinite(cap):
            return
        blocks = self._mem[: len(self._group)]
        groups = np.concatenate([np.full(len(b), g) for b, g in zip(blocks, self._group)])
        mem = np.concatenate(blocks)
        for g in np.unique(groups):
            nz = np.nonzero((groups == g) & (mem != 0))[0]
            if len(nz) and mem[nz].clip(min=0).sum() > cap:  # a row that cannot bind: left out
                self.memory_rows.append(len(self._rlo))
                self._add_row(nz, mem[nz] / cap, -INF, 1.0)

    def _grouped(self, blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The x and y columns' values of ``blocks`` (one array per column block) and groups."""
        blocks = blocks[: len(self._group)]
        groups = np.concatenate([np.full(len(b), g) for b, g in zip(blocks, self._group)])
        return np.concatenate(blocks), groups

    def stage_max(self) -> None:
        r"""Stages in parallel: :math:`\sigma_g C_g - T \le 0` per stage group (no rows
        without a :attr:`StepShape.max_weight`)."""
        shape = self.problem.shape
        if not shape.max_weight:
            return
        cost, groups = self._grouped(self._c)
        self.t_step = self._new_cols(np.zeros(1), np.zeros(1), integer=False)
        self._ub[-1][:] = max(shape.stage_scale, default=1.0) * self._sum_bound(self._c)
        for g in np.unique(groups):
            if shape.sigma(int(g)) <= 0:
                continue
            nz = np.nonzero((groups == g) & (cost != 0))[0]
            self._add_row(np.append(nz, self.t_step),
                          np.append(shape.sigma(int(g)) * cost[nz] / self.step_unit_s, -1.0),
                          -INF, 0.0)

    def _exposures(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        r"""Per group holding hidden communication: (columns, values) of its exposure
        :math:`D_g = \eta_g H_g - \omega_g W_g`, in step units."""
        shape = self.problem.shape
        hid, groups = self._grouped(self._hid)
        win, _ = self._grouped(self._win)
        out = {}
        for g in (int(g) for g in np.unique(groups[hid != 0])):
            vals = (shape.eta(g) * hid - shape.omega(g) * win) / self.step_unit_s
            nz = np.nonzero((groups == g) & (vals != 0))[0]
            out[g] = (nz, vals[nz])
        return out

    def overlap(self) -> None:
        r"""Exposed communication :math:`\max(0, \max_g D_g)`, by :attr:`exposure`:

        * None: one column :math:`X \ge 0` with :math:`D_g - X \le 0` per group;
        * ``"covered"``: only the plans that hide it all, :math:`D_g \le 0` per group (no X:
          a sum with a few rows, whose relaxation is tighter)."""
        exposures = self._exposures()
        if not exposures:
            return
        if self.exposure == "covered":
            for nz, vals in exposures.values():
                self._add_row(nz, vals, -INF, 0.0)
            return
        self.x_exposed = self._new_cols(np.zeros(1), np.zeros(1), integer=False)
        self._ub[-1][:] = (max(self.problem.shape.hidden_scale, default=1.0)
                           * self._sum_bound(self._hid))
        for nz, vals in exposures.values():
            self._add_row(np.append(nz, self.x_exposed), np.append(vals, -1.0), -INF, 0.0)

    def objective(self) -> np.ndarray:
        """The objective per column: critical costs less their stage share, b·T, X (or the
        memory of group :attr:`lean_group`)."""
        if self.lean_group is not None:
            mem, groups = self._grouped(self._mem)
            return np.append(np.where(groups == self.lean_group, mem, 0.0),
                             np.zeros(self.num_cols - len(mem)))
        shape = self.problem.shape
        c = np.concatenate(self._c)
        n_grouped = sum(len(b) for b in self._c[: len(self._group)])
        if shape.max_weight:
            _, groups = self._grouped(self._c)
            c[:n_grouped] *= 1.0 - np.array([shape.rho(int(g)) for g in groups])
            assert self.t_step is not None
            c[self.t_step] = shape.max_weight * self.step_unit_s
        if self.x_exposed is not None:
            c[self.x_exposed] = self.step_unit_s
        return c

    # ---------------------------------------------------------------- output
    def milp(self) -> MILP:
        """The assembled MILP (with ``cutoff``, also the row objective <= cutoff: a candidate
        that cannot beat the known plan comes back infeasible, fast)."""
        c = self.objective()
        if np.isfinite(self.cutoff) and not self._cut_added:
            nz = np.nonzero(c)[0]
            if len(nz):
                self._add_row(nz, c[nz] / max(self.cutoff, 1e-30), -INF, 1.0 + 1e-9)
            self._cut_added = True
        m = MILP(
            c=c,
            a_rows=np.concatenate(self._rows).astype(np.int64),
            a_cols=np.concatenate(self._cols).astype(np.int64),
            a_vals=np.concatenate(self._vals),
            row_lower=np.array(self._rlo, float),
            row_upper=np.array(self._rhi, float),
            col_lower=np.zeros(self.num_cols),
            col_upper=np.concatenate(self._ub),
            integrality=np.concatenate(self._int).astype(bool),
            # flow variables y are integral once x is; T and X (the step's) and the
            # recomputation's columns need not be
            continuous_integral=(self.t_step is None and self.x_exposed is None
                                 and not self.problem.recompute),
            fractional=self._fractional(),
        )
        m.check()
        return m

    def form_terms(self, form: LinearForm) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of a linear form of the choice on this model's x and y."""
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for v, values in form.nodes:
            cols.append(self.x_start[v] + np.arange(len(values)))
            vals.append(values)
        for i_e, values in form.edges:
            block = self.y_blocks[i_e]
            if block is not None:
                start, pa, pb = block
                cols.append(start + np.arange(len(pa)))
                vals.append(values[pa, pb])
                continue
            side, key, onto_dst = self._folded[i_e]
            cols.append(self.x_start[side] + np.arange(len(key)))
            vals.append(values[0, key] if onto_dst else values[key, 0])
        if not cols:
            return np.zeros(0, int), np.zeros(0)
        c, inv = np.unique(np.concatenate(cols), return_inverse=True)
        total = np.zeros(len(c))
        np.add.at(total, inv, np.nan_to_num(np.concatenate(vals), posinf=0.0, neginf=0.0))
        return c, total

    def _fractional(self) -> np.ndarray:
        """The continuous columns that may take tiny positive values: T, X and the live
        layer's memory share (:attr:`MILP.fractional`)."""
        mask = np.zeros(self.num_cols, bool)
        for col in (self.t_step, self.x_exposed, *getattr(self, "live_cols", [])):
            if col is not None:
                mask[col] = True
        return mask

    def choice(self, x: np.ndarray) -> np.ndarray:
        """The signature index of each node in a solution vector, then the recomputation
        counts (:func:`~autoddl.formulations.recompute.counts_of` reads them)."""
        return np.array([
            int(np.argmax(x[s:s + len(n.cost_s)]))
            for s, n in zip(self.x_start, self.problem.nodes)
        ] + self.recompute_counts(x), dtype=int)
