r"""Solving a step-time problem exactly without paying for its overlap term in every LP.

The step's objective (:class:`~autoddl.formulations.sharding.StepShape`) is a sum over choices
except for the exposed communication :math:`X = \max(0, \max_g \eta_g H_g - \omega_g W_g)`:
weight traffic hidden behind backward compute. That one row couples every weight with every
op, and the LP relaxation of the full model mixes fractional plans that hide traffic behind
compute no integral plan has: branch and bound then takes 100× longer than on a sum. Two
sum-form problems bound it from below instead:

* **without overlap** (:func:`without_overlap`): :math:`X` dropped. :math:`X \ge 0`, so its
  optimum bounds every plan's step from below; its plan's true step bounds it from above;
* **charged** (:func:`charged`): :math:`X` replaced by :math:`\lambda(\eta_g H_g - \omega_g
  W_g)` for one group and :math:`0 \le \lambda \le 1`. :math:`X` is at least that, so this is a
  lower bound too (the Lagrangian bound of the overlap row), and a sum of non-negative terms
  (an op's window never exceeds its own critical cost). Its value is concave in
  :math:`\lambda`, with slope :math:`\eta H - \omega W` of its plan: :func:`solve_overlap`
  bisects on that sign (:data:`LAMBDA_STEPS` steps, each a fast sum-form solve).

The best lower bound and the best plan's true step close the gap in the usual cases. Only where
they do not is the full model solved, with the best plan's step as its cutoff. Every answer
carries a valid lower bound: exactness is kept.

This module imports no torch and no solver.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from autoddl.formulations.milp import SolveResult, SolveStatus, relative_gap
from autoddl.formulations.sharding import (
    EdgeChoices, NodeChoices, ShardingModel, ShardingProblem,
)

#: solves one problem under a cutoff: (the model built, its result)
Solver = Callable[[ShardingProblem, float], tuple[ShardingModel, SolveResult]]


def has_overlap(problem: ShardingProblem) -> bool:
    """Whether any choice carries hidden communication (an overlap term)."""
    return (any(n.hidden_s is not None and n.hidden_s.any() for n in problem.nodes)
            or any(e.hidden_s is not None and e.hidden_s.any() for e in problem.edges))


def without_overlap(problem: ShardingProblem) -> ShardingProblem:
    """``problem`` with its hidden communication and windows dropped (a lower bound)."""
    nodes = tuple(dataclasses.replace(n, hidden_s=None, window_s=None) for n in problem.nodes)
    edges = tuple(dataclasses.replace(e, hidden_s=None) for e in problem.edges)
    return dataclasses.replace(problem, nodes=nodes, edges=edges)


def hidden_groups(problem: ShardingProblem) -> list[int]:
    """The groups holding hidden communication."""
    groups = {n.group for n in problem.nodes if n.hidden_s is not None and n.hidden_s.any()}
    groups |= {e.group for e in problem.edges if e.hidden_s is not None and e.hidden_s.any()}
    return sorted(groups)


def charged(problem: ShardingProblem, group: int, lam: float) -> ShardingProblem:
    """``problem`` with the overlap term replaced by ``lam·(η·hidden − ω·window)`` of one
    group (``0 <= lam <= 1``: a lower bound, since X is at least that); each op's own window
    never exceeds its critical cost, so the terms stay non-negative."""
    shape = problem.shape
    eta, omega = lam * shape.eta(group), lam * shape.omega(group)
    nodes = tuple(NodeChoices(n.name, np.maximum(n.cost_s + eta * n.hidden()
                                                 - omega * n.window(), 0.0)
                              if n.group == group else n.cost_s, n.memory_bytes, n.group)
                  for n in problem.nodes)
    edges = tuple(EdgeChoices(e.src, e.dst, e.src_key, e.dst_key,
                              e.cost_s + (eta * e.hidden() if e.group == group else 0.0),
                              e.memory_bytes, e.group) for e in problem.edges)
    return dataclasses.replace(problem, nodes=nodes, edges=edges)


def _exposure(problem: ShardingProblem, choice: np.ndarray) -> dict[int, float]:
    """Per group, η·hidden − ω·window of a plan."""
    hid: dict[int, float] = {}
    for n, c in zip(problem.nodes, choice):
        hid[n.group] = hid.get(n.group, 0.0) + problem.shape.eta(n.group) * float(
            n.hidden()[c]) - problem.shape.omega(n.group) * float(n.window()[c])
    for e in problem.edges:
        a, b = e.src_key[choice[e.src]], e.dst_key[choice[e.dst]]
        hid[e.group] = hid.get(e.group, 0.0) + problem.shape.eta(e.group) * float(
            e.hidden()[a, b])
    return hid


#: bisection steps on the multiplier of the overlap term
LAMBDA_STEPS = 8


def solve_overlap(problem: ShardingProblem, solve: Solver, cutoff: float,
                  mip_rel_gap: float) -> tuple[ShardingModel, SolveResult]:
    """The optimum of ``problem`` (module docstring): Lagrangian bounds from sum-form
    problems, the full model only where they leave a gap. The result's objective is the true
    step of its plan and its bound a lower bound on every plan's."""
    groups = hidden_groups(problem)
    if not groups:
        return solve(problem, cutoff)
    best: tuple[ShardingModel, SolveResult, float] | None = None
    bound, time_s = 0.0, 0.0
    lo, hi, lam, group = 0.0, 1.0, 0.0, groups[0]
    for _ in range(LAMBDA_STEPS + 1):
        model, r = solve(without_overlap(charged(problem, group, lam)), cutoff)
        time_s += r.time_s
        if not r.has_solution:
            if r.status == SolveStatus.INFEASIBLE and best is None:  # none below the cutoff
                return model, dataclasses.replace(r, time_s=time_s)
            break
        bound = max(bound, r.bound if r.bound is not None else 0.0)
        choice = model.choice(r.x)
        true = problem.evaluate(choice)[0]
        if best is None or true < best[2]:
            best = (model, r, true)
        if best[2] <= bound * (1 + mip_rel_gap) + 1e-15:
            break
        exposure = _exposure(problem, choice)
        if lam == 0.0:  # charge the group that exposes most in the uncharged plan
            group = max(groups, key=lambda g: exposure.get(g, 0.0))
        lo, hi = (lam, hi) if exposure.get(group, 0.0) > 0 else (lo, lam)
        lam = 1.0 if lam == 0.0 and hi == 1.0 and lo == 0.0 else (lo + hi) / 2
    if best is not None and best[2] <= bound * (1 + mip_rel_gap) + 1e-15:
        model, r, true = best
        return model, _answer(r, true, bound, time_s, SolveStatus.OPTIMAL)
    incumbent = min(cutoff, best[2] * (1 + 1e-9)) if best is not None else cutoff
    model, r = solve(problem, incumbent)
    time_s += r.time_s
    if r.has_solution and (best is None or r.objective < best[2]):
        return model, dataclasses.replace(r, bound=max(bound, r.bound or 0.0), time_s=time_s)
    if best is not None and r.status in (SolveStatus.INFEASIBLE, SolveStatus.OPTIMAL):
        model, r0, true = best  # nothing beats the incumbent
        return model, _answer(r0, true, true, time_s, SolveStatus.OPTIMAL)
    if best is not None:  # the full model stopped early: keep the incumbent and the bound
        model, r0, true = best
        return model, _answer(r0, true, max(bound, r.bound or 0.0), time_s,
                              SolveStatus.FEASIBLE)
    return model, dataclasses.replace(r, time_s=time_s)


def _answer(r: SolveResult, objective: float, bound: float, time_s: float,
            status: SolveStatus) -> SolveResult:
    bound = min(bound, objective)
    return dataclasses.replace(r, status=status, objective=objective, bound=bound,
                               gap=relative_gap(objective, bound), time_s=time_s)
