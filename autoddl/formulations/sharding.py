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

Keys, not signatures, index :math:`y`: many signatures share an edge's placements, so the edge
variables number (distinct output placements) × (distinct input placements), not |S_u|·|S_v|.
An edge whose producer (or consumer) side has one key needs no :math:`y`: its cost lands on the
other side's :math:`x` directly.

This module imports no torch and no solver: it builds a :class:`~autoddl.formulations.milp.MILP`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from autoddl.formulations.milp import INF, MILP

#: relative slack allowed when checking a plan's memory against the cap outside a solver: float
#: rounding of a sum of terms (a few ulps of 1e-16 each) only, never a solver's tolerance (1e-7:
#: a byte of a 48 MB cap); below a byte for any device memory under 1 TB
MEMORY_RTOL = 1e-12


def within_capacity(memory_bytes: float, capacity_bytes: float) -> bool:
    """Whether a plan's memory fits a device (up to float rounding, :data:`MEMORY_RTOL`)."""
    return memory_bytes <= capacity_bytes * (1 + MEMORY_RTOL)


@dataclass(frozen=True, eq=False)
class NodeChoices:
    """A node's options: per signature a cost (s), memory per device (bytes), and edge keys."""

    name: str
    cost_s: np.ndarray
    memory_bytes: np.ndarray
    group: int = 0  # memory group: the devices whose memory this counts against (a stage)


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


@dataclass(frozen=True, eq=False)
class ShardingProblem:
    """Nodes (in topological order), edges, and the memory capacity per device."""

    nodes: tuple[NodeChoices, ...]
    edges: tuple[EdgeChoices, ...]
    memory_capacity_bytes: float

    def evaluate(self, choice: np.ndarray) -> tuple[float, float]:
        """(cost in seconds, memory per device in bytes, the worst group's) of one signature
        per node."""
        cost = sum(float(n.cost_s[c]) for n, c in zip(self.nodes, choice))
        mem: dict[int, float] = {}
        for n, c in zip(self.nodes, choice):
            mem[n.group] = mem.get(n.group, 0.0) + float(n.memory_bytes[c])
        for e in self.edges:
            a, b = e.src_key[choice[e.src]], e.dst_key[choice[e.dst]]
            cost += float(e.cost_s[a, b])
            mem[e.group] = mem.get(e.group, 0.0) + float(e.memory_bytes[a, b])
        return cost, max(mem.values(), default=0.0)

    def brute_force(self) -> tuple[float, np.ndarray | None]:
        """Exhaustive optimum (for tests on tiny problems): (cost, choice) or (inf, None)."""
        best, arg = INF, None
        for combo in itertools.product(*[range(len(n.cost_s)) for n in self.nodes]):
            choice = np.array(combo)
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


class ShardingModel:
    """Builds the MILP of a :class:`ShardingProblem` and reads assignments back."""

    #: fold an edge whose consumer side has one key onto the producer's x (no y variables);
    #: the pipeline model turns it off so that an edge's memory stays with its consumer's stage
    fold_into_producer = True

    def __init__(self, problem: ShardingProblem, cutoff: float = INF) -> None:
        """``cutoff``: an upper bound on the optimum (the cost of a known plan). Costs are
        non-negative, so a signature or an edge pair costing more on its own is in no optimal
        plan: it gets no variable (exact pruning)."""
        self.problem = problem
        self.cutoff = cutoff
        self._cut_added = False
        self.keep_nodes: list | None = None
        self.keep_edges: list | None = None
        self.lower_bound = 0.0
        if np.isfinite(cutoff):
            self.keep_nodes, self.keep_edges, self.lower_bound = bound_pruning(problem, cutoff)
        self._c: list[np.ndarray] = []
        self._mem: list[np.ndarray] = []
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
        self._add_x()
        self.one_hot()
        self.edge_marginals()
        self.memory()

    # ---------------------------------------------------------------- helpers
    def _new_cols(self, cost: np.ndarray, mem: np.ndarray, integer: bool) -> int:
        start = self.num_cols
        self._c.append(np.array(cost, float))
        self._mem.append(np.array(mem, float))
        self._ub.append(np.ones(len(cost)))
        self._int.append(np.full(len(cost), integer))
        self.num_cols += len(cost)
        return start

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
            self.x_start.append(self._new_cols(n.cost_s, n.memory_bytes, integer=True))
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
            cost, mem = e.cost_s, e.memory_bytes
            if self.keep_edges is not None:
                cost = np.where(self.keep_edges[i_e], cost, np.inf)
            ks, kd = cost.shape
            # folding puts the edge's memory in the group of the side it lands on
            foldable_src = e.group == self.problem.nodes[e.src].group or not mem.any()
            foldable_dst = e.group == self.problem.nodes[e.dst].group or not mem.any()
            onto_dst = ks == 1 and foldable_dst
            if onto_dst or (kd == 1 and self.fold_into_producer
                            and foldable_src):  # no y: fold onto x
                self.y_blocks.append(None)
                side, key = (e.dst, e.dst_key) if onto_dst else (e.src, e.src_key)
                row = cost[0, :] if onto_dst else cost[:, 0]
                mrow = mem[0, :] if onto_dst else mem[:, 0]
                start, k = self.x_start[side], len(key)
                add_c, add_m = row[key], mrow[key]
                bad = ~np.isfinite(add_c)
                self._c[side][:] += np.where(bad, 0.0, add_c)
                self._mem[side][:] += np.where(bad, 0.0, add_m)
                self._ub[side][bad] = 0.0
                assert start + k <= self.num_cols
                continue
            pa, pb = np.nonzero(np.isfinite(cost))
            start = self._new_cols(cost[pa, pb], mem[pa, pb], integer=False)
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
            if len(nz) and mem[nz].sum() > cap:  # a row that cannot bind is left out
                self.memory_rows.append(len(self._rlo))
                self._add_row(nz, mem[nz] / cap, -INF, 1.0)

    # ---------------------------------------------------------------- output
    def milp(self) -> MILP:
        """The assembled MILP (with ``cutoff``, also the row objective <= cutoff: a candidate
        that cannot beat the known plan comes back infeasible, fast)."""
        if np.isfinite(self.cutoff) and not self._cut_added:
            c = np.concatenate(self._c)
            nz = np.nonzero(c)[0]
            if len(nz):
                self._add_row(nz, c[nz] / max(self.cutoff, 1e-30), -INF, 1.0 + 1e-9)
            self._cut_added = True
        m = MILP(
            c=np.concatenate(self._c),
            a_rows=np.concatenate(self._rows).astype(np.int64),
            a_cols=np.concatenate(self._cols).astype(np.int64),
            a_vals=np.concatenate(self._vals),
            row_lower=np.array(self._rlo, float),
            row_upper=np.array(self._rhi, float),
            col_lower=np.zeros(self.num_cols),
            col_upper=np.concatenate(self._ub),
            integrality=np.concatenate(self._int).astype(bool),
            continuous_integral=True,  # the only continuous columns are flow variables y
        )
        m.check()
        return m

    def choice(self, x: np.ndarray) -> np.ndarray:
        """The signature index of each node in a solution vector."""
        return np.array([
            int(np.argmax(x[s:s + len(n.cost_s)]))
            for s, n in zip(self.x_start, self.problem.nodes)
        ])
