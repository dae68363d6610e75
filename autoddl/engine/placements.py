"""SBP placements and the collectives that convert between them.

A placement of one tensor on one mesh axis is a string: ``"B"`` (broadcast: every device of the
axis holds the whole tensor), ``"P"`` (partial sum: each holds an addend) or ``"S(d)"`` (split
along tensor dim ``d``). On an n-axis mesh a tensor's placement is a tuple with one entry per axis.

Nested sharding. A tensor dim may be split on several axes (DTensor's ``[Shard(0), Shard(0)]``):
it is cut into the product of their sizes, nested left to right, the lower-indexed axis outer.
Under ``(S(0), S(0))`` on a p0 × p1 mesh device (i, j) holds chunk ``i·p1 + j`` of p0·p1 chunks of
dim 0: axis 0 splits the whole dim, axis 1 splits axis 0's piece. A placement is valid when each
split dim is divisible by the product of the sizes of the axes splitting it (:func:`is_valid`).

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
axis m needs no axis after m to split a (it then concatenates the p consecutive sub-chunks of
the outer piece all devices of m's group share); a split of dim b on axis m (slice,
reduce-scatter, the target side of an all-to-all) needs no axis after m to split b yet, every
axis before m that ``dst`` splits on b to split it already, and no axis before m to still split
b that ``dst`` does not (so splits are added outer to inner and no inner split is gathered twice).
The runtime runs each step as one DTensor redistribute (or its own all-to-all), and DTensor runs
a clean step as the one collective in the table; an unclean one it would decompose itself.

Order (:func:`reshard_steps`): without nesting in ``src`` or ``dst``, in ``STEP_ORDER``: the free
slices (B→S) first, then the steps that shrink the local tensor (P→S, S→S'), then all-reduces
(P→B), then all-gathers (S→B), which grow what later steps would move; steps of one kind in order
of axis size, then index — except that no step may split a dim another axis still splits (no
nesting in between): a dim that moves from one axis to another is first given up, then split.
With nesting on either side, the clean ready step first in that order runs; when none is clean,
the innermost split blocking the first pending step is gathered to B first (and re-split later
if ``dst`` splits it). So ``(S(0), S(0)) → (S(0), B)`` is one all-gather on axis 1 of the local
piece, (p1−1)·T; ``(S(0), S(0)) → (B, S(0))`` is an all-gather on axis 1, (p1−1)·T, an all-gather
on axis 0 of the grown piece, (p0−1)·p1·T, and a free slice on axis 1 — what DTensor runs too.
The cost model and the runtime both follow these steps.

Latency: a collective costs α (its axis's latency) per ring step plus one α to start, so one
all-reduce, 2(p−1)+1 α, beats the all-gather and reduce-scatter that move the same bytes, 2p α:
with equal bandwidth, fewer collectives win (plain data parallelism over ZeRO-3 when both fit).
Data parallelism over two axes, a batch ``(S(0), S(0))`` and gradients ``P → B`` on both, is the
two-level all-reduce: 2(p1−1)/p1·G on axis 1, then 2(p0−1)/p0·G on axis 0.

Gradients. For an operator run on local shards under a legal signature, the gradient of an input
held ``S(d)`` is ``S(d)``; of an input held ``P`` is ``B``; of an input held ``B`` is ``B`` when the
operator's output is ``B`` on that axis (replicated work) and ``P`` otherwise (each device adds its
share). A tensor's gradient must reach its producer as the producer's output placement with ``P``
read as ``B``: the dual of an all-gather is a reduce-scatter, of a ``B`` input read by sharded
work an all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

B = "B"
P = "P"

Placement = tuple[str, ...]  # one entry per mesh axis


def S(dim: int) -> str:
    """The split placement along tensor dim ``dim``."""
    return f"S({dim})"


def is_split(p: str) -> bool:
    """Whether ``p`` is a split placement."""
    return p.startswith("S(")


def split_dim(p: str) -> int:
    """The tensor dim of a split placement."""
    assert is_split(p), p
    return int(p[2:-1])


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


def is_valid(placement: Placement, shape: Sequence[int], mesh_shape: Sequence[int]) -> bool:
    """Split dims in range and divisible by the product of the sizes of the axes splitting
    them (a dim may be split on several axes: nested sharding)."""
    f = [1] * len(shape)
    for p, size in zip(placement, mesh_shape):
        if is_split(p):
            d = split_dim(p)
            if not 0 <= d < len(shape):
                return False
            f[d] *= size
    return all(s % k == 0 for s, k in zip(shape, f))


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
    if is_nested(src, mesh_shape) or is_nested(dst, mesh_shape):
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


def _blockers(cur: Sequence[str], dst: Sequence[str], m: int,
              mesh_shape: Sequence[int]) -> tuple[list[int], bool]:
    """Why the step ``cur[m] -> dst[m]`` is not clean (module docstring): the axes after m
    that split a dim the step gathers or splits (inner splits to gather first), and whether
    it must wait for an axis before m (one that must split the same dim first, or give it up)."""
    inner: list[int] = []
    wait = False
    live = [b for b in range(len(cur)) if mesh_shape[b] > 1 and b != m]
    if is_split(cur[m]):
        inner += [b for b in live if b > m and cur[b] == cur[m]]
    if is_split(dst[m]):
        to = dst[m]
        inner += [b for b in live if b > m and cur[b] == to]
        wait = any(b < m and ((dst[b] == to) != (cur[b] == to)) for b in live)
    return sorted(set(inner)), wait


def _nested_steps(src: Placement, dst: Placement, nbytes: float,
                  mesh_shape: Sequence[int]) -> list[Step]:
    """:func:`reshard_steps` where ``src`` or ``dst`` nests a split: clean steps only, the ready
    one first in :data:`STEP_ORDER` (by axis size, then index); where none is ready, the
    innermost split blocking the first pending step is gathered to B first."""
    cur = list(src)
    steps: list[Step] = []
    n = len(cur)
    for _ in range(4 * n * n + 4):
        pending = [ax for ax in range(n) if mesh_shape[ax] > 1 and cur[ax] != dst[ax]]
        if not pending:
            return steps

        def key(ax: int) -> tuple[int, int, int]:
            return _kind_rank(step_kind(cur[ax], dst[ax]) or "", mesh_shape[ax], ax)

        blocked = {ax: _blockers(cur, dst, ax, mesh_shape) for ax in pending}
        ready = [ax for ax in pending if not blocked[ax][0] and not blocked[ax][1]]
        if ready:
            axis = min(ready, key=key)
            to = dst[axis]
        else:
            first = min((ax for ax in pending if blocked[ax][0]), key=key)
            axis, to = max(blocked[first][0]), B  # the innermost blocking split
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
