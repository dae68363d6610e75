r"""The joint sharding + pipeline-stage ILP.

It extends :mod:`autoddl.formulations.sharding` (one signature per node, marginal edge variables)
with a stage per node, for ``K`` stages on identical stage meshes and ``m`` micro-batches run by a
1F1B schedule. Costs of the sharding part are per micro-batch and count ``m`` times.

Stage variables (cumulative form): :math:`a_{v,k} = 1` iff :math:`stage(v) \le k`, for
:math:`k = 0..K-2` (:math:`a_{v,K-1} = 1`), so :math:`stage(v) = \sum_{k<K-1} (1 - a_{v,k})` and
:math:`z_{v,k} = a_{v,k} - a_{v,k-1}` is the one-hot stage indicator.

* **monotone** — :meth:`PipelineModel.stage_monotone`: :math:`a_{v,k} \le a_{v,k+1}`;
* **order** — :meth:`PipelineModel.stage_order`: stages never decrease along an edge,
  :math:`a_{v,k} \le a_{u,k}` for every edge :math:`(u,v)`; a parameter sits with its consumers
  (:math:`a_{p,k} = a_{v,k}`); user inputs are in stage 0 and the loss in stage K−1;
* **boundary transfers** — :meth:`PipelineModel.transfers`: the output of :math:`u` crosses
  boundary :math:`k` iff some consumer :math:`v` has :math:`a_{u,k} - a_{v,k} = 1`
  (:math:`c_{u,k}`); then the producer's local piece, :math:`L_u = \sum_s L_{u,s} x_{u,s}` bytes,
  is sent once point to point over the pipeline axis forward, and its gradient backward:
  :math:`w_{u,k} \ge L_u - M_u (1 - c_{u,k})`, costing
  :math:`m (1 + g_u) (w_{u,k} / \beta_{pp} + \alpha_{pp} c_{u,k})` (:math:`g_u = 1` when a
  gradient flows back). A tensor read stages later is relayed: it pays at each boundary;
* **memory per stage** — :meth:`PipelineModel.memory`: with :math:`f_k = \min(K-k, m)` micro-batches
  in flight in stage :math:`k` under 1F1B, node :math:`v` needs
  :math:`\mu_{v,k} = \sum_s (W_{v,s} + f_k A_{v,s}) x_{v,s} + f_k \sum_{e \to v} \sum_{a,b} A_{e,a,b}
  y_{e,a,b}` (weights W once, activations A per micro-batch); :math:`n_{v,k} \ge \mu_{v,k} -
  M_v (1 - z_{v,k})`, :math:`\sum_v n_{v,k} \le` capacity for every stage;
* **balance** — :meth:`PipelineModel.balance`: :math:`\sum_v F_v z_{v,k} \le (1+\epsilon) \bar F`
  with :math:`\bar F` the mean stage FLOPs, which keeps every stage busy and the bubble bounded.

Objective: :math:`m \cdot` (sharding objective) + transfer costs + the bubble,
:math:`(K-1)` times one micro-batch's forward+backward time of a stage: idle time, charged like the
redundant compute of the sharding part, so that "more stages" is not free.

**Weight gradients accumulated over the micro-batches.** As in Megatron-LM, DeepSpeed or DDP's
``no_sync``, the gradient a weight's reader returns is summed over the m micro-batches and
converted (all-reduced, ...) once per step, not once per micro-batch. The conversion steps
:math:`R` (all-reduce, reduce-scatter, all-gather, all-to-all, slices) are linear, so
:math:`R(\sum_j g_j) = \sum_j R(g_j)`: the result is the same, and the cost of the edge pair
:math:`(a, b)` is :math:`m\,c^{fwd}_{e,a,b} + c^{bwd}_{e,a,b}` instead of
:math:`m\,(c^{fwd}_{e,a,b} + c^{bwd}_{e,a,b})`. The per-micro-batch problem this module is given
(:attr:`PipelineProblem.sharding`) carries the once-per-step part as its per-micro-batch share,
:math:`c^{fwd} + c^{bwd}/m`, so that the :math:`m\cdot` above makes it exact; nothing in the
model below changes. Memory: the sum lives in the placement the reader returns (a ``P`` gradient
of a ``B`` weight is a full-size partial sum), so it is accumulated only where that piece is no
larger than the weight's own gradient, whose memory (counted with the weight's states) then holds
it: data parallel's all-reduce of a ``B`` weight, all-to-alls and all-gathers of gradients. A
weight stored split whose gradient is reduce-scattered from a full ``P`` sum, a ZeRO-2 weight
(gradient divided), and a weight read by several operators keep the per-micro-batch conversion
(as ZeRO-2/3 do), so the memory rows are unchanged and truthful
(:func:`autoddl.engine.costs.accumulates_grad`, applied by :mod:`autoddl.engine.stages`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from autoddl.formulations.milp import INF, MILP
from autoddl.formulations.sharding import ShardingModel, ShardingProblem, within_capacity


@dataclass(frozen=True, eq=False)
class PipelineProblem:
    """A sharding problem (per micro-batch, on the stage mesh) plus what stages need.

    ``node_kind`` is "param", "input" or "op"; ``activation_bytes[v][s]`` is the part of
    ``sharding.nodes[v].memory_bytes[s]`` that is per micro-batch (the rest is held once);
    ``piece_bytes[v][s]`` the local piece a boundary transfer of v's output sends;
    ``carries_grad[v]`` whether a gradient flows back to v's output.
    """

    sharding: ShardingProblem
    stages: int
    microbatches: int
    node_kind: tuple[str, ...]
    flops: np.ndarray
    activation_bytes: tuple[np.ndarray, ...]
    piece_bytes: tuple[np.ndarray, ...]
    carries_grad: np.ndarray
    loss: int
    p2p_bandwidth_gbps: float
    p2p_latency_s: float
    bubble_s: float
    balance_eps: float = 0.1
    tied: tuple[tuple[int, ...], ...] = ()  # node groups that must share a stage (whole layers)

    def in_flight(self, k: int) -> int:
        """Micro-batches whose activations stage ``k`` holds at once under 1F1B."""
        return min(self.stages - k, self.microbatches)

    def legal_stages(self, stage: np.ndarray) -> bool:
        """Whether a stage assignment keeps the order, tie and balance rules."""
        p = self.sharding
        k_max = self.stages - 1
        if stage[self.loss] != k_max:
            return False
        for v, kind in enumerate(self.node_kind):
            if kind == "input" and stage[v] != 0:
                return False
        for e in p.edges:
            if stage[e.src] > stage[e.dst]:
                return False
            if self.node_kind[e.src] == "param" and stage[e.src] != stage[e.dst]:
                return False
        if any(len({int(stage[v]) for v in grp}) > 1 for grp in self.tied):
            return False
        per_stage = np.bincount(stage, weights=self.flops, minlength=self.stages)
        return bool(np.all(per_stage <= (1 + self.balance_eps) * self.flops.sum() / self.stages
                           + 1e-9))

    def evaluate(self, choice: np.ndarray, stage: np.ndarray) -> tuple[float, float]:
        """(objective, worst stage memory) of signatures ``choice`` and stages ``stage``."""
        p, m = self.sharding, self.microbatches
        cost = m * p.evaluate(choice)[0] + self.bubble_s
        mem = np.zeros(self.stages)
        for v, n in enumerate(p.nodes):
            act = self.activation_bytes[v][choice[v]]
            mem[stage[v]] += n.memory_bytes[choice[v]] - act + self.in_flight(stage[v]) * act
        last_reader: dict[int, int] = {}
        for e in p.edges:
            a, b = e.src_key[choice[e.src]], e.dst_key[choice[e.dst]]
            mem[stage[e.dst]] += self.in_flight(stage[e.dst]) * e.memory_bytes[a, b]
            last_reader[e.src] = max(last_reader.get(e.src, 0), int(stage[e.dst]))
        for u, far in last_reader.items():  # one send per tensor per boundary crossed
            hops = far - int(stage[u])
            if hops and self.node_kind[u] != "param":
                sends = hops * (1 + int(self.carries_grad[u]))
                piece = self.piece_bytes[u][choice[u]]
                cost += m * sends * (piece / (self.p2p_bandwidth_gbps * 1e9) + self.p2p_latency_s)
        return cost, float(mem.max())

    def brute_force(self) -> tuple[float, tuple[np.ndarray, np.ndarray] | None]:
        """Exhaustive optimum over (stage, signature) assignments, for tests on tiny problems."""
        p = self.sharding
        best, arg = INF, None
        stage_sets = [s for s in itertools.product(range(self.stages), repeat=len(p.nodes))
                      if self.legal_stages(np.array(s))]
        for combo in itertools.product(*[range(len(n.cost_s)) for n in p.nodes]):
            choice = np.array(combo)
            for st in stage_sets:
                stage = np.array(st)
                cost, mem = self.evaluate(choice, stage)
                if cost < best * (1 - 1e-12) and within_capacity(mem, p.memory_capacity_bytes):
                    best, arg = cost, (choice, stage)
        return best, arg


class PipelineModel(ShardingModel):
    """Builds the joint MILP of a :class:`PipelineProblem`."""

    fold_into_producer = False

    def __init__(self, problem: PipelineProblem, minimize_memory: bool = False) -> None:
        """``minimize_memory``: instead of the cost, minimize the worst stage's memory (the
        capacity then only scales the rows); read the result with :meth:`memory_of`."""
        self.pipe = problem
        self.minimize_memory = minimize_memory
        self.t_col: int | None = None
        self._mem_scale = 1.0
        self.a_start: list[int] = []
        super().__init__(problem.sharding)  # x, y, one-hot, edge marginals, memory (overridden)
        self.stage_monotone()
        self.stage_order()
        self.transfers()
        self.balance()

    # ---------------------------------------------------------------- helpers
    def _a(self, v: int, k: int) -> tuple[list[int], list[float], float]:
        """a[v,k] as (columns, coefficients, constant)."""
        if k < 0:
            return [], [], 0.0
        if k >= self.pipe.stages - 1:
            return [], [], 1.0
        return [self.a_start[v] + k], [1.0], 0.0

    def _row(self, terms: list[tuple[list[int], list[float], float]], lo: float, hi: float) -> None:
        cols, vals, const = [], [], 0.0
        for c, v, k in terms:
            cols += c
            vals += v
            const += k
        if cols:
            self._add_row(np.array(cols), np.array(vals), lo - const, hi - const)

    @staticmethod
    def _scaled(t: tuple[list[int], list[float], float], f: float):
        c, v, k = t
        return c, [f * x for x in v], f * k

    def _add_x(self) -> None:
        super()._add_x()
        k = self.pipe.stages - 1
        for _ in self.problem.nodes:
            self.a_start.append(self._new_cols(np.zeros(k), np.zeros(k), integer=True))

    # ---------------------------------------------------------------- constraint families
    def stage_monotone(self) -> None:
        r""":math:`a_{v,k} \le a_{v,k+1}`."""
        for v in range(len(self.problem.nodes)):
            for k in range(self.pipe.stages - 2):
                self._row([self._a(v, k), self._scaled(self._a(v, k + 1), -1.0)], -INF, 0.0)

    def stage_order(self) -> None:
        r""":math:`a_{v,k} \le a_{u,k}` per edge; params tied to consumers; inputs first, loss last."""
        pipe = self.pipe
        for e in self.problem.edges:
            tied = pipe.node_kind[e.src] == "param"
            for k in range(pipe.stages - 1):
                lo = 0.0 if tied else -INF
                self._row([self._a(e.dst, k), self._scaled(self._a(e.src, k), -1.0)], lo, 0.0)
        for grp in pipe.tied:
            for v, w in zip(grp[:-1], grp[1:]):
                for k in range(pipe.stages - 1):
                    self._row([self._a(v, k), self._scaled(self._a(w, k), -1.0)], 0.0, 0.0)
        for v, kind in enumerate(pipe.node_kind):
            for k in range(pipe.stages - 1):
                if kind == "input":
                    self._row([self._a(v, k)], 1.0, 1.0)
                if v == pipe.loss:
                    self._row([self._a(v, k)], 0.0, 0.0)

    def transfers(self) -> None:
        r"""Per producer :math:`u` and boundary :math:`k`: :math:`c_{u,k} \ge a_{u,k} - a_{v,k}`
        for every consumer :math:`v` (the tensor crosses :math:`k` once, however many read it
        beyond), :math:`w_{u,k} \ge L_u - M_u (1 - c_{u,k})`; cost
        :math:`m (1+g_u)(w_{u,k}/\beta + \alpha c_{u,k})`.

        :math:`w` is stored in units of :math:`M_u` (so in [0, 1]) to keep rows well scaled.
        """
        pipe, m = self.pipe, self.pipe.microbatches
        beta = pipe.p2p_bandwidth_gbps * 1e9
        consumers: dict[int, list[int]] = {}
        for e in self.problem.edges:
            if pipe.node_kind[e.src] != "param":  # tied to its consumers: never crosses
                consumers.setdefault(e.src, []).append(e.dst)
        for u, vs in consumers.items():
            piece_s = np.asarray(pipe.piece_bytes[u], float) / beta  # seconds of one send
            big_m = float(piece_s.max())
            sends = 1 + int(pipe.carries_grad[u])
            xs = self.x_start[u] + np.arange(len(piece_s))
            for k in range(pipe.stages - 1):
                c = self._new_cols(np.array([m * sends * pipe.p2p_latency_s]), np.zeros(1),
                                   integer=False)
                for v in dict.fromkeys(vs):  # c - a_u + a_v >= 0
                    self._row([([c], [1.0], 0.0), self._scaled(self._a(u, k), -1.0),
                               self._a(v, k)], 0.0, INF)
                if big_m > 0:  # w - sum (L/M) x - c >= -1
                    w = self._new_cols(np.array([m * sends * big_m]), np.zeros(1), integer=False)
                    self._row([([w], [1.0], 0.0), (list(xs), list(-piece_s / big_m), 0.0),
                               ([c], [-1.0], 0.0)], -1.0, INF)

    def a_start_block(self, v: int) -> int:
        """Index, among the column blocks, of node v's stage block."""
        return len(self.problem.nodes) + v

    def balance(self) -> None:
        r""":math:`\sum_v F_v z_{v,k} \le (1+\epsilon)\bar F`."""
        pipe = self.pipe
        cap = (1 + pipe.balance_eps) * pipe.flops.sum() / pipe.stages
        for k in range(pipe.stages):
            terms = []
            for v, f in enumerate(pipe.flops):
                if f:
                    terms += [self._scaled(self._a(v, k), f), self._scaled(self._a(v, k - 1), -f)]
            self._row(terms, -INF, cap)

    def memory(self) -> None:
        r""":math:`n_{v,k} \ge \mu_{v,k} - M_v(1 - z_{v,k})`, :math:`\sum_v n_{v,k} \le` capacity.

        :math:`n_{v,k}` is stored in units of :math:`M_v` (in [0, 1]); the stage rows are divided
        by the capacity, and left out when even the most memory-hungry choices fit.
        """
        pipe, p = self.pipe, self.problem
        cap = float(p.memory_capacity_bytes)
        into: dict[int, list[int]] = {}
        for i, e in enumerate(p.edges):
            into.setdefault(e.dst, []).append(i)
        rows: list[tuple[list[int], list[float]]] = []
        worst: list[float] = []
        for k in range(pipe.stages):
            f = pipe.in_flight(k)
            n_cols, n_big = [], []
            for v, node in enumerate(p.nodes):
                act = np.asarray(pipe.activation_bytes[v], float)
                folded = self._mem[v] - node.memory_bytes  # edges into v folded onto its x
                coef = node.memory_bytes - act + f * (act + folded)
                cols, vals = list(self.x_start[v] + np.arange(len(coef))), list(coef)
                for i in into.get(v, []):
                    blk = self.y_blocks[i]
                    if blk is None:
                        continue  # single-key edges' memory was folded onto x already
                    start, pa, pb = blk
                    mem = p.edges[i].memory_bytes[pa, pb]
                    nz = np.nonzero(mem)[0]
                    cols += list(start + nz)
                    vals += list(f * mem[nz])
                big_m = float(np.abs(coef).max()) + sum(
                    f * float(p.edges[i].memory_bytes.max()) for i in into.get(v, []))
                if big_m <= 0:
                    continue
                n = self._new_cols(np.zeros(1), np.zeros(1), integer=False)
                n_cols.append(n)
                n_big.append(big_m)
                zk = [self._a(v, k), self._scaled(self._a(v, k - 1), -1.0)]
                # n - mu/M - z >= -1
                self._row([([n], [1.0], 0.0), (cols, [-x / big_m for x in vals], 0.0),
                           *[self._scaled(t, -1.0) for t in zk]], -1.0, INF)
            rows.append((n_cols, n_big))
            worst.append(sum(n_big))
        top = max(worst, default=0.0)
        if self.minimize_memory:  # minimize t >= every stage's memory, t in units of `top`
            self._mem_scale = max(top, 1.0)
            self.t_col = self._new_cols(np.ones(1), np.zeros(1), integer=False)
            for n_cols, n_big in rows:
                if n_cols:
                    self._add_row(np.array(n_cols + [self.t_col]),
                                  np.array([b / self._mem_scale for b in n_big] + [-1.0]),
                                  -INF, 0.0)
        elif np.isfinite(cap) and top > cap:
            for n_cols, n_big in rows:
                if n_cols:
                    self.memory_rows.append(len(self._rlo))
                    self._add_row(np.array(n_cols), np.array(n_big) / cap, -INF, 1.0)

    # ---------------------------------------------------------------- output
    def milp(self) -> MILP:
        """The assembled MILP: sharding costs times m, plus transfers, plus the bubble."""
        m = self.pipe.microbatches
        base = ShardingModel.milp(self)
        if self.t_col is not None:
            c = np.zeros_like(base.c)
            c[self.t_col] = 1.0
            return MILP(c, base.a_rows, base.a_cols, base.a_vals, base.row_lower,
                        base.row_upper, base.col_lower, base.col_upper, base.integrality,
                        continuous_integral=False)
        c = base.c.copy()
        n_sharding = sum(len(x) for x in self._c[: len(self.problem.nodes)])
        c[:n_sharding] *= m  # x columns
        for blk in self.y_blocks:
            if blk is not None:
                start, pa, _ = blk
                c[start:start + len(pa)] *= m
        return MILP(c, base.a_rows, base.a_cols, base.a_vals, base.row_lower, base.row_upper,
                    base.col_lower, base.col_upper, base.integrality, offset=self.pipe.bubble_s,
                    continuous_integral=False)

    def memory_of(self, objective: float) -> float:
        """Bytes per device of a ``minimize_memory`` model's objective."""
        return objective * self._mem_scale

    def stages_of(self, x: np.ndarray) -> np.ndarray:
        """Each node's stage in a solution vector."""
        k = self.pipe.stages - 1
        return np.array([int(round(k - x[s:s + k].sum())) for s in self.a_start])
