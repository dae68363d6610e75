"""What found a plan and what proved its bound, in words a user of a planning tool reads.

The plan file records the solvers by name (``solver.backend``, ``solver.ilp_solvers``): a
backend (``ortools-cbc``), or a step of autoddl's own search written after the LP solver that ran
it: ``highs (LP)`` (the ILP's LP relaxation, infeasible: no plan of that candidate beats the
best found), ``highs (LP, integral)`` (the LP relaxation's solution was integral: the ILP's
optimum), ``highs (LP branch and bound)``, and :data:`SCREENING_FINDER`. The summary turns them
into sentences here; the names stay in the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoddl.engine.plan import Plan

#: what found a plan that the screening's rounding of a candidate's tree relaxation gave (a
#: plan's ``solver.backend`` where no ILP found a better one)
SCREENING_FINDER = "screening (rounded tree relaxation)"
#: the indent of the summary's lines under ``solver``
INDENT = " " * 9


def _parts(name: str) -> tuple[str, str]:
    """(solver, step of autoddl's search or "") of a recorded name: ``highs (LP)`` ->
    (``highs``, ``LP``)."""
    solver, _, step = name.partition(" (")
    return solver, step.removesuffix(")")


#: per step of autoddl's search (the parenthesised part of a recorded name; "" for a plain
#: backend): what it says as the plan's finder, and as the solver of ``count`` ILPs
_WORDS = {
    "LP, integral": ("{solver}, solving the ILP as a plain linear program (its answer came out "
                     "in whole numbers, so it is the ILP's optimum)",
                     "{count} solved by {solver} as {lp}, answers whole"),
    "LP branch and bound": ("autoddl's branch and bound (its linear programs solved by "
                            "{solver})", "{count} by autoddl's branch and bound ({solver})"),
    "LP": ("{solver}, solving the ILP as a plain linear program",
           "{count} ruled out by {solver} as {lp}: no better plan even with "
           "fractions allowed"),
    "": ("the ILP solver {name}", "{count} by the ILP solver {name}"),
}


def finder_words(name: str) -> str:
    """What found the plan, in words, from its recorded solver name."""
    if name == SCREENING_FINDER:
        return ("the screening pass (each candidate mesh's quick lower bound comes with a plan; "
                "no ILP found a better one)")
    solver, step = _parts(name)
    return _WORDS.get(step, _WORDS[""])[0].format(solver=solver, name=name)


def proof_words(name: str, count: int) -> str:
    """``count`` ILPs closed by the recorded solver ``name``, in words."""
    solver, step = _parts(name)
    lp = "a plain linear program" if count == 1 else "plain linear programs"
    return _WORDS.get(step, _WORDS[""])[1].format(solver=solver, name=name, count=count, lp=lp)


def provenance_lines(solver: dict) -> list[str]:
    """What found the plan and what proved its bound, in words: the ILPs solved, by solver, and
    the candidates the screening's lower bounds ruled out without an ILP (none for a plan file
    written before autoddl recorded them)."""
    if "ilps_solved" not in solver:
        return []
    proof = []
    if solver["ilps_solved"]:
        n = solver["ilps_solved"]
        by = "; ".join(proof_words(name, k) for name, k in
                       (solver.get("ilp_solvers") or {}).items())
        proof.append(f"{n} ILP{'s' if n > 1 else ''}, one per candidate mesh ({by})")
    if solver.get("candidates_bounded"):
        n = solver["candidates_bounded"]
        proof.append(f"the screening's lower bounds, which ruled out {n} candidate "
                     f"mesh{'es' if n > 1 else ''} without an ILP")
    return [*_wrapped(f"plan found by {finder_words(solver['backend'])}"),
            *_wrapped(f"bound proven by {' and '.join(proof) or 'the plan alone'}")]


def _wrapped(text: str) -> list[str]:
    """``text`` as summary lines under ``solver``, wrapped at 100 columns."""
    import textwrap

    return textwrap.wrap(text, width=100, initial_indent=INDENT, subsequent_indent=INDENT + "  ",
                         break_on_hyphens=False)


def finder_text(solver: dict) -> str:
    """The solver's name before its status, for a plan file older than
    :func:`provenance_lines` (which says what ran), else nothing."""
    return "" if "ilps_solved" in solver else f"{solver['backend']}: "


def repeat_line(plan: Plan) -> list[str]:
    """The scope of a plan's proof where layers solved once stand for several (none otherwise):
    unpipelined, the middle layers share one strategy; a pipelined program, the middle stages
    share one and the middle layers of each stage another."""
    rep = plan.model.get("repeat")
    if not rep or rep["layers"] < 3:
        return []
    if not plan.pipeline:
        return [f"{INDENT}(optimal among plans whose {rep['layers'] - 2} middle layers of "
                f"`{rep['container']}` share one strategy)"]
    if "layers_per_stage" not in plan.pipeline:  # staged operator by operator: nothing shared
        return []
    k, v = plan.num_stages, plan.interleave
    rank = "pipeline rank" if v > 1 else "stage"
    per = rep["layers"] // k
    parts = ([f"{rank}s 1–{k - 2} share one strategy"] if k >= 4 else []) + (
        [f"the {per - 2} middle layers of `{rep['container']}` on each {rank} share one"]
        if per >= 3 else [])
    return [f"{INDENT}(optimal among plans in which {' and '.join(parts)})"] if parts else []


def proof_lines(plan: Plan) -> list[str]:
    """What limits the plan's proof beyond the gap, and which solver stood in for a crashed one
    (none usually)."""
    s, out = plan.solver, []
    if s.get("proof_capacity_bytes") is not None:
        out.append(f"{INDENT}(the bound covers plans using at most "
                   f"{int(s['proof_capacity_bytes']):,} B per device: the solver's tolerance let "
                   "a plan over the cap through, so the memory rows were tightened)")
    if s.get("fallback"):
        out.append(f"{INDENT}({s['fallback']})")
    return out
