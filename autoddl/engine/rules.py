"""Sharding rules: the legal SBP signatures of each ATen operator.

A rule looks at one node (its tensor inputs' and output's shapes, its arguments) and lists the
legal *one-axis* signatures: a placement for each tensor input and the output that make running
the operator on local shards correct. Signatures on an n-axis mesh combine them, one per axis,
and choose the order of nested splits: :mod:`autoddl.engine.mesh_signatures`.

Example, ``Y = X @ W`` on one axis: ``(S(0), B) -> S(0)`` data parallel, ``(B, S(1)) -> S(1)``
column parallel, ``(S(1), S(0)) -> P`` row parallel, ``(P, B) -> P`` and ``(B, P) -> P`` since the
product is linear in each factor, ``(B, B) -> B`` replicated.

Four local-execution flags keep local execution exact (the runtime applies them):
``masked`` inputs are additive ``B`` terms of a ``P`` output (a bias after a row-parallel matmul):
only coordinate 0 of the axis adds them. ``scale`` divides a mean over a split dim by the axis
size, turning each device's local mean into its addend of the global mean. ``vocab`` marks an
embedding whose table is split by rows: each device looks up the indices it owns, zeros elsewhere.
``vocab_parallel`` marks a cross-entropy loss whose logits are split by vocabulary (Megatron-LM's
vocabulary-parallel loss): the devices of the axis combine their row maxima, target logits and
sums of exponentials with three all-reduces and each gets the whole loss; the backward is local.
Those all-reduces are the operator's own collectives (:func:`vocab_parallel_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from autoddl.engine.graph import OpNode, TensorArg, TensorMeta
from autoddl.engine.placements import B, P, S, Placement, Step, collective_cost, local_shape


@dataclass(frozen=True)
class AxisSig:
    """A one-axis signature: input placements, output placement, local-execution flags."""

    ins: tuple[str, ...]
    out: str
    masked: frozenset[int] = frozenset()
    scale: bool = False
    vocab: bool = False
    vocab_parallel: bool = False


#: ZeRO levels of a parameter's signature (:attr:`Signature.zero`)
ZERO_NONE, ZERO_STATES, ZERO_GRADS, ZERO_REGATHER = 0, 1, 2, 3


@dataclass(frozen=True)
class Signature:
    """An n-axis signature; ``grads[i]`` is input i's gradient placement (None: no gradient).

    ``zero`` (parameters only) says how a ZeRO-style data-parallel optimizer keeps it:
    ``ZERO_STATES`` (1) and ``ZERO_GRADS`` (2): the weight as ``out`` places it, its optimizer
    states (and, at 2, its gradient) divided over the axes where it is ``B`` (ZeRO-1, ZeRO-2);
    ``ZERO_REGATHER`` (3): the weight stored as ``out`` places it (split), gathered for each
    consumer in forward, freed, and gathered again in backward (ZeRO-3/FSDP) instead of keeping
    the gathered copy for backward.
    """

    ins: tuple[Placement, ...]
    out: Placement
    grads: tuple[Placement | None, ...]
    axes: tuple[AxisSig, ...] = field(compare=False)
    zero: int = ZERO_NONE


Rule = Callable[[OpNode, list[TensorMeta]], list[AxisSig]]
RULES: dict[str, Rule] = {}


def rule(*targets: str) -> Callable[[Rule], Rule]:
    """Register a rule for the given ATen targets (``aten.name.overload``)."""
    def register(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn
    return register


def _replicated(n_in: int) -> AxisSig:
    return AxisSig((B,) * n_in, B)


def _tensor_positions(node: OpNode) -> list[int | None]:
    """For each positional argument, the tensor-input index it holds (or None)."""
    return [a.index if isinstance(a, TensorArg) else None for a in node.args]


# --------------------------------------------------------------------------- element-wise
_ADDITIVE = {"aten.add.Tensor", "aten.sub.Tensor"}
_MULTIPLICATIVE = {"aten.mul.Tensor", "aten.div.Tensor"}
_LINEAR_UNARY = {
    "aten.neg.default", "aten.clone.default", "aten.contiguous.default", "aten.alias.default",
    "aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.mul.Scalar",
    "aten.div.Scalar",
}
_NONLINEAR_UNARY = {
    "aten.gelu.default", "aten.relu.default", "aten.silu.default", "aten.tanh.default",
    "aten.sigmoid.default", "aten.exp.default", "aten.rsqrt.default", "aten.sqrt.default",
    "aten.pow.Tensor_Scalar", "aten.abs.default", "aten.log.default",
}


def _broadcast_sigs(out: TensorMeta, ins: list[TensorMeta]) -> list[AxisSig]:
    """Replicated, plus a split of each output dim mapped onto the inputs by broadcasting."""
    sigs = [_replicated(len(ins))]
    r = out.ndim
    for d in range(r):
        if out.shape[d] <= 1:
            continue
        placed = []
        for t in ins:
            dj = d - (r - t.ndim)
            placed.append(S(dj) if dj >= 0 and t.shape[dj] == out.shape[d] else B)
        sigs.append(AxisSig(tuple(placed), S(d)))
    return sigs


@rule(*_ADDITIVE, *_MULTIPLICATIVE, *_LINEAR_UNARY, *_NONLINEAR_UNARY,
      "aten.where.self", "aten.masked_fill.Scalar")
def _elementwise(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    sigs = _broadcast_sigs(node.out, ins)
    n = len(ins)
    has_scalar_operand = len([a for a in node.args if not isinstance(a, TensorArg)]) > 0
    if sum(isinstance(a, TensorArg) for a in node.args) > n:
        return sigs  # one tensor in two operands (x * x): not linear in it
    if node.target in _LINEAR_UNARY and n == 1:
        if node.out.is_float and ins[0].is_float:  # a cast to integers is not linear
            sigs.append(AxisSig((P,), P))
    elif node.target in _ADDITIVE and n == 2 and not has_scalar_operand:
        sigs += [AxisSig((P, P), P), AxisSig((P, B), P, frozenset({1})),
                 AxisSig((B, P), P, frozenset({0}))]
    elif node.target in _MULTIPLICATIVE:
        if n == 1:
            sigs.append(AxisSig((P,), P))  # tensor times a scalar
        elif n == 2:
            sigs.append(AxisSig((P, B), P))
            if node.target == "aten.mul.Tensor":
                sigs.append(AxisSig((B, P), P))
    return sigs


# --------------------------------------------------------------------------- views
def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source dims with runs of destination dims of equal element count."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(src):
            gi.append(i); pi *= src[i]; i += 1  # noqa: E702
        if j < len(dst):
            gj.append(j); pj *= dst[j]; j += 1  # noqa: E702
        while pi != pj:
            if pi < pj and i < len(src):
                gi.append(i); pi *= src[i]; i += 1  # noqa: E702
            elif j < len(dst):
                gj.append(j); pj *= dst[j]; j += 1  # noqa: E702
            else:
                raise AssertionError(f"view {src} -> {dst}: element counts differ")
        groups.append((gi, gj))
    return groups


@rule("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
      "aten.unsqueeze.default", "aten.squeeze.dim", "aten.flatten.using_ints",
      "aten.unflatten.int")
def _view(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    src, dst = ins[0].shape, node.out.shape
    sigs = [_replicated(1), AxisSig((P,), P)]
    for gi, gj in view_groups(src, dst):
        a = next((d for d in gi if src[d] > 1), None)
        b = next((d for d in gj if dst[d] > 1), None)
        if a is not None and b is not None:
            sigs.append(AxisSig((S(a),), S(b)))
    return sigs


@rule("aten.select.int")
def _select(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """x[..., i, ...] along one dim: any other dim may stay split (the selected one may not:
    each device would need to own index i)."""
    dim = int(node.args[1]) % ins[0].ndim
    sigs = [_replicated(1), AxisSig((P,), P)]
    for d in range(ins[0].ndim):
        if d != dim and ins[0].shape[d] > 1:
            sigs.append(AxisSig((S(d),), S(d if d < dim else d - 1)))
    return sigs


@rule("aten.expand.default")
def _expand(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    sigs = [_replicated(1), AxisSig((P,), P)]
    out, r = node.out, node.out.ndim
    for d in range(r):
        dj = d - (r - ins[0].ndim)
        if out.shape[d] <= 1:
            continue
        same = dj >= 0 and ins[0].shape[dj] == out.shape[d]
        sigs.append(AxisSig((S(dj) if same else B,), S(d)))
    return sigs


def _permutation(node: OpNode, ndim: int) -> list[int]:
    """out dim d reads input dim perm[d]."""
    perm = list(range(ndim))
    if node.target == "aten.t.default":
        perm.reverse()
    elif node.target == "aten.transpose.int":
        d0, d1 = (int(x) % ndim for x in node.args[1:3])
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = [int(x) % ndim for x in node.args[1]]
    return perm


@rule("aten.t.default", "aten.transpose.int", "aten.permute.default")
def _permute(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    perm = _permutation(node, ins[0].ndim)
    sigs = [_replicated(1), AxisSig((P,), P)]
    sigs += [AxisSig((S(perm[d]),), S(d)) for d in range(node.out.ndim) if node.out.shape[d] > 1]
    return sigs


# --------------------------------------------------------------------------- contractions
def _matmul_sigs(a: TensorMeta, b: TensorMeta, out: TensorMeta, b_transposed: bool) -> list:
    """(A, B) pairs for out = A @ B (or A @ B^T); batch dims of A/B aligned with out's."""
    r = out.ndim
    sigs = [((B, B), B), ((P, B), P), ((B, P), P)]
    for d in range(r - 1 if b.ndim > 1 else r):  # batch and row dims of out
        da = d - (r - a.ndim)
        db = d - (r - b.ndim) if (d < r - 2 and b.ndim > 2) else -1
        if out.shape[d] <= 1 or da < 0:
            continue
        pb = S(db) if db >= 0 and b.shape[db] == out.shape[d] else B
        sigs.append(((S(da), pb), S(d)))
    k_a = a.ndim - 1
    if b.ndim == 1:
        return sigs + [((S(k_a), S(0)), P)]
    if b_transposed:  # B is (n, k)
        n_b, k_b = b.ndim - 2, b.ndim - 1
    else:  # B is (..., k, n)
        k_b, n_b = b.ndim - 2, b.ndim - 1
    sigs.append(((B, S(n_b)), S(r - 1)))  # column parallel
    sigs.append(((S(k_a), S(k_b)), P))  # row parallel: contraction split
    return sigs


@rule("aten.linear.default")
def _linear(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    sigs = []
    for (pa, pw), po in _matmul_sigs(ins[0], ins[1], node.out, b_transposed=True):
        if len(ins) == 2:
            sigs.append(AxisSig((pa, pw), po))
        elif po == P:  # the bias is added once: on coordinate 0 only
            sigs.append(AxisSig((pa, pw, B), po, frozenset({2})))
        else:
            pb = S(0) if po == S(node.out.ndim - 1) else B
            sigs.append(AxisSig((pa, pw, pb), po))
    return sigs


@rule("aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def _mm(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    return [AxisSig(p, o) for p, o in _matmul_sigs(ins[0], ins[1], node.out, False)]


@rule("aten.addmm.default")
def _addmm(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    bias = ins[0]
    sigs = []
    for (pa, pb), po in _matmul_sigs(ins[1], ins[2], node.out, False):
        if po == P:
            sigs.append(AxisSig((B, pa, pb), P, frozenset({0})))
            continue
        d = None if po == B else int(po[2:-1])
        dj = None if d is None else d - (node.out.ndim - bias.ndim)
        ok = dj is not None and dj >= 0 and bias.shape[dj] == node.out.shape[d]
        sigs.append(AxisSig((S(dj) if ok else B, pa, pb), po))
    return sigs


@rule("aten.scaled_dot_product_attention.default")
def _sdpa(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    q, k = ins[0], ins[1]
    n = len(ins)
    sigs = [_replicated(n)]
    for d in (0, 1):  # batch, heads
        if d == 1 and q.shape[1] != k.shape[1]:
            continue  # grouped-query attention: heads do not align
        extra = []
        for m in ins[3:]:  # an attention mask broadcasts onto (b, h, sq, sk)
            dm = d - (4 - m.ndim)
            extra.append(S(dm) if dm >= 0 and m.shape[dm] == q.shape[d] else B)
        sigs.append(AxisSig((S(d), S(d), S(d), *extra), S(d)))
    return sigs


@rule("aten.embedding.default")
def _embedding(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    weight, idx = ins
    sigs = [_replicated(2)]
    sigs += [AxisSig((B, S(d)), S(d)) for d in range(idx.ndim) if idx.shape[d] > 1]
    sigs.append(AxisSig((S(1), B), S(node.out.ndim - 1)))
    sigs.append(AxisSig((S(0), B), P, vocab=True))
    return sigs


@rule("aten.conv2d.default")
def _conv2d(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Convolution, linear in input and weight: batch split, output channels split (column
    parallel: weight and bias by output channel), input channels split (the contraction: partial
    sums, the bias added once), and partial sums through. Spatial splits would need halos."""
    x, w = ins[0], ins[1]
    bias = len(ins) > 2
    groups = node.arg(6, "groups", 1)
    if groups != 1 or x.ndim != 4:
        return [_replicated(len(ins))]
    b_, masked = ((B,), frozenset({2})) if bias else ((), frozenset())
    sigs = [_replicated(len(ins)), AxisSig((P, B, *b_), P, masked), AxisSig((B, P, *b_), P, masked)]
    if x.shape[0] > 1:
        sigs.append(AxisSig((S(0), B, *b_), S(0)))
    if w.shape[0] > 1:
        sigs.append(AxisSig((B, S(0), *((S(0),) if bias else ())), S(1)))
    if w.shape[1] > 1:
        sigs.append(AxisSig((S(1), S(1), *b_), P, masked))
    return sigs


@rule("aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default")
def _pool2d(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Pooling acts on each (sample, channel) plane: batch or channels split; averaging is
    linear, so partial sums pass through it."""
    x = ins[0]
    sigs = [_replicated(1)] + [AxisSig((S(d),), S(d)) for d in range(min(2, x.ndim - 2))
                               if x.shape[d] > 1]
    if "avg" in node.target:
        sigs.append(AxisSig((P,), P))
    return sigs


@rule("aten.batch_norm.default")
def _batch_norm(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Batch normalization: statistics per channel over (batch, space), so only channels split
    (the input by dim 1, weight, bias and running statistics by dim 0). A batch split would need
    synchronized statistics, which the runtime does not do."""
    x = ins[0]
    sigs = [_replicated(len(ins))]
    if x.ndim >= 2 and x.shape[1] > 1:
        sigs.append(AxisSig((S(1), *(S(0),) * (len(ins) - 1)), S(1)))
    return sigs


@rule("aten.slice.Tensor")
def _slice(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """x[a:b] along one dim: the other dims may stay split, the sliced one only when the slice
    takes all of it (each device would need to own exactly [a, b))."""
    x = ins[0]
    dim = int(node.arg(1, "dim", 0)) % x.ndim
    whole = node.out.shape[dim] == x.shape[dim] and node.arg(4, "step", 1) == 1
    sigs = [_replicated(1), AxisSig((P,), P)]
    sigs += [AxisSig((S(d),), S(d)) for d in range(x.ndim)
             if x.shape[d] > 1 and (d != dim or whole)]
    return sigs


@rule("aten.cat.default")
def _cat(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Concatenation along one dim: every input split alike along another dim, or all partial
    sums (concatenation is linear)."""
    dim = int(node.arg(1, "dim", 0)) % node.out.ndim
    n = len(ins)
    sigs = [_replicated(n), AxisSig((P,) * n, P)]
    for d in range(node.out.ndim):
        if d != dim and node.out.shape[d] > 1 and all(t.ndim == node.out.ndim
                                                      and t.shape[d] == node.out.shape[d]
                                                      for t in ins):
            sigs.append(AxisSig((S(d),) * n, S(d)))
    return sigs


@rule("aten.dropout.default")
def _dropout(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    """Dropout masks each element independently: any split, but not partial sums (the addends
    would need one mask). Every rank draws from the same seed, so with p > 0 the shards of a
    split tensor get the same mask pattern: a sharded run is not the one-process run."""
    return _broadcast_sigs(node.out, ins)


# --------------------------------------------------------------------------- normalizations
@rule("aten.layer_norm.default", "aten.rms_norm.default")
def _layer_norm(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    x = ins[0]
    normalized = len(node.args[1])
    others = (B,) * (len(ins) - 1)
    sigs = [_replicated(len(ins))]
    sigs += [AxisSig((S(d), *others), S(d)) for d in range(x.ndim - normalized) if x.shape[d] > 1]
    return sigs


@rule("aten._softmax.default", "aten.softmax.int", "aten._log_softmax.default",
      "aten.log_softmax.int")
def _softmax(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    x = ins[0]
    dim = int(node.args[1]) % x.ndim
    sigs = [_replicated(1)]
    sigs += [AxisSig((S(d),), S(d)) for d in range(x.ndim) if d != dim and x.shape[d] > 1]
    return sigs


# --------------------------------------------------------------------------- reductions, losses
def _reduction_sigs(x: TensorMeta, dims: set[int], keepdim: bool, mean: bool) -> list[AxisSig]:
    sigs = [_replicated(1), AxisSig((P,), P)]
    kept = [d for d in range(x.ndim) if d not in dims]
    for d in range(x.ndim):
        if x.shape[d] <= 1:
            continue
        if d in dims:
            sigs.append(AxisSig((S(d),), P, scale=mean))
        else:
            sigs.append(AxisSig((S(d),), S(d if keepdim else kept.index(d))))
    return sigs


@rule("aten.sum.dim_IntList", "aten.mean.dim", "aten.sum.default", "aten.mean.default")
def _reduce(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    x = ins[0]
    dims_arg = node.arg(1, "dim") if node.target.endswith(("dim_IntList", ".dim")) else None
    if dims_arg is None or dims_arg == ():
        dims = set(range(x.ndim))
    else:
        dims_arg = dims_arg if isinstance(dims_arg, (list, tuple)) else (dims_arg,)
        dims = {int(d) % x.ndim for d in dims_arg}
    keepdim = bool(node.arg(2, "keepdim", False))
    return _reduction_sigs(x, dims, keepdim, node.target.startswith("aten.mean"))


_MEAN = 1  # torch's Reduction enum: 0 none, 1 mean, 2 sum


@rule("aten.cross_entropy_loss.default", "aten.nll_loss.default")
def _cross_entropy(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    logits = ins[0]
    reduction = node.arg(3, "reduction", _MEAN)
    if reduction not in (1, 2) or (len(ins) > 2):
        return [_replicated(len(ins))]
    sigs = [_replicated(2)]
    for d in range(logits.ndim):
        if d == 1 or logits.shape[d] <= 1 or logits.ndim == 1:
            continue
        dt = d if d == 0 else d - 1
        sigs.append(AxisSig((S(d), S(dt)), P, scale=reduction == _MEAN))
    if vocab_parallel_ok(node, ins):
        sigs.append(AxisSig((S(1), B), B, vocab_parallel=True))
    return sigs


#: all-reduces of one fp32 value per row the vocabulary-parallel loss runs per forward (row
#: maximum, target logit, sum of exponentials), and the bytes of one such value
VOCAB_PARALLEL_ALL_REDUCES = 3
VOCAB_PARALLEL_VALUE_BYTES = 4


def vocab_parallel_ok(node: OpNode, ins: list[TensorMeta]) -> bool:
    """Whether a loss node may read its logits split by vocabulary: ``cross_entropy_loss`` of
    2-D logits (rows, vocabulary) and 1-D targets, mean or sum, no class weights, the default
    ignore_index (-100) and no label smoothing."""
    if node.target != "aten.cross_entropy_loss.default" or len(ins) != 2:
        return False
    logits, target = ins
    return (logits.ndim == 2 and target.ndim == 1 and logits.shape[1] > 1
            and node.arg(3, "reduction", _MEAN) in (1, 2)
            and node.arg(4, "ignore_index", -100) == -100
            and float(node.arg(5, "label_smoothing", 0.0)) == 0.0)


def vocab_parallel_steps(node: OpNode, logits: TensorMeta, sig: Signature,
                         mesh_shape: Sequence[int]) -> list[Step]:
    """The collectives a signature of ``node`` runs inside the operator, forward (none in
    backward): for a vocabulary-parallel loss, three all-reduces of one fp32 value per local row
    of ``logits`` on its vocabulary axis; for any other signature none."""
    steps: list[Step] = []
    for axis, asig in enumerate(sig.axes):
        p = mesh_shape[axis]
        if not asig.vocab_parallel or p <= 1:
            continue
        rows = local_shape(logits.shape, sig.ins[0], mesh_shape)[0]
        sent, lat = collective_cost("all_reduce", p, rows * VOCAB_PARALLEL_VALUE_BYTES)
        steps += [Step(axis, P, B, "all_reduce", sent, lat)] * VOCAB_PARALLEL_ALL_REDUCES
    return steps


@rule("aten.mse_loss.default")
def _mse(node: OpNode, ins: list[TensorMeta]) -> list[AxisSig]:
    reduction = node.arg(2, "reduction", _MEAN)
    if reduction not in (1, 2) or ins[0].shape != ins[1].shape:
        return [_replicated(2)]
    sigs = [_replicated(2)]
    sigs += [AxisSig((S(d), S(d)), P, scale=reduction == _MEAN)
             for d in range(ins[0].ndim) if ins[0].shape[d] > 1]
    return sigs


# the rules of the mixture-of-experts operators (one_hot, argmax, cumsum, einsum, comparisons)
from autoddl.engine import rules_moe  # noqa: E402,F401  (registers them into RULES)
