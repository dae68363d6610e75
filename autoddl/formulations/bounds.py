r"""A fast lower bound and a feasible plan for a :class:`ShardingProblem`, without an LP.

Used to screen candidate meshes before any MILP is built: a candidate whose lower bound is not
below the best plan found so far is dominated and never solved.

**Lagrangian tree relaxation.** Write the problem with signature variables :math:`s_v`:

.. math::

    \min_s \sum_v c_v(s_v) + \sum_{e=(u,v)} c_e(s_u, s_v)
    \quad\text{s.t.}\quad \sum_v m_v(s_v) + \sum_e m_e(s_u, s_v) \le M_g \;\; \forall g.

1. **Memory.** For multipliers :math:`\lambda_g \ge 0` (one per memory group g), moving the memory
   rows into the objective gives
   :math:`L(\lambda) = \min_s \sum_v w_v + \sum_e w_e - \sum_g \lambda_g`, with
   :math:`w = c + \lambda_g m / M_g`: for every :math:`\lambda \ge 0`, :math:`L(\lambda)` is a
   lower bound (weak duality). :meth:`TreeBound.best` maximises it (concave in :math:`\lambda`).
2. **Cycles.** The pairwise terms of a spanning forest (the pairs with the widest cost spread,
   :func:`networkx.maximum_spanning_tree`) are kept exactly; every other pair's term is bounded
   below by :math:`w_e(a, b) \ge \tfrac12 \min_{b'} w_e(a, b') + \tfrac12 \min_{a'} w_e(a', b)`
   and so becomes two unary terms. An edge of a node to itself (a repeated layer feeding its next
   copy) is a unary term, exactly. All terms are non-negative, so the relaxed minimum is a lower
   bound of :math:`L(\lambda)`.
3. **Forest DP.** The relaxed problem is a tree-structured sum, minimised exactly by dynamic
   programming (min-sum message passing, leaves to root):
   :math:`\mu_{v \to p}(s_p) = \min_{s_v} w_{pv}(s_p, s_v) + b_v(s_v)`,
   :math:`b_v = w_v + \sum_{\text{children } u} \mu_{u \to v}`.

Its minimiser is a complete signature choice: evaluated on the true problem it is a feasible plan
whenever it fits memory, so each call also yields an upper bound.

**Recomputation** (:mod:`autoddl.formulations.recompute`) only adds seconds, and frees at most,
term by term, what every copy recomputed by its most freeing option would: the relaxation reads
memory lowered by that (:func:`~autoddl.formulations.recompute.memory_floor`), and a minimiser
is evaluated with counts that fit (:func:`~autoddl.formulations.recompute.fill_counts`).

This module imports no torch and no solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from autoddl.formulations.recompute import fill_counts, memory_floor
from autoddl.formulations.sharding import ShardingProblem, within_capacity

INF = float("inf")


@dataclass(frozen=True)
class BoundResult:
    """A lower bound on the optimum, and the best feasible choice seen (or None)."""

    lower_bound: float
    upper_bound: float  # inf when no evaluated choice fitted memory
    choice: np.ndarray | None
    evaluations: int
    #: the multipliers of the lower bound (None: no probe gave a finite one)
    lam: np.ndarray | None = None


class TreeBound:
    """The Lagrangian tree relaxation of one problem; see the module docstring."""

    def __init__(self, problem: ShardingProblem) -> None:
        self.problem = problem  # plans are evaluated on it; the relaxation reads ``problem``
        # below: with recomputation, memory lowered by the most it can free (a valid bound)
        problem = memory_floor(problem) if problem.recompute else problem
        cap = float(problem.memory_capacity_bytes)
        self.capacity = cap if np.isfinite(cap) and cap > 0 else INF
        nodes = problem.nodes
        groups = sorted({n.group for n in nodes} | {e.group for e in problem.edges})
        self.groups = groups
        gi = {g: i for i, g in enumerate(groups)}
        n_g = len(groups)
        # unary terms, per group of memory: cost, memory (normalized by capacity)
        self.c_node = [np.array(n.cost_s, float) for n in nodes]
        self.m_node = [np.zeros((n_g, len(n.cost_s))) for n in nodes]
        for v, n in enumerate(nodes):
            self.m_node[v][gi[n.group]] = self._norm(n.memory_bytes)
        # pairwise terms per node pair (u < v): cost (s_u, s_v) and {group: memory (s_u, s_v)}
        pairs: dict[tuple[int, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        for e in problem.edges:
            c = e.cost_s[e.src_key][:, e.dst_key]
            m = self._norm(e.memory_bytes[e.src_key][:, e.dst_key])
            g = gi[e.group]
            if e.src == e.dst:  # a node's edge to itself: exactly a unary term
                k = np.arange(len(e.src_key))
                self.c_node[e.src] = self.c_node[e.src] + c[k, k]
                self.m_node[e.src][g] += m[k, k]
                continue
            u, v = (e.src, e.dst) if e.src < e.dst else (e.dst, e.src)
            if u != e.src:
                c, m = c.T, m.T
            acc_c, acc_m = pairs.get((u, v), (0.0, {}))
            if m.any():
                acc_m = {**acc_m, g: acc_m.get(g, 0.0) + m}
            pairs[(u, v)] = (acc_c + c, acc_m)
        graph = nx.Graph()
        graph.add_nodes_from(range(len(nodes)))
        for (u, v), (c, _m) in pairs.items():
            fin = c[np.isfinite(c)]
            spread = float(fin.max() - fin.min()) if fin.size else 0.0
            graph.add_edge(u, v, weight=spread + 1e-12 * (1 + abs(fin.max(initial=0.0))))
        forest = nx.maximum_spanning_tree(graph)
        self.tree_pairs = {(u, v) if u < v else (v, u) for u, v in forest.edges}
        self.pairs = pairs
        # orientation: roots and a post-order of each tree
        self.order: list[tuple[int, int | None]] = []  # (node, parent), children first
        for comp in nx.connected_components(forest):
            root = min(comp)
            pre = list(nx.dfs_preorder_nodes(forest, root))
            parent = {root: None}
            for p, ch in nx.dfs_edges(forest, root):
                parent[ch] = p
            self.order.extend((v, parent[v]) for v in reversed(pre))
        self.evaluations = 0

    def _norm(self, mem: np.ndarray) -> np.ndarray:
        return np.asarray(mem, float) / self.capacity if np.isfinite(self.capacity) else \
            np.zeros_like(np.asarray(mem, float))

    def _pair(self, u: int, v: int, lam: np.ndarray) -> np.ndarray:
        """The weighted pairwise term of (u, v), u < v, as (s_u, s_v)."""
        c, mem = self.pairs[(u, v)]
        for g, m in mem.items():
            if lam[g]:
                c = c + lam[g] * m
        return c

    def _unary(self, lam: np.ndarray) -> list[np.ndarray]:
        """Per node, its weighted unary term at ``lam`` with the half-minima of the pairs off
        the forest folded in."""
        unary = [c + lam @ m for c, m in zip(self.c_node, self.m_node)]
        for u, v in self.pairs:
            if (u, v) in self.tree_pairs:
                continue
            w = self._pair(u, v, lam)
            unary[u] = unary[u] + 0.5 * w.min(axis=1)
            unary[v] = unary[v] + 0.5 * w.min(axis=0)
        return unary

    def _oriented(self, p: int, v: int, lam: np.ndarray) -> np.ndarray:
        """The weighted pairwise term of a forest edge as (s_p, s_v)."""
        return self._pair(p, v, lam) if p < v else self._pair(v, p, lam).T

    def solve(self, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """(L(lam), the minimising choice) of the relaxed problem at multipliers ``lam``."""
        self.evaluations += 1
        belief = self._unary(lam)
        arg: dict[int, np.ndarray] = {}
        total = 0.0
        for v, p in self.order:
            if p is None:
                total += float(belief[v].min())
                continue
            full = self._oriented(p, v, lam) + belief[v][None, :]
            arg[v] = np.argmin(full, axis=1)
            belief[p] = belief[p] + full[np.arange(len(arg[v])), arg[v]]
        choice = np.zeros(len(self.c_node), dtype=np.int64)
        for v, p in reversed(self.order):
            choice[v] = int(np.argmin(belief[v])) if p is None else int(arg[v][choice[p]])
        return total - float(lam.sum()), choice

    def min_marginals(self, lam: np.ndarray) -> list[np.ndarray]:
        """Per node and signature s, the relaxed minimum at ``lam`` over the choices that give
        the node s (min-sum messages leaves to root, then root to leaves). The relaxation
        bounds each plan's cost from below term by term, so no plan using s costs less: a
        signature whose min-marginal exceeds a known plan's cost is in no better plan."""
        belief = self._unary(lam)
        up: dict[int, np.ndarray] = {}  # each node's message to its parent
        for v, p in self.order:
            if p is not None:
                up[v] = (self._oriented(p, v, lam) + belief[v][None, :]).min(axis=1)
                belief[p] = belief[p] + up[v]
        full: list[np.ndarray] = list(belief)
        root: dict[int, int] = {}
        for v, p in reversed(self.order):  # parents first
            root[v] = v if p is None else root[p]
            if p is not None:  # p's min-marginal without v's subtree (inf stays inf)
                fin = np.isfinite(up[v])
                rest = np.full(len(up[v]), INF)
                rest[fin] = full[p][fin] - up[v][fin]
                full[v] = belief[v] + (self._oriented(p, v, lam) + rest[:, None]).min(axis=0)
        best = {r: float(full[r].min()) for r in set(root.values())}
        total = sum(best.values()) - float(lam.sum())
        return [full[v] + (total - best[root[v]]) for v in range(len(full))]

    def best(self, rounds: int = 12) -> BoundResult:
        """Maximise L over the multipliers (a common one, then per group) and return the best
        bound with the best feasible choice met on the way."""
        n_g = len(self.groups)
        best_lb, best_ub, best_choice, best_lam = -INF, INF, None, None

        def probe(lam: np.ndarray) -> float:
            nonlocal best_lb, best_ub, best_choice, best_lam
            lb, choice = self.solve(lam)
            if lb > best_lb:
                best_lb, best_lam = lb, lam
            if np.isfinite(lb):
                if self.problem.recompute:  # recomputation that fits, for the plan's step
                    choice = fill_counts(self.problem, choice, self.problem.memory_capacity_bytes)
                cost, mem = self.problem.evaluate(choice)
                if within_capacity(mem, self.problem.memory_capacity_bytes) and cost < best_ub:
                    best_ub, best_choice = cost, choice
            return lb

        lb0 = probe(np.zeros(n_g))
        exact_memory = not self.problem.recompute and not any(
            mem for pair, (_, mem) in self.pairs.items() if pair not in self.tree_pairs)
        if not np.isfinite(self.capacity) or (best_choice is not None and exact_memory):
            # the relaxation's minimiser at lam = 0 fits memory, and the relaxation counts its
            # memory exactly (no memory on the pairs bounded by half-minima): the subgradient
            # at 0 is <= 0, so L is largest at lam = 0
            return BoundResult(best_lb, best_ub, best_choice, self.evaluations, best_lam)
        scale = max(abs(lb0), 1e-9)
        # golden-section search on a log scale of a common multiplier
        lo, hi = np.log(scale * 1e-4), np.log(scale * 1e4)
        f = lambda t: probe(np.full(n_g, np.exp(t)))  # noqa: E731
        grid = np.linspace(lo, hi, 7)
        vals = [f(t) for t in grid]
        i = int(np.argmax(vals))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        phi = (np.sqrt(5) - 1) / 2
        x1, x2 = b - phi * (b - a), a + phi * (b - a)
        f1, f2 = f(x1), f(x2)
        for _ in range(rounds // 2):
            if f1 >= f2:
                b, x2, f2 = x2, x1, f1
                x1 = b - phi * (b - a)
                f1 = f(x1)
            else:
                a, x1, f1 = x1, x2, f2
                x2 = a + phi * (b - a)
                f2 = f(x2)
        if n_g > 1:  # per-group refinement around the common optimum
            lam = np.full(n_g, np.exp(x1 if f1 >= f2 else x2))
            cur = max(f1, f2)
            for _ in range(2):
                for g in range(n_g):
                    for factor in (0.0, 0.25, 0.5, 2.0, 4.0):
                        trial = lam.copy()
                        trial[g] *= factor
                        val = probe(trial)
                        if val > cur:
                            cur, lam = val, trial
        return BoundResult(best_lb, best_ub, best_choice, self.evaluations, best_lam)


def bound_fixing(problem: ShardingProblem, cutoff: float,
                 relaxation: TreeBound | None = None) -> list[np.ndarray]:
    """Per node, the indices of the signatures some plan costing at most ``cutoff`` may use:
    those whose min-marginal (:meth:`TreeBound.min_marginals`, at the multipliers of the best
    bound) does not exceed it. Exact: every plan using a dropped signature costs more than
    ``cutoff`` (reduced-cost fixing with the Lagrangian tree relaxation), so a search for plans
    under the cutoff loses none. Nothing is dropped without a finite cutoff."""
    keep_all = [np.arange(len(n.cost_s)) for n in problem.nodes]
    if not np.isfinite(cutoff):
        return keep_all
    relaxation = relaxation or TreeBound(problem)
    lam = relaxation.best().lam
    if lam is None:
        return keep_all
    tol = 1e-9 * abs(cutoff)  # relative: costs are seconds of any magnitude
    # a node left with none (no plan under the cutoff at all) keeps its best: the model
    # stays well formed and proves it
    return [np.nonzero(~(m > cutoff + tol))[0] if not (m > cutoff + tol).all()
            else np.array([int(np.argmin(m))]) for m in relaxation.min_marginals(lam)]


def tree_bound(problem: ShardingProblem) -> BoundResult:
    """A lower bound on ``problem``'s optimum and the best feasible plan the relaxation met."""
    return TreeBound(problem).best()
