"""Sharding rules of the operators a mixture-of-experts layer captures (registered into
:data:`autoddl.engine.rules.RULES` when that module is imported).

The routing of a GShard / Switch layer (:mod:`autoddl.engine.moe`) is built from static-shape
operators: ``argmax`` over the experts, ``one_hot`` of the winner, ``cumsum`` over the tokens of
a group for each token's position in its expert's capacity, comparisons against the capacity,
and two ``einsum`` calls that dispatch tokens to experts and combine their outputs. Each rule
lists the one-axis signatures under which running the operator on local shards gives the shards
of the whole result (the test ``tests/test_moe.py`` checks every signature against the whole
operator):

* ``argmax(x, dim)`` / ``cumsum(x, dim)``: any dim but ``dim`` may be split (each device scans
  or compares whole rows); ``cumsum`` is linear, so partial sums pass through it (``P -> P``).
  ``argmax`` returns the first maximal index: a whole row on every device gives the same tie.
* ``one_hot(i, C)``: a split of any index dim splits the same dim of the result; the class dim
  is never split (a device would need to know which classes it owns).
* comparisons (``lt``, ``ge``, ...) and ``rsub`` (``c - x``): element-wise, splits only (a
  comparison or an affine map of a partial sum is not the partial of anything).
* ``einsum(eq, a, b, ...)``, for every index letter ``c`` of size > 1 (no ellipsis, no letter
  repeated within one operand): if ``c`` is in the output, the operands that carry it at full
  size split it and the others stay ``B``, the output is ``S(c)`` (a batch or free index); if
  ``c`` is summed, the operands carrying it split it and the output is ``P`` (each device sums
  its share of ``c``). The product is linear in each operand: one ``P`` operand with the others
  ``B`` gives ``P``. So ``einsum('gsec,gsd->egcd')`` (the dispatch) maps tokens split by group
  ``S(g)`` to ``S(1)`` of the expert input, and experts split by ``e`` read the dispatch tensor
  ``S(2)`` with the tokens whole; between the two sits the all-to-all ``S(1) -> S(0)`` of the
  expert input, which the placement algebra prices (:mod:`autoddl.engine.placements`).
"""

from __future__ import annotations

from autoddl.engine.graph import OpNode, TensorArg, TensorMeta
from autoddl.engine.placements import B, P, S
from autoddl.engine.rules import AxisSig, _broadcast_sigs, _replicated, rule

_COMPARISONS = [f"aten.{op}.{kind}" for op in ("lt", "le", "gt", "ge", "eq", "ne")
                for kind in ("Scalar", "Tensor")]


@rule(*_COMPARISONS, "aten.rsub.Scalar")
def _compare(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Element-wise comparisons and ``c - x``: splits mapped by broadcasting, no partial sums."""
    return _broadcast_sigs(node.out, ins)


def _keep_other_dims(x: TensorMeta, dim: int, keepdim: bool) -> list[AxisSig]:
    """``S(d) -> S(d')`` for every dim ``d != dim`` of size > 1 (``d'`` after dropping ``dim``
    unless ``keepdim``)."""
    return [AxisSig((S(d),), S(d if keepdim or d < dim else d - 1))
            for d in range(x.ndim) if d != dim and x.shape[d] > 1]


@rule("aten.argmax.default", "aten.argmin.default")
def _argmax(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Index of the extreme along ``dim``: other dims split; over the whole tensor
    (``dim=None``) replicated only."""
    x = ins[0]
    dim = node.arg(1, "dim", None)
    if dim is None or x.ndim == 0:
        return [_replicated(1)]
    return [_replicated(1)] + _keep_other_dims(x, int(dim) % x.ndim,
                                               bool(node.arg(2, "keepdim", False)))


@rule("aten.cumsum.default")
def _cumsum(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Running sum along ``dim``: other dims split; linear, so ``P -> P`` for float tensors."""
    x = ins[0]
    dim = int(node.arg(1, "dim", 0)) % max(x.ndim, 1)
    sigs = [_replicated(1)] + _keep_other_dims(x, dim, True)
    if x.is_float and node.out.is_float:
        sigs.append(AxisSig((P,), P))
    return sigs


@rule("aten.one_hot.default")
def _one_hot(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """``one_hot(i, C)``: the index dims split as the result's leading dims; never the class
    dim. Replicated when the class count is inferred (``-1``: data-dependent)."""
    idx = ins[0]
    if int(node.arg(1, "num_classes", -1)) < 0:
        return [_replicated(1)]
    return [_replicated(1)] + [AxisSig((S(d),), S(d)) for d in range(idx.ndim)
                               if idx.shape[d] > 1]


def einsum_terms(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """The operand and output index strings of an einsum ``equation`` over operands of
    ``ndims`` dims (implicit output: the letters used once, sorted); None when this rule does
    not handle it (ellipsis, a letter repeated within one term, ranks that do not match)."""
    eq = equation.replace(" ", "")
    if "..." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if not arrow:
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(ndims) or any(len(t) != n for t, n in zip(terms, ndims)):
        return None
    if any(len(set(t)) != len(t) for t in [*terms, out]):
        return None
    return terms, out


def einsum_sizes(terms: list[str], ins: list[TensorMeta]) -> dict[str, int]:
    """Each index letter's size (the largest over the operands: size-1 dims broadcast)."""
    sizes: dict[str, int] = {}
    for t, m in zip(terms, ins):
        for c, n in zip(t, m.shape):
            sizes[c] = max(sizes.get(c, 1), n)
    return sizes


@rule("aten.einsum.default")
def _einsum(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Split any index letter (module docstring): a free letter splits the output, a summed
    one makes partial sums; one partial-sum operand with the others whole gives a partial
    sum."""
    n = len(ins)
    operands = node.arg(1, "tensors", ())
    parsed = einsum_terms(str(node.args[0]), [m.ndim for m in ins])
    if parsed is None or [getattr(a, "index", None) for a in operands] != list(range(n)) \
            or not all(isinstance(a, TensorArg) for a in operands):
        return [_replicated(n)]  # an operand read twice is not linear in it
    terms, out = parsed
    sizes = einsum_sizes(terms, ins)
    sigs = [_replicated(n)]
    for c, size in sizes.items():
        if size <= 1:
            continue
        placed = tuple(S(t.index(c)) if c in t and m.shape[t.index(c)] == size else B
                       for t, m in zip(terms, ins))
        if c in out:
            sigs.append(AxisSig(placed, S(out.index(c))))
        else:
            sigs.append(AxisSig(placed, P))
    if node.out.is_float and all(m.is_float for m in ins):
        sigs += [AxisSig(tuple(P if j == i else B for j in range(n)), P) for i in range(n)]
    return sigs


def einsum_flops(equation: str, ins: list[TensorMeta]) -> float | None:
    """Forward FLOPs of an einsum: a multiply and an add per point of the product of every
    index letter's range (exact for one contraction of two operands); None where
    :func:`einsum_terms` does not parse the equation."""
    parsed = einsum_terms(equation, [m.ndim for m in ins])
    if parsed is None:
        return None
    total = 1.0
    for size in einsum_sizes(parsed[0], ins).values():
        total *= size
    return 2.0 * total if len(ins) > 1 else total
