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
            if cost < best and mem <= self.memory_capacity_bytes * (1 + 1e-9):
                best, arg = cost, choice
        return best, arg


class ShardingModel:
    """Builds the MILP of a :class:`ShardingProblem` and reads assignments back."""

    #: fold an edge whose consumer side has one key onto the producer's x (no y variables);
    #: the pipeline model turns it off so that an edge's memory stays with its consumer's stage
    fold_into_producer = True

    def __init__(self, problem: ShardingProblem) -> None:
        self.problem = problem
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
            self._group.append(n.group)

    # ---------------------------------------------------------------- constraint families
    def one_hot(self) -> None:
        r"""Each node takes one signature: :math:`\sum_s x_{v,s} = 1`."""
        for v, n in enumerate(self.problem.nodes):
            k = len(n.cost_s)
            self._add_row(self.x_start[v] + np.arange(k), np.ones(k), 1.0, 1.0)

    def edge_marginals(self) -> None:
        r"""Per edge: :math:`\sum_b y_{a,b} = \sum_{key_u(s)=a} x_{u,s}`, and the same per b."""
        for e in self.problem.edges:
            cost, mem = e.cost_s, e.memory_bytes
            ks, kd = cost.shape
            foldable = e.group == self.problem.nodes[e.src].group or not mem.any()
            if ks == 1 or (kd == 1 and self.fold_into_producer and foldable):  # no y: fold onto x
                self.y_blocks.append(None)
                side, key = (e.dst, e.dst_key) if ks == 1 else (e.src, e.src_key)
                row = cost[0, :] if ks == 1 else cost[:, 0]
                mrow = mem[0, :] if ks == 1 else mem[:, 0]
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
                self._add_row(nz, mem[nz] / cap, -INF, 1.0)

    # ---------------------------------------------------------------- output
    def milp(self) -> MILP:
        """The assembled MILP."""
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
