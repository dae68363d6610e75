"""SBP placements and the collectives that convert between them.

A placement of one tensor on one mesh axis is a string: ``"B"`` (broadcast: every device of the
axis holds the whole tensor), ``"P"`` (partial sum: each holds an addend) or ``"S(d)"`` (split
along tensor dim ``d``). On an n-axis mesh a tensor's placement is a tuple with one entry per axis.

Nested sharding. A tensor dim may be split on several axes (DTensor's ``[Shard(0), Shard(0)]``):
it is cut into the product of their sizes, nested in an *order* of those axes, outer to inner.
Under ``(S(0), S(0))`` on a p0 × p1 mesh with axis 0 outer, device (i, j) holds chunk
``i·p1 + j`` of p0·p1 chunks of dim 0: axis 0 splits the whole dim, axis 1 splits axis 0's
piece. With axis 1 outer it holds chunk ``j·p0 + i``. The default order is left to right (the
lower-indexed axis outer, DTensor's default); another order is written with a mark on the
split: ``"S(d)^k"`` says that k of the higher-indexed axes splitting d are outside this one
(``k = 0``, plain ``"S(d)"``). So ``(S(0)^1, S(0))`` is axis 1 outer, axis 0 inner. The marks of
one dim are its order's inversion table (:func:`split_orders` decodes, :func:`with_orders`
encodes): every order has exactly one, the default order has none, and a step that adds or
removes the innermost split of a dim changes the mark of no other axis. DTensor writes the
same order with ``_StridedShard(d, split_factor)``, the split factor being the product of the
sizes of those k axes (:func:`strided_factor`). A placement is valid when each split dim is
divisible by the product of the sizes of the axes splitting it and each mark is at most the
number of higher axes splitting its dim (:func:`is_valid`).

Conversion on one axis of size p, for T the bytes each device of that axis's group holds of the
tensor before the step (ring algorithms; bytes *sent per device*):

    ========  ==============  ============================  =================
    from→to   collective      bytes sent per device          latency (α) steps
    ========  ==============  ============================  =================
    same      none            0                             0
    B→S       local slice     0                             0
    S(i)→S(j) all-to-all      (p−1)/p · T                   p
    S→B       all-gather      (p−1) · T   (= (p−1)/p · T_full)   p
    P→S       reduce-scatter  (p−1)/p · T                   p
    P→B       all-reduce      2(p−1)/p · T                  2(p−1) + 1
    x→P       forbidden: partial sums come only from operators (a masked B operand of a
              signature, e.g. a bias added on coordinate 0, is the op's own business)
    ========  ==============  ============================  =================

A multi-axis conversion is done one axis at a time. A one-axis step is *clean* when it acts on
the innermost split of its dims: an all-gather (or the source side of an all-to-all) of dim a on
axis m needs m to be the innermost axis splitting a (the devices of m's group then hold the p
consecutive sub-chunks of one outer piece, which it concatenates); a split of dim b on axis m
(slice, reduce-scatter, the target side of an all-to-all) makes m the innermost split of b, so
it needs the axes splitting b to be exactly those ``dst`` puts outside m, in ``dst``'s order
(splits are added outer to inner and no inner split is gathered twice). Then every clean step
is the one collective of the table applied to the local piece, whatever the order: the
runtime runs each as one DTensor redistribute (or its own all-to-all), which runs the clean
step as that collective.

Order (:func:`reshard_steps`): without nesting in ``src`` or ``dst``, in ``STEP_ORDER``: the
free slices (B→S) first, then the steps that shrink the local tensor (P→S, S→S'), then
all-reduces (P→B), then all-gathers (S→B), which grow what later steps would move; steps of
one kind in order of axis size, then index — except that no step may split a dim another axis
still splits (no nesting in between): a dim that moves from one axis to another is first given
up, then split. With nesting on either side, the clean ready step first in that order runs;
when none is clean, the innermost split of the dim of the highest axis blocking the first
pending step is gathered to B first (and re-split later if ``dst`` splits it); an axis that
splits the same dim in ``src`` and ``dst`` but at another place in the order is gathered and
split again. So, T the bytes a device holds:

    =============================  ================================  =======================
    src → dst                      steps                             bytes sent per device
    =============================  ================================  =======================
    (S(0), S(0)) → (S(0), B)       all-gather 1                      (p1−1)·T
    (S(0), S(0)) → (B, S(0))       all-gather 1, all-gather 0,       (p1−1)·T + (p0−1)·p1·T
                                   slice 1 (what DTensor runs too)
    (S(0)^1, S(0)) → (B, S(0))     all-gather 0 (the inner split)    (p0−1)·T
    (P, S(0)) → (S(0)^1, S(0))     reduce-scatter 0 (added inner)    (p0−1)/p0 · T
    (S(0), S(0)) → (S(0)^1, S(0))  all-gather 1, all-gather 0,       (p0·p1 − 1)·T
                                   slice 1, slice 0
    =============================  ================================  =======================

The cost model and the runtime both follow these steps.

Latency: a collective costs α (its axis's latency) per ring step plus one α to start, so one
all-reduce, 2(p−1)+1 α, beats the all-gather and reduce-scatter that move the same bytes, 2p α:
with equal bandwidth, fewer collectives win (plain data parallelism over ZeRO-3 when both fit).
Data parallelism over two axes, a batch ``(S(0), S(0))`` and gradients ``P → B`` on both, is the
two-level all-reduce: 2(p1−1)/p1·G on axis 1, then 2(p0−1)/p0·G on axis 0.

Gradients. For an operator run on local shards under a legal signature, the gradient of an input
held ``S(d)`` is ``S(d)`` (with its mark); of an input held ``P`` is ``B``; of an input held ``B``
is ``B`` when the operator's output is ``B`` on that axis (replicated work) and ``P`` otherwise
(each device adds its share). A tensor's gradient must reach its producer as the producer's
output placement with ``P`` read as ``B``: the dual of an all-gather is a reduce-scatter, of a
``B`` input read by sharded work an all-reduce.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

B = "B"
P = "P"

Placement = tuple[str, ...]  # one entry per mesh axis


def S(dim: int, outer_higher: int = 0) -> str:
    """The split placement along tensor dim ``dim``; ``outer_higher`` (the order mark, module
    docstring): how many higher-indexed axes splitting ``dim`` are outside this one."""
    return f"S({dim})" if outer_higher == 0 else f"S({dim})^{outer_higher}"


def is_split(p: str) -> bool:
    """Whether ``p`` is a split placement."""
    return p.startswith("S(")


@functools.lru_cache(maxsize=4096)
def _parse_split(p: str) -> tuple[int, int]:
    """(dim, order mark) of a split placement ``S(d)`` or ``S(d)^k``."""
    assert is_split(p), p
    close = p.index(")")
    mark = int(p[close + 2:]) if len(p) > close + 1 else 0
    return int(p[2:close]), mark


def split_dim(p: str) -> int:
    """The tensor dim of a split placement."""
    return _parse_split(p)[0]


def order_mark(p: str) -> int:
    """The order mark of a one-axis placement: for ``S(d)^k`` k, for anything else 0."""
    return _parse_split(p)[1] if is_split(p) else 0


def split_orders(placement: Sequence[str]) -> dict[int, list[int]]:
    """Per split tensor dim, the axes splitting it, outer to inner, decoded from the marks:
    axes are placed from the highest index down, each at position ``mark`` among the higher
    axes already placed (a mark past the end places it innermost)."""
    orders: dict[int, list[int]] = {}
    for axis in range(len(placement) - 1, -1, -1):
        p = placement[axis]
        if is_split(p):
            d, mark = _parse_split(p)
            seq = orders.setdefault(d, [])
            seq.insert(min(mark, len(seq)), axis)
    return orders


def with_orders(placement: Sequence[str], orders: dict[int, Sequence[int]]) -> Placement:
    """``placement`` with the dims of ``orders`` nested in the given order (outer to inner;
    each must list exactly the axes splitting that dim): the marks re-encoded."""
    out = list(placement)
    for d, seq in orders.items():
        assert sorted(seq) == sorted(a for a, p in enumerate(placement)
                                     if is_split(p) and split_dim(p) == d), (placement, orders)
        for i, axis in enumerate(seq):
            out[axis] = S(d, sum(1 for b in seq[:i] if b > axis))
    return tuple(out)


def default_order(placement: Sequence[str]) -> Placement:
    """``placement`` with every nested dim in the default left-to-right order (no marks)."""
    return tuple(S(split_dim(p)) if is_split(p) else p for p in placement)


def has_order(placement: Sequence[str]) -> bool:
    """Whether some dim of ``placement`` is nested in an order other than the default."""
    return any(order_mark(p) for p in placement)


def strided_factor(placement: Sequence[str], axis: int, mesh_shape: Sequence[int]) -> int:
    """DTensor's ``_StridedShard`` split factor of ``placement[axis]`` (a split): the product
    of the sizes of the higher-indexed axes nested outside it (1: a plain ``Shard``)."""
    seq = split_orders(placement)[split_dim(placement[axis])]
    return math.prod(mesh_shape[b] for b in seq[:seq.index(axis)] if b > axis)


def grad_target(p: str) -> str:
    """The placement a tensor's gradient must reach its producer in: P is read as B."""
    return B if p == P else p


def input_grad(p_in: str, p_out: str) -> str:
    """Gradient placement of an input held ``p_in`` by an op whose output is ``p_out``."""
    if p_in == P:
        return B
    if p_in == B:
        return B if p_out == B else P
    return p_in


def split_factors(placement: Placement, mesh_shape: Sequence[int], ndim: int) -> list[int]:
    """How many pieces each tensor dim is cut into under ``placement``."""
    f = [1] * ndim
    for p, size in zip(placement, mesh_shape):
        if is_split(p):
            f[split_dim(p)] *= size
    return f


def local_shape(shape: Sequence[int], placement: Placement, mesh_shape: Sequence[int]) -> tuple:
    """Shape of one device's piece of a tensor of global ``shape``."""
    f = split_factors(placement, mesh_shape, len(shape))
    return tuple(s // k for s, k in zip(shape, f))


def local_fraction(placement: Placement, mesh_shape: Sequence[int]) -> float:
    """Fraction of the whole tensor one device holds."""
    frac = 1.0
    for p, size in zip(placement, mesh_shape):
        if is_split(p):
            frac /= size
    return frac


def marks_valid(placement: Sequence[str]) -> bool:
    """Whether every order mark of ``placement`` is at most the number of higher-indexed axes
    splitting the same dim (the axes it can be nested inside)."""
    for axis, p in enumerate(placement):
        mark = order_mark(p)
        if mark and mark > sum(1 for q in placement[axis + 1:]
                               if is_split(q) and split_dim(q) == split_dim(p)):
            return False
    return True


def is_valid(placement: Placement, shape: Sequence[int], mesh_shape: Sequence[int]) -> bool:
    """Split dims in range and divisible by the product of the sizes of the axes splitting
    them (a dim may be split on several axes: nested sharding), order marks in range
    (:func:`marks_valid`)."""
    f = [1] * len(shape)
    for p, size in zip(placement, mesh_shape):
        if is_split(p):
            d = split_dim(p)
            if not 0 <= d < len(shape):
                return False
            f[d] *= size
    return all(s % k == 0 for s, k in zip(shape, f)) and marks_valid(placement)


def split_dims(placements: Sequence[str]) -> tuple[int | None, ...]:
    """The dim each one-axis placement splits (None: B or P)."""
    return tuple(split_dim(p) if is_split(p) else None for p in placements)


def valid_splits(dims: Sequence[Sequence[int | None]], shapes: Sequence[Sequence[int]],
                 mesh_shape: Sequence[int]) -> bool:
    """:func:`is_valid` of several tensors at once, from ``dims[axis][t]`` (:func:`split_dims`
    of the placements on each axis, tensor ``t`` of shape ``shapes[t]``): without parsing."""
    for t, shape in enumerate(shapes):
        f: dict[int, int] = {}
        for axis, n in enumerate(mesh_shape):
            d = dims[axis][t]
            if d is None:
                continue
            if not 0 <= d < len(shape):
                return False
            f[d] = f.get(d, 1) * n
        if any(shape[d] % k for d, k in f.items()):
            return False
    return True


def is_nested(placement: Sequence[str], mesh_shape: Sequence[int]) -> bool:
    """Whether some tensor dim is split on two or more axes of size > 1."""
    dims = [split_dim(p) for p, n in zip(placement, mesh_shape) if is_split(p) and n > 1]
    return len(dims) != len(set(dims))


@dataclass(frozen=True)
class Step:
    """One collective (or local) step on one mesh axis."""

    axis: int
    src: str
    dst: str
    kind: str  # "slice", "all_to_all", "all_gather", "reduce_scatter", "all_reduce"
    bytes_per_device: float
    latency_steps: int


def step_kind(src: str, dst: str) -> str | None:
    """The collective converting ``src`` to ``dst`` on one axis; None when forbidden."""
    if src == dst:
        return "none"
    if dst == P:
        return None
    if src == B:
        return "slice"
    if src == P:
        return "all_reduce" if dst == B else "reduce_scatter"
    return "all_gather" if dst == B else "all_to_all"


#: the order steps run in, by kind: the free slices first, then the steps that shrink what a
#: device holds, then all-reduces (before all-gathers grow the piece they would move); steps of
#: one kind run in order of axis size, then axis index. This order depends on no axis position
#: but through equal sizes; nested splits, ordered by axis position, make meshes that permute
#: axes of different sizes distinct (:meth:`~autoddl.engine.cluster.Mesh.symmetry_key`).
STEP_ORDER = {"slice": 0, "reduce_scatter": 1, "all_to_all": 1, "all_reduce": 2, "all_gather": 3}
COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")


def collective_cost(kind: str, p: int, held_bytes: float) -> tuple[float, int]:
    """(bytes sent per device, latency α steps) of one step of ``kind`` on an axis of size
    ``p``, for ``held_bytes`` the bytes each device holds before the step (the table above;
    ``"slice"`` and ``"none"`` cost nothing)."""
    if kind == "all_to_all":
        return (p - 1) / p * held_bytes, p
    if kind == "all_gather":
        return (p - 1) * held_bytes, p
    if kind == "reduce_scatter":
        return (p - 1) / p * held_bytes, p
    if kind == "all_reduce":
        return 2 * (p - 1) / p * held_bytes, 2 * (p - 1) + 1
    return 0.0, 0


def _kind_rank(kind: str, size: int, axis: int) -> tuple[int, int, int]:
    """Sort key of a step: its kind's :data:`STEP_ORDER`, then axis size, then axis index."""
    return STEP_ORDER[kind], size, axis


def _nests(cur: Sequence[str], axis: int, to: str, mesh_shape: Sequence[int]) -> bool:
    """Whether placing ``to`` on ``axis`` would split a tensor dim another axis (of size > 1)
    still splits in ``cur``: a nested split, which no step may produce."""
    return is_split(to) and any(b != axis and mesh_shape[b] > 1 and cur[b] == to
                                for b in range(len(cur)))


def reshard_steps(
    src: Placement, dst: Placement, nbytes: float, mesh_shape: Sequence[int]
) -> list[Step] | None:
    """The steps converting a tensor of ``nbytes`` from ``src`` to ``dst``; None if forbidden.

    Steps run in :data:`STEP_ORDER` except that no intermediate placement splits one tensor dim
    on two axes: a step that splits dim d on one axis (slice, reduce-scatter, all-to-all) waits
    until the axis that splits d in ``src`` has given it up (all-gather, all-to-all). Such a
    "move" of d between axes is never free: the devices that need a piece of d do not hold it
    (``(S(0), B) -> (B, S(0))`` gathers half the tensor, then slices; sliced first, DTensor
    would gather it anyway, unpriced). Where the moves form a cycle (all-to-alls that swap
    dims between axes), the first of them in :data:`STEP_ORDER` is run as an all-gather and
    its split is sliced once the dim is free."""
    pending: list[int] = []
    for axis, (a, b) in enumerate(zip(src, dst)):
        kind = step_kind(a, b)
        if kind is None:
            return None
        if kind != "none" and mesh_shape[axis] > 1:
            pending.append(axis)
    if (is_nested(src, mesh_shape) or is_nested(dst, mesh_shape) or has_order(src)
            or has_order(dst)):
        return _nested_steps(src, dst, nbytes, mesh_shape)
    cur = list(src)
    steps = []
    while pending:
        def key(ax: int) -> tuple[int, int, int]:
            return _kind_rank(step_kind(cur[ax], dst[ax]) or "", mesh_shape[ax], ax)

        ready = [ax for ax in pending if not _nests(cur, ax, dst[ax], mesh_shape)]
        axis = min(ready or pending, key=key)
        to = dst[axis] if ready else B  # a cycle of moves: gather one, slice it later
        kind = step_kind(cur[axis], to)
        assert kind is not None
        held = nbytes * local_fraction(tuple(cur), mesh_shape)  # bytes this device holds now
        sent, lat = collective_cost(kind, mesh_shape[axis], held)
        steps.append(Step(axis, cur[axis], to, kind, sent, lat))
        cur[axis] = to
        if to == dst[axis]:
            pending.remove(axis)
    return steps


def move_target(cur: str, dst: str) -> str:
    """Where the next step on an axis takes ``cur`` (bound for ``dst``): ``dst``, except that a
    split of the same dim at another place in the order is first gathered (to B)."""
    if cur != dst and is_split(cur) and is_split(dst) and split_dim(cur) == split_dim(dst):
        return B
    return dst


def _live_orders(placement: Sequence[str], mesh_shape: Sequence[int]) -> dict[int, list[int]]:
    """:func:`split_orders` without the axes of size 1 (they nest nothing)."""
    return {d: [a for a in seq if mesh_shape[a] > 1]
            for d, seq in split_orders(placement).items()}


def _blockers(cur: Sequence[str], dst: Sequence[str], m: int,
              mesh_shape: Sequence[int]) -> tuple[list[int], bool]:
    """Why the step ``cur[m] -> move_target(cur[m], dst[m])`` is not clean (module docstring):
    the axes that split a dim the step gathers or splits and must be gathered first (inner
    splits), and whether it must wait for another axis (one that ``dst`` nests outside m must
    split the dim first, or one to give it up). An axis splitting the dim that ``dst`` does not
    split, or splits inside m, is an inner split if its index is above m (with the default
    order, "inside m"); below m the step waits for that axis's own step."""
    inner: list[int] = []
    wait = False
    have = _live_orders(cur, mesh_shape)
    to = move_target(cur[m], dst[m])
    if is_split(cur[m]):
        seq = have[split_dim(cur[m])]
        inner += seq[seq.index(m) + 1:]
    if is_split(to):
        b = split_dim(to)
        want = _live_orders(dst, mesh_shape)[b]
        outer = want[:want.index(m)]
        for x in have.get(b, []):
            if x in outer:
                wait |= cur[x] != dst[x]  # at another place in the order: re-split first
            elif x in want or x > m:
                inner.append(x)
            else:
                wait = True
        wait |= any(x not in have.get(b, []) for x in outer)
    return sorted(set(inner)), wait


def _nested_steps(src: Placement, dst: Placement, nbytes: float,
                  mesh_shape: Sequence[int]) -> list[Step]:
    """:func:`reshard_steps` where ``src`` or ``dst`` nests a split: clean steps only, the ready
    one first in :data:`STEP_ORDER` (by axis size, then index); where none is ready, the
    innermost split of the dim of the highest blocking axis of the first pending step is
    gathered to B first."""
    cur = list(src)
    steps: list[Step] = []
    n = len(cur)
    for _ in range(4 * n * n + 4):
        pending = [ax for ax in range(n) if mesh_shape[ax] > 1 and cur[ax] != dst[ax]]
        if not pending:
            return steps

        def key(ax: int) -> tuple[int, int, int]:
            return _kind_rank(step_kind(cur[ax], move_target(cur[ax], dst[ax])) or "",
                              mesh_shape[ax], ax)

        blocked = {ax: _blockers(cur, dst, ax, mesh_shape) for ax in pending}
        ready = [ax for ax in pending if not blocked[ax][0] and not blocked[ax][1]]
        if ready:
            axis = min(ready, key=key)
            to = move_target(cur[axis], dst[axis])
        else:
            first = min((ax for ax in pending if blocked[ax][0]), key=key)
            d = split_dim(cur[max(blocked[first][0])])
            axis, to = _live_orders(cur, mesh_shape)[d][-1], B  # the innermost split of d
        kind = step_kind(cur[axis], to)
        assert kind is not None and kind != "none", (cur, axis, to)
        held = nbytes * local_fraction(tuple(cur), mesh_shape)
        sent, lat = collective_cost(kind, mesh_shape[axis], held)
        steps.append(Step(axis, cur[axis], to, kind, sent, lat))
        cur[axis] = to
    raise AssertionError(f"no clean conversion {src} -> {dst} found")


def format_placement(placement: Placement, axis_names: Sequence[str]) -> dict[str, str]:
    """A placement as plain data keyed by mesh-axis name."""
    return dict(zip(axis_names, placement))


def parse_placement(data: dict[str, str], axis_names: Sequence[str]) -> Placement:
    """Inverse of :func:`format_placement`."""
    return tuple(data[a] for a in axis_names)
