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

**Recomputation** (:mod:`autoddl.formulations.recompute`). Forced counts are folded into the
costs (exact). A free group of :math:`R` copies adds, with counts :math:`r_o \ge 0`,
:math:`\sum_o r_o \le R`, the seconds :math:`\sum_o r_o F_o(s)` and frees
:math:`\sum_o r_o S_o(s)` bytes; its live layer (non-negative memory) is dropped. In
:math:`L(\lambda)` its counts then meet the weight
:math:`\sum_o r_o\,(F_o(s) - \lambda_g S_o(s)/M_g)`, whose minimum over the counts is
:math:`R \min(0, \min_o G_o(s))` with :math:`G_o = F_o - \lambda_g S_o / M_g`. Both forms are
sums of node and pair terms :math:`G_o = \sum_t G_{o,t}`, and
:math:`\min(0, \min_o \sum_t G_{o,t}) \ge \sum_t \min(0, \min_o G_{o,t})`: each term gets
:math:`R \min(0, \min_o G_{o,t})` added, which keeps the relaxation a lower bound and its shape
a tree. At :math:`\lambda = 0` it adds nothing (recomputation only costs time); at large
:math:`\lambda` it frees memory at its price in seconds. A minimiser is evaluated with the
counts the same weights pick (every copy of the option of least :math:`G_o`, where negative)
and with counts that fit (:func:`~autoddl.formulations.recompute.fill_counts`), the faster
that fits.

This module imports no torch and no solver.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import networkx as nx
import numpy as np

from autoddl.formulations.recompute import RecomputeGroup, counts_of, fill_counts, fold_fixed
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


#: count vertices (below) enumerated per relaxation at most: each is one more tree pass per
#: multiplier
MAX_VERTICES = 3

Terms = list[tuple[int, int, np.ndarray, np.ndarray]]  # (group, copies, seconds, freed memory)


class _Part:
    """The weighted terms of one (folded) problem: unary and pairwise cost and memory, and the
    recompute terms of its free groups; memory normalized by ``capacity``."""

    def __init__(self, problem: ShardingProblem, gi: dict[int, int], capacity: float) -> None:
        self.capacity = capacity
        n_g = len(gi)
        self.c_node = [np.array(n.cost_s, float) for n in problem.nodes]
        self.m_node = [np.zeros((n_g, len(n.cost_s))) for n in problem.nodes]
        for v, n in enumerate(problem.nodes):
            self.m_node[v][gi[n.group]] = self.norm(n.memory_bytes)
        # pairwise terms per node pair (u < v): cost (s_u, s_v) and {group: memory (s_u, s_v)}
        self.pairs: dict[tuple[int, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        for e in problem.edges:
            c = e.cost_s[e.src_key][:, e.dst_key]
            m = self.norm(e.memory_bytes[e.src_key][:, e.dst_key])
            g = gi[e.group]
            if e.src == e.dst:  # a node's edge to itself: exactly a unary term
                k = np.arange(len(e.src_key))
                self.c_node[e.src] = self.c_node[e.src] + c[k, k]
                self.m_node[e.src][g] += m[k, k]
                continue
            u, v = (e.src, e.dst) if e.src < e.dst else (e.dst, e.src)
            if u != e.src:
                c, m = c.T, m.T
            acc_c, acc_m = self.pairs.get((u, v), (0.0, {}))
            if m.any():
                acc_m = {**acc_m, g: acc_m.get(g, 0.0) + m}
            self.pairs[(u, v)] = (acc_c + c, acc_m)
        self.r_node: dict[int, Terms] = {}
        self.r_pair: dict[tuple[int, int], Terms] = {}
        for g in problem.recompute:
            if g.fixed is None and g.options:
                self._add_group(problem, g, gi[g.group])

    def norm(self, mem: np.ndarray) -> np.ndarray:
        """Bytes as a share of the capacity (zeros without one)."""
        return np.asarray(mem, float) / self.capacity if np.isfinite(self.capacity) else \
            np.zeros_like(np.asarray(mem, float))

    def _add_group(self, problem: ShardingProblem, g: RecomputeGroup, grp: int) -> None:
        """Per node and node pair, the (memory group, copies, seconds (options, ...),
        normalized freed bytes (options, ...)) of free group ``g``'s terms there."""
        nodes: dict[int, list] = {}
        edges: dict[int, list] = {}
        for o, opt in enumerate(g.options):
            for form, slot in ((opt.extra_s, 0), (opt.saved_bytes, 1)):
                for v, vals in form.nodes:
                    nodes.setdefault(v, [[None] * len(g.options) for _ in range(2)])
                    nodes[v][slot][o] = np.asarray(vals, float)
                for i, vals in form.edges:
                    edges.setdefault(i, [[None] * len(g.options) for _ in range(2)])
                    edges[i][slot][o] = np.nan_to_num(np.asarray(vals, float), posinf=0.0)
        for v, (f, s) in nodes.items():
            self.r_node.setdefault(v, []).append((grp, g.copies, _stack(f), self.norm(_stack(s))))
        for i, (f, s) in edges.items():
            e = problem.edges[i]
            f_m = _stack(f)[:, e.src_key][:, :, e.dst_key]
            s_m = self.norm(_stack(s)[:, e.src_key][:, :, e.dst_key])
            if e.src == e.dst:
                k = np.arange(len(e.src_key))
                self.r_node.setdefault(e.src, []).append((grp, g.copies, f_m[:, k, k],
                                                          s_m[:, k, k]))
                continue
            u, v = (e.src, e.dst) if e.src < e.dst else (e.dst, e.src)
            if u != e.src:
                f_m, s_m = f_m.transpose(0, 2, 1), s_m.transpose(0, 2, 1)
            self.r_pair.setdefault((u, v), []).append((grp, g.copies, f_m, s_m))

    @staticmethod
    def gain(terms: Terms, lam: np.ndarray) -> float | np.ndarray:
        """The least weight the counts of recomputation can add through these terms at ``lam``
        (<= 0; module docstring)."""
        out: float | np.ndarray = 0.0
        for g, copies, f, s in terms:
            out = out + copies * np.minimum(0.0, (f - lam[g] * s).min(axis=0))
        return out

    def pair(self, u: int, v: int, lam: np.ndarray) -> np.ndarray:
        """The weighted pairwise term of (u, v), u < v, as (s_u, s_v)."""
        c, mem = self.pairs[(u, v)]
        for g, m in mem.items():
            if lam[g]:
                c = c + lam[g] * m
        terms = self.r_pair.get((u, v))
        return c + self.gain(terms, lam) if terms and lam.any() else c

    def unary(self, lam: np.ndarray) -> list[np.ndarray]:
        """The weighted unary term of every node."""
        out = [c + lam @ m for c, m in zip(self.c_node, self.m_node)]
        if lam.any():
            for v, terms in self.r_node.items():
                out[v] = out[v] + self.gain(terms, lam)
        return out


def count_vertices(problem: ShardingProblem) -> tuple[list[int], list[tuple[tuple[int, ...],
                                                                           ...]]]:
    """(the free recompute groups whose counts are enumerated, the vertices of their count
    polytopes): groups by most copies first while the vertices number at most
    :data:`MAX_VERTICES`; a group's vertices are no copy recomputed and every copy by one
    option. The first vertex recomputes nothing."""
    free = sorted((k for k, g in enumerate(problem.recompute) if g.fixed is None and g.options),
                  key=lambda k: -problem.recompute[k].copies)
    chosen: list[int] = []
    count = 1
    for k in free:
        n = len(problem.recompute[k].options) + 1
        if count * n > MAX_VERTICES:
            break
        chosen.append(k)
        count *= n

    def corners(g: RecomputeGroup) -> list[tuple[int, ...]]:
        return [(0,) * len(g.options)] + [
            tuple(g.copies if j == o else 0 for j in range(len(g.options)))
            for o in range(len(g.options))]

    return chosen, list(itertools.product(*[corners(problem.recompute[k]) for k in chosen]))


class TreeBound:
    """The Lagrangian tree relaxation of one problem; see the module docstring."""

    def __init__(self, problem: ShardingProblem) -> None:
        self.problem = problem  # plans are evaluated on it; the relaxation reads ``problem``
        cap = float(problem.memory_capacity_bytes)
        self.capacity = cap if np.isfinite(cap) and cap > 0 else INF
        groups = sorted({n.group for n in problem.nodes} | {e.group for e in problem.edges})
        self.groups = groups
        gi = {g: i for i, g in enumerate(groups)}
        self.enumerated, self.vertices = count_vertices(problem)
        self.parts = [_Part(fold_fixed(self._at_vertex(vx)) if problem.recompute else problem,
                            gi, self.capacity) for vx in self.vertices]
        pairs = self.parts[0].pairs
        graph = nx.Graph()
        graph.add_nodes_from(range(len(problem.nodes)))
        for (u, v), (c, _m) in pairs.items():
            fin = c[np.isfinite(c)]
            spread = float(fin.max() - fin.min()) if fin.size else 0.0
            graph.add_edge(u, v, weight=spread + 1e-12 * (1 + abs(fin.max(initial=0.0))))
        forest = nx.maximum_spanning_tree(graph)
        self.tree_pairs = {(u, v) if u < v else (v, u) for u, v in forest.edges}
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

    def _at_vertex(self, vertex: tuple[tuple[int, ...], ...]) -> ShardingProblem:
        """The problem with the enumerated groups' counts forced to ``vertex``."""
        groups = list(self.problem.recompute)
        for k, counts in zip(self.enumerated, vertex):
            groups[k] = dataclasses.replace(groups[k], fixed=counts)
        return dataclasses.replace(self.problem, recompute=tuple(groups))

    @property
    def pairs(self) -> dict[tuple[int, int], tuple[np.ndarray, dict[int, np.ndarray]]]:
        """The pairwise terms without recomputation (the first vertex's)."""
        return self.parts[0].pairs

    def solve(self, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """(L(lam), the minimising choice) of the relaxed problem at multipliers ``lam``: the
        least over the count vertices (at lam = 0 the first: recomputation only adds seconds);
        the choice holds the enumerated groups' counts of that vertex after the signatures
        (other groups: none)."""
        self.evaluations += 1
        best, arg = INF, None
        for vertex, part in zip(self.vertices, self.parts if lam.any() else self.parts[:1]):
            value, choice = self._solve_part(part, lam)
            if arg is None or value < best:
                best, arg = value, (choice, vertex)
        assert arg is not None
        choice, vertex = arg
        tail: list[int] = []
        at = dict(zip(self.enumerated, vertex))
        for k, g in enumerate(self.problem.recompute):
            tail.extend(at.get(k, g.default_counts()))
        return best - float(lam.sum()), np.concatenate([choice, np.array(tail, dtype=np.int64)])

    def _unary(self, part: _Part, lam: np.ndarray) -> list[np.ndarray]:
        """Per node, one vertex's weighted unary term at ``lam`` with the half-minima of the
        pairs off the forest folded in."""
        unary = part.unary(lam)
        for u, v in part.pairs:
            if (u, v) in self.tree_pairs:
                continue
            w = part.pair(u, v, lam)
            unary[u] = unary[u] + 0.5 * w.min(axis=1)
            unary[v] = unary[v] + 0.5 * w.min(axis=0)
        return unary

    @staticmethod
    def _oriented(part: _Part, p: int, v: int, lam: np.ndarray) -> np.ndarray:
        """One vertex's weighted pairwise term of a forest edge as (s_p, s_v)."""
        return part.pair(p, v, lam) if p < v else part.pair(v, p, lam).T

    def _solve_part(self, part: _Part, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """(min, minimiser) of one vertex's relaxed sum by the forest DP."""
        belief = self._unary(part, lam)
        arg: dict[int, np.ndarray] = {}
        total = 0.0
        for v, p in self.order:
            if p is None:
                total += float(belief[v].min())
                continue
            full = self._oriented(part, p, v, lam) + belief[v][None, :]
            arg[v] = np.argmin(full, axis=1)
            belief[p] = belief[p] + full[np.arange(len(arg[v])), arg[v]]
        choice = np.zeros(len(belief), dtype=np.int64)
        for v, p in reversed(self.order):
            choice[v] = int(np.argmin(belief[v])) if p is None else int(arg[v][choice[p]])
        return total, choice

    def min_marginals(self, lam: np.ndarray) -> list[np.ndarray]:
        """Per node and signature s, the relaxed minimum at ``lam`` over the choices that give
        the node s: per count vertex, min-sum messages leaves to root, then root to leaves;
        the least over the vertices. The relaxation bounds each plan's cost from below, so no
        plan using s costs less: a signature whose min-marginal exceeds a known plan's cost
        is in no better plan."""
        out: list[np.ndarray] | None = None
        for part in (self.parts if lam.any() else self.parts[:1]):
            m = self._part_marginals(part, lam)
            out = m if out is None else [np.minimum(a, b) for a, b in zip(out, m)]
        assert out is not None
        return out

    def _part_marginals(self, part: _Part, lam: np.ndarray) -> list[np.ndarray]:
        """:meth:`min_marginals` of one count vertex."""
        belief = self._unary(part, lam)
        up: dict[int, np.ndarray] = {}  # each node's message to its parent
        for v, p in self.order:
            if p is not None:
                up[v] = (self._oriented(part, p, v, lam) + belief[v][None, :]).min(axis=1)
                belief[p] = belief[p] + up[v]
        full: list[np.ndarray] = list(belief)
        root: dict[int, int] = {}
        for v, p in reversed(self.order):  # parents first
            root[v] = v if p is None else root[p]
            if p is not None:  # p's min-marginal without v's subtree (inf stays inf)
                fin = np.isfinite(up[v])
                rest = np.full(len(up[v]), INF)
                rest[fin] = full[p][fin] - up[v][fin]
                full[v] = belief[v] + (self._oriented(part, p, v, lam)
                                       + rest[:, None]).min(axis=0)
        best = {r: float(full[r].min()) for r in set(root.values())}
        total = sum(best.values()) - float(lam.sum())
        return [full[v] + (total - best[root[v]]) for v in range(len(full))]

    def weighed_counts(self, choice: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """``choice`` (signatures and counts, :meth:`solve`'s) with the counts of the groups not
        enumerated that the weights at ``lam`` pick: every copy by the option of least seconds
        less weighted freed bytes where that is negative."""
        problem, n = self.problem, len(self.problem.nodes)
        base = [int(c) for c in choice[:n]]
        gi = {g: i for i, g in enumerate(self.groups)}
        norm = self.parts[0].norm
        tail: list[int] = []
        for k, (g, counts) in enumerate(zip(problem.recompute,
                                            counts_of(problem.recompute, choice, n))):
            counts = list(counts)
            if g.fixed is None and g.options and k not in self.enumerated:
                w = [o.extra_s.value(problem, base)
                     - lam[gi[g.group]] * norm(o.saved_bytes.value(problem, base))
                     for o in g.options]
                if min(w) < 0:
                    counts[int(np.argmin(w))] = g.copies
            tail.extend(counts)
        return np.array(base + tail, dtype=int)

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
                cap = self.problem.memory_capacity_bytes
                tries = [choice] if not self.problem.recompute else [  # counts for the plan
                    self.weighed_counts(choice, lam), fill_counts(self.problem, choice, cap)]
                for full in tries:
                    cost, mem = self.problem.evaluate(full)
                    if within_capacity(mem, cap) and cost < best_ub:
                        best_ub, best_choice = cost, full
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


def _stack(values: list[np.ndarray | None]) -> np.ndarray:
    """Per-option arrays stacked on a first axis, zeros for an option without a term here."""
    like = next(v for v in values if v is not None)
    return np.stack([np.zeros_like(like) if v is None else v for v in values])


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
