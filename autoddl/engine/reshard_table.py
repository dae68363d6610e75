"""Conversion costs of every (producer placement, consumer placement) pair at once, in numpy.

The same rules as :func:`autoddl.engine.placements.reshard_steps`, computed for a whole edge
matrix in one pass instead of one Python call per pair (the pairs number tens of thousands on a
3-axis mesh). Per mesh axis a step converts ``src`` to ``dst``:

=============  ==========  ==========================  ===================
src → dst      collective  bytes sent per device        latency steps
=============  ==========  ==========================  ===================
B → S          slice       0                            0
P → S          reduce-sc.  (p−1)/p · held               p
S → S'         all-to-all  (p−1)/p · held               p
S → B          all-gather  (p−1) · held                 p
P → B          all-reduce  2(p−1)/p · held              2(p−1)+1
x → P (x≠P)    forbidden
=============  ==========  ==========================  ===================

where ``held`` is the bytes a device holds when the step runs, priced per axis and kind by
:meth:`~autoddl.engine.cluster.MeshAxis.step_seconds` (two-level on an axis spanning nodes). Steps
run in the order of :data:`~autoddl.engine.placements.STEP_ORDER` (slices, then reduce-scatters and
all-to-alls, then all-reduces, then all-gathers; each kind by axis size, then index), the order
:func:`reshard_steps` uses, so that costs and the runtime's collectives agree (tested). The pairs
where a dim moves from one axis to another (split on one in the producer's placement, on another in
the consumer's) follow :func:`reshard_steps`' rule that no step nests two splits of one dim: they
are replayed step by step, vectorized over those pairs only (:func:`_moves_seconds`). The pairs
whose producer or consumer placement nests a split (one dim split on several axes) are replayed
the same way with :func:`reshard_steps`' clean-step rule for nesting (:func:`_nested_seconds`),
in any nesting order: a split's code carries its order mark (``S(d)^k``: 1 + d + 64·k), each
axis's place in its dim's order is decoded from the marks as
:func:`~autoddl.engine.placements.split_orders` does (:func:`_positions`; without marks the axis
index ranks the same way), and an axis that splits the same dim at another place in the order is
gathered before it is split again."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autoddl.engine.cluster import Mesh
from autoddl.engine.placements import (
    B, P, STEP_ORDER, Placement, grad_target, order_mark, split_dim,
)

_NONE, _SLICE, _RS, _A2A, _AG, _AR, _BAD = range(7)
_CODE = {"slice": _SLICE, "reduce_scatter": _RS, "all_to_all": _A2A, "all_gather": _AG,
         "all_reduce": _AR}
#: step kinds grouped by rank in placements.STEP_ORDER, in that order
_GROUPS = tuple(tuple(_CODE[k] for k, r in STEP_ORDER.items() if r == rank)
                for rank in sorted(set(STEP_ORDER.values())))


#: a split's code is 1 + dim + _MARK · order mark (no tensor has _MARK dims), so that equal codes
#: are equal placements and :func:`_dims` recovers the dim
_MARK = 64


def _codes(placements: Sequence[Placement | None], axes: int) -> np.ndarray:
    """Per placement and axis: -2 (no placement), -1 (B), 0 (P), 1 + d + _MARK·k (S(d)^k)."""
    out = np.full((len(placements), axes), -2, dtype=np.int64)
    for i, pl in enumerate(placements):
        if pl is None:
            continue
        for a, p in enumerate(pl):
            out[i, a] = (-1 if p == B else 0 if p == P
                         else 1 + split_dim(p) + _MARK * order_mark(p))
    return out


def _dims(codes: np.ndarray) -> np.ndarray:
    """The codes without their order marks: -2, -1 (B), 0 (P) or 1 + d (a split of dim d)."""
    if codes.size == 0 or codes.max() <= _MARK:
        return codes
    return np.where(codes > 0, (codes - 1) % _MARK + 1, codes)


def _kind(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The step kind converting code ``s`` to code ``t`` (broadcast), read from
    :data:`_KIND_TABLE` (:func:`_kind_rule` where a code is past it)."""
    s, t = np.asarray(s), np.asarray(t)
    if max(s.max(initial=0), t.max(initial=0)) >= _TABLE_CODES - 2:
        return _kind_rule(s, t)
    return _KIND_TABLE[s + 2, t + 2]


def _kind_rule(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The step kind converting code ``s`` to code ``t`` (broadcast): the rule."""
    k = np.full(np.broadcast(s, t).shape, _NONE)
    diff = s != t
    k = np.where(diff & (t == 0), _BAD, k)
    k = np.where(diff & (t != 0) & (s == -1), _SLICE, k)
    k = np.where(diff & (s == 0) & (t == -1), _AR, k)
    k = np.where(diff & (s == 0) & (t > 0), _RS, k)
    k = np.where(diff & (s > 0) & (t == -1), _AG, k)
    k = np.where(diff & (s > 0) & (t > 0), _A2A, k)
    return k


#: :func:`_kind_rule` of every pair of codes -2 .. _TABLE_CODES - 3 (dims up to 13), by code + 2
_TABLE_CODES = 16
_KIND_TABLE = _kind_rule(np.arange(-2, _TABLE_CODES - 2)[:, None],
                         np.arange(-2, _TABLE_CODES - 2)[None, :])


@dataclass(frozen=True, eq=False)
class _Pairs:
    """What a conversion table needs of (producer, consumer) code pairs, whatever the mesh's
    sizes: per axis the step kind and which side is split there, and the forbidden pairs."""

    kinds: tuple[np.ndarray, ...]  # per axis, (A, B) step kind
    src_split: tuple[np.ndarray, ...]  # per axis, (A, 1) or (A, B): split before the step
    dst_split: tuple[np.ndarray, ...]  # per axis: split after it
    bad: np.ndarray  # (A, B) forbidden (a step into P)
    present: np.ndarray  # per kind code, whether any pair takes it on some axis
    src: np.ndarray  # (A, 1, axes) or (A, B, axes): codes before
    dst: np.ndarray  # (1, B, axes) or (A, B, axes): codes after
    moves: np.ndarray  # (A, B): some dim is split on one axis before and another after


def _pairs(src: np.ndarray, dst: np.ndarray) -> _Pairs:
    """The mesh-independent part of converting ``src`` codes (A, 1, axes) to ``dst`` codes
    (1, B, axes)."""
    axes = src.shape[-1]
    kinds = tuple(_kind(src[..., a], dst[..., a]) for a in range(axes))
    bad = np.zeros(np.broadcast_shapes(src.shape[:-1], dst.shape[:-1]), bool)
    present = np.zeros(_BAD + 1, bool)
    for k in kinds:
        bad |= k == _BAD
        present[np.unique(k)] = True
    moves = np.zeros_like(bad)
    for a in range(axes):
        for b in range(axes):
            if a != b:
                moves |= ((dst[..., a] > 0) & (dst[..., a] == src[..., b])
                          & (kinds[a] != _NONE) & (kinds[b] != _NONE))
    return _Pairs(kinds, tuple(src[..., a] > 0 for a in range(axes)),
                  tuple(dst[..., a] > 0 for a in range(axes)), bad, present, src, dst,
                  moves & ~bad)


@functools.lru_cache(maxsize=256)
def _rates(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """(seconds per byte sent, seconds per latency step) of each axis (rows) and step kind
    (columns, by code), from :meth:`~autoddl.engine.cluster.MeshAxis.step_seconds`: a two-level
    axis prices each kind differently."""
    per_byte = np.zeros((len(mesh.axes), _BAD + 1))
    alpha = np.zeros((len(mesh.axes), _BAD + 1))
    for a, ax in enumerate(mesh.axes):
        for kind, code in _CODE.items():
            per_byte[a, code] = ax.step_seconds(kind, 1.0, 0.0)
            alpha[a, code] = ax.step_seconds(kind, 0.0, 1.0)
    return per_byte, alpha


def _seconds(pairs: _Pairs, mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds per byte, latency seconds, forbidden) of the conversions of ``pairs`` on
    ``mesh``, each (A, B)."""
    shape = pairs.bad.shape
    sizes = [ax.size for ax in mesh.axes]
    held = np.ones(shape)
    for a, p in enumerate(sizes):
        held = held * np.where(pairs.src_split[a], 1.0 / p, 1.0)
    # per axis and step kind (indexed by code): bytes factor and latency steps
    factor = np.zeros((len(sizes), _BAD + 1))
    steps = np.zeros((len(sizes), _BAD + 1))
    for a, p in enumerate(sizes):
        factor[a, [_A2A, _RS, _AG, _AR]] = [(p - 1) / p, (p - 1) / p, p - 1.0, 2.0 * (p - 1) / p]
        steps[a, [_A2A, _RS, _AG, _AR]] = [p, p, p, 2 * (p - 1) + 1]
    inv_bw, alpha = _rates(mesh)
    per_byte, latency = np.zeros(shape), np.zeros(shape)
    by_size = sorted(range(len(sizes)), key=lambda a: (sizes[a], a))
    for group in _GROUPS:
        in_group = np.zeros(_BAD + 1, bool)
        in_group[list(group)] = True
        if not (in_group & pairs.present).any():
            continue
        for a in by_size:
            k, p = pairs.kinds[a], sizes[a]
            if p == 1:
                continue
            live = in_group[k]
            if not live.any():
                continue
            per_byte += np.where(live, factor[a, k] * held * inv_bw[a, k], 0.0)
            latency += np.where(live, steps[a, k] * alpha[a, k], 0.0)
            # the step changes the held piece by p (S -> B, gather) or 1/p (B/P -> S)
            ratio = (np.where(pairs.src_split[a], float(p), 1.0)
                     * np.where(pairs.dst_split[a], 1.0 / p, 1.0))
            held = np.where(live, held * ratio, held)
    nested = _nested_mask(pairs.src, sizes) | _nested_mask(pairs.dst, sizes)
    nested = np.broadcast_to(nested, shape) & ~pairs.bad
    moves = pairs.moves & ~nested
    if moves.any():
        rows = np.nonzero(moves)
        src = np.broadcast_to(pairs.src, shape + pairs.src.shape[-1:])[rows]
        dst = np.broadcast_to(pairs.dst, shape + pairs.dst.shape[-1:])[rows]
        per_byte[rows], latency[rows] = _moves_seconds(src.T.copy(), dst.T.copy(), mesh)
    if nested.any():
        rows = np.nonzero(nested)
        src = np.broadcast_to(pairs.src, shape + pairs.src.shape[-1:])[rows]
        dst = np.broadcast_to(pairs.dst, shape + pairs.dst.shape[-1:])[rows]
        per_byte[rows], latency[rows] = _nested_seconds(src, dst, mesh)
    bad = pairs.bad
    return np.where(bad, np.inf, per_byte), np.where(bad, 0.0, latency), bad


def _nested_mask(codes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Per placement (codes, last axis the mesh axes): some dim split on two axes of size > 1,
    or an order mark (a dim nested in another order than the default)."""
    out = (codes > _MARK).any(axis=-1)
    dims = _dims(codes)
    live = [a for a, p in enumerate(sizes) if p > 1]
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            out |= (dims[..., a] > 0) & (dims[..., a] == dims[..., b])
    return out


def _step_tables(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per axis (rows) and step kind (columns, by code): the bytes factor (bytes sent per byte
    held) and the latency steps of :func:`~autoddl.engine.placements.collective_cost`."""
    p = sizes.astype(float)
    factor = np.zeros((len(sizes), _BAD + 1))
    steps = np.zeros((len(sizes), _BAD + 1))
    factor[:, [_A2A, _RS, _AG, _AR]] = np.stack([(p - 1) / p, (p - 1) / p, p - 1,
                                                 2 * (p - 1) / p], axis=1)
    steps[:, [_A2A, _RS, _AG, _AR]] = np.stack([p, p, p, 2 * (p - 1) + 1], axis=1)
    return factor, steps


def _run_step(cur: np.ndarray, ax: np.ndarray, to: np.ndarray, active: np.ndarray,
              held: np.ndarray, sums: tuple[np.ndarray, np.ndarray],
              tables: tuple[np.ndarray, ...]) -> np.ndarray:
    """One step of each column of codes ``cur`` (axes, K) where ``active``: axis ``ax[k]``
    goes to code ``to[k]``. Adds its (seconds per byte, latency seconds) to ``sums`` and
    changes ``cur`` in place; returns the bytes held after it (per byte of tensor).
    ``tables``: (:func:`_step_tables`' factor and steps, :func:`_rates`' per byte and alpha)."""
    factor, steps, inv_bw, alpha = tables
    cols = np.arange(cur.shape[1])
    frm = cur[ax, cols]
    kind = _kind(frm, to)
    sums[0][:] += np.where(active, factor[ax, kind] * held * inv_bw[ax, kind], 0.0)
    sums[1][:] += np.where(active, steps[ax, kind] * alpha[ax, kind], 0.0)
    p = steps[ax, _A2A]  # an all-to-all's latency steps: the axis size
    ratio = np.where(frm > 0, p, 1.0) * np.where(to > 0, 1.0 / p, 1.0)
    cur[ax, cols] = np.where(active, to, frm)
    return np.where(active, held * ratio, held)


def _positions(codes: np.ndarray, dims: np.ndarray) -> np.ndarray | None:
    """Per axis (rows) and column of codes (axes, K) and their :func:`_dims`: the place of
    each split in its dim's order, outer first, decoded from the marks as
    :func:`~autoddl.engine.placements.split_orders` does; -1 where the axis splits nothing.
    Only the ranks within a dim are meant, so without marks (every dim in the default order)
    it is None: the axis indices rank the same way."""
    if codes.max(initial=0) <= _MARK:
        return None
    n = codes.shape[0]
    split = dims > 0
    same = split[:, None] & (dims[:, None] == dims[None, :])  # (axes, axes, K)
    marks = np.where(codes > 0, (codes - 1) // _MARK, 0)
    pos = np.full(codes.shape, -1, np.int64)
    for m in range(n - 1, -1, -1):
        at = np.minimum(marks[m], same[m, m + 1:].sum(axis=0))
        for x in range(m + 1, n):
            pos[x] = np.where(same[m, x] & (pos[x] >= at), pos[x] + 1, pos[x])
        pos[m] = np.where(split[m], at, -1)
    return pos


def _after(pos: np.ndarray | None, x: int, m: int) -> np.ndarray | bool:
    """Whether axis x is after (inside) axis m in the order of their common dim (both split
    it), from :func:`_positions` (None: by index)."""
    return x > m if pos is None else pos[x] > pos[m]


def _nest_blocks(cur: np.ndarray, dst: np.ndarray, dd: np.ndarray,
                 dst_pos: np.ndarray | None, live: np.ndarray) -> tuple:
    """Each axis's next step and why it is not clean, for codes (axes, K), as
    :func:`~autoddl.engine.placements._blockers`: (``to`` (axes, K), the code the step goes
    to: ``dst``, or B where an axis splits the same dim at another place in the order;
    ``inner`` (axes m, axes x, K), x (live) splits a dim the step of m gathers or splits and
    must be gathered first; ``wait`` (axes, K), another axis must first split or give up the
    dim the step splits; ``pos``: :func:`_positions` of ``cur``; ``dc``: its dims). ``dd``,
    ``dst_pos``: :func:`_dims` and :func:`_positions` of ``dst``."""
    n = cur.shape[0]
    dc = _dims(cur)
    pos = _positions(cur, dc)
    to = dst
    if pos is not None or dst_pos is not None:  # a split to re-place in its order: gathered
        to = np.where((cur != dst) & (dc > 0) & (dc == dd), -1, dst)
    b = _dims(to)
    eq = cur == dst
    inner = np.zeros((n, n) + cur.shape[1:], bool)
    wait = np.zeros(cur.shape, bool)
    for m in range(n):
        splits = b[m] > 0
        for x in range(n):
            if x == m or not live[x]:
                continue
            has = splits & (dc[x] == b[m])  # x splits the dim m's step splits
            in_t = splits & (dd[x] == b[m])  # ... and does in dst,
            outer = in_t & _after(dst_pos, m, x)  # ... outside m
            gathered = (dc[m] > 0) & (dc[x] == dc[m]) & _after(pos, x, m)
            if x > m:
                inner[m, x] = gathered | (has & ~outer)
            else:
                inner[m, x] = gathered | (has & ~outer & in_t)
                wait[m] |= has & ~in_t
            wait[m] |= outer & ~(has & eq[x])
    return to, inner, wait, pos, dc


def _nested_seconds(src: np.ndarray, dst: np.ndarray, mesh: Mesh) -> tuple[np.ndarray, ...]:
    """(seconds per byte, latency seconds) of K conversions (codes ``src``, ``dst``: (K, axes))
    whose source or target nests a split, replayed step by step as
    :func:`~autoddl.engine.placements._nested_steps` runs them, vectorized over the K pairs:
    the clean ready step first in STEP_ORDER (by axis size, then index); where none is ready,
    the innermost split of the dim of the highest axis blocking the first pending step is
    gathered to B. A row with no placement (code -2) converts nothing."""
    cur, dst = src.T.copy(), dst.T
    n, k = cur.shape
    sizes = np.array([ax.size for ax in mesh.axes])
    live = sizes > 1
    inv_bw, alpha = _rates(mesh)
    factor, steps = _step_tables(sizes)
    by_size = np.empty(n, np.int64)
    by_size[sorted(range(n), key=lambda a: (sizes[a], a))] = np.arange(n)
    p = sizes.astype(float)
    held = np.prod(np.where(cur > 0, 1.0 / p[:, None], 1.0), axis=0)
    per_byte, latency = np.zeros(k), np.zeros(k)
    cols = np.arange(k)
    empty = (cur < -1).any(axis=0) | (dst < -1).any(axis=0)
    dd = _dims(dst)
    dst_pos = _positions(dst, dd)
    big = np.iinfo(np.int64).max
    for _ in range(4 * n * n + 4):
        pending = (cur != dst) & live[:, None] & ~empty
        active = pending.any(axis=0)
        if not active.any():
            return per_byte, latency
        to, inner, wait, pos, dims = _nest_blocks(cur, dst, dd, dst_pos, live)
        blocked = inner.any(axis=1)
        ready = pending & ~blocked & ~wait
        key = _RANK[_kind(cur, to)] * n + by_size[:, None]
        ax = np.argmin(np.where(ready, key, big), axis=0)
        to = to[ax, cols]
        stuck = active & ~ready.any(axis=0)
        if stuck.any():  # gather the innermost split of the highest blocking axis's dim
            first = np.argmin(np.where(pending & blocked, key, big), axis=0)
            highest = n - 1 - np.argmax(inner[first, ::-1, cols].T, axis=0)
            same = live[:, None] & (dims > 0) & (dims == dims[highest, cols])
            rank = np.arange(n)[:, None] if pos is None else pos
            ax = np.where(stuck, np.argmax(np.where(same, rank, -1), axis=0), ax)
            to = np.where(stuck, -1, to)  # -1: B
        held = _run_step(cur, ax, to, active, held, (per_byte, latency),
                         (factor, steps, inv_bw, alpha))
    raise AssertionError("no clean conversion")


#: STEP_ORDER by kind code (NONE and BAD never run)
_RANK = np.array([0] + [STEP_ORDER[k] for k in ("slice", "reduce_scatter", "all_to_all",
                                                "all_gather", "all_reduce")] + [0])


def _moves_seconds(cur: np.ndarray, dst: np.ndarray, mesh: Mesh) -> tuple[np.ndarray, ...]:
    """(seconds per byte, latency seconds) of K conversions from codes ``cur`` to ``dst`` (each
    (axes, K)), step by step as :func:`~autoddl.engine.placements.reshard_steps` runs them: the
    ready step (one nesting no split) first in STEP_ORDER, by axis size, then index; where none
    is ready (a cycle of moves), the first pending one gathers (to B) and is sliced later."""
    n, k = cur.shape
    sizes = np.array([ax.size for ax in mesh.axes])
    inv_bw, alpha = _rates(mesh)
    pos = np.empty(n, np.int64)
    pos[sorted(range(n), key=lambda a: (sizes[a], a))] = np.arange(n)
    p = sizes.astype(float)
    factor, steps = _step_tables(sizes)
    held = np.prod(np.where(cur > 0, 1.0 / p[:, None], 1.0), axis=0)
    per_byte, latency = np.zeros(k), np.zeros(k)
    cols = np.arange(k)
    # the axis (of size > 1) that splits, before, the dim each axis splits after (if any): a
    # step may not split that dim while that axis still does
    pred = np.full((n, k), -1)
    for a in range(n):
        for b in range(n):
            if b != a and sizes[b] > 1:
                pred[a] = np.where((dst[a] > 0) & (cur[b] == dst[a]), b, pred[a])
    has_pred, pred = pred >= 0, np.maximum(pred, 0)
    live = (cur != dst) & (sizes[:, None] > 1)
    key = _RANK[_kind(cur, dst)] * n + pos[:, None]
    big = np.iinfo(np.int64).max
    for _ in range(2 * n):
        active = live.any(axis=0)
        if not active.any():
            break
        ready = live & ~(has_pred & (np.take_along_axis(cur, pred, axis=0) == dst))
        any_ready = ready.any(axis=0)
        ax = np.argmin(np.where(np.where(any_ready, ready, live), key, big), axis=0)
        want = dst[ax, cols]
        to = np.where(any_ready, want, -1)  # -1: B, where a cycle of moves is broken
        held = _run_step(cur, ax, to, active, held, (per_byte, latency),
                         (factor, steps, inv_bw, alpha))
        live[ax, cols] &= ~(active & (to == want))
        key[ax, cols] = np.where(active & (to == -1), _RANK[_SLICE] * n + pos[ax],
                                 key[ax, cols])
    return per_byte, latency


@dataclass(frozen=True, eq=False)
class _EdgePairs:
    """The mesh-independent part of :func:`unit_matrices` for one pair of placement lists.
    Conversions are priced once per distinct pair of placements: ``fwd`` between the distinct
    producer outputs (rows) and consumer inputs (columns), ``bwd`` between the distinct
    gradient targets (rows) and returned gradients (columns); ``*_rows``, ``*_cols`` map the
    edge's keys onto them."""

    fwd: _Pairs
    bwd: _Pairs
    fwd_rows: np.ndarray  # (A,) distinct producer output of each producer key
    fwd_cols: np.ndarray  # (B,) distinct consumer input of each consumer key
    bwd_rows: np.ndarray  # (A,) distinct gradient target of each producer key
    bwd_cols: np.ndarray  # (B,) distinct returned gradient of each consumer key
    has_grad: np.ndarray  # (1, B)
    ins_split: np.ndarray  # (1, B, axes): the consumer's input split on each axis
    same: np.ndarray  # (A, B): no conversion


#: :class:`_EdgePairs` by (producer placements, consumer placements), shared by every mesh of
#: this process with as many axes; cleared past _EDGE_PAIRS_MAX entries
_EDGE_PAIRS: dict[tuple, _EdgePairs] = {}
_EDGE_PAIRS_MAX = 5000


def _distinct(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows of ``codes``, the index of each row among them)."""
    rows, inverse = np.unique(codes, axis=0, return_inverse=True)
    return rows, inverse.reshape(-1)


def _edge_pairs(src_vals: Sequence[Placement],
                dst_vals: Sequence[tuple[Placement, Placement | None]], n_axes: int) -> _EdgePairs:
    key = (tuple(src_vals), tuple(dst_vals), n_axes)
    got = _EDGE_PAIRS.get(key)
    if got is None:
        out = _codes(src_vals, n_axes)
        ins = _codes([d[0] for d in dst_vals], n_axes)
        has_grad = np.array([d[1] is not None for d in dst_vals])
        # no gradient: priced as B (a step out of B is never forbidden), then zeroed
        grads = np.where(has_grad[:, None], _codes([d[1] for d in dst_vals], n_axes), -1)
        target = _codes([tuple(grad_target(p) for p in s) for s in src_vals], n_axes)
        (out_u, out_i), (ins_u, ins_i) = _distinct(out), _distinct(ins)
        (tgt_u, tgt_i), (grad_u, grad_i) = _distinct(target), _distinct(grads)
        if len(_EDGE_PAIRS) >= _EDGE_PAIRS_MAX:
            _EDGE_PAIRS.clear()
        got = _EDGE_PAIRS[key] = _EdgePairs(
            _pairs(out_u[:, None, :], ins_u[None, :, :]),
            _pairs(grad_u[None, :, :], tgt_u[:, None, :]),
            out_i, ins_i, tgt_i, grad_i, has_grad[None, :], ins[None, :, :] > 0,
            np.all(out[:, None, :] == ins[None, :, :], axis=-1))
    return got


def unit_matrices(src_vals: Sequence[Placement],
                  dst_vals: Sequence[tuple[Placement, Placement | None]],
                  mesh: Mesh) -> tuple[np.ndarray, ...]:
    """(fwd s/byte, fwd latency s, bwd s/byte, bwd latency s, memory fraction) of every pair of
    producer output placement and consumer (input placement, gradient placement); forward
    inf where the conversion is forbidden, backward 0 where there is no gradient."""
    pairs = _edge_pairs(src_vals, dst_vals, len(mesh.axes))
    fwd = np.ix_(pairs.fwd_rows, pairs.fwd_cols)
    bwd = np.ix_(pairs.bwd_rows, pairs.bwd_cols)
    fb, fl, bad = (m[fwd] for m in _seconds(pairs.fwd, mesh))
    bb, bl, bbad = (m[bwd] for m in _seconds(pairs.bwd, mesh))
    keep = pairs.has_grad & ~bad & ~bbad  # a forbidden backward conversion is costed as none
    bb, bl = np.where(keep, bb, 0.0), np.where(keep, bl, 0.0)
    sizes = np.array([ax.size for ax in mesh.axes], float)
    frac_in = np.prod(np.where(pairs.ins_split, 1.0 / sizes, 1.0), axis=-1)
    frac = np.where(pairs.same, 0.0, np.broadcast_to(frac_in, pairs.same.shape))
    return fb, fl, bb, bl, np.where(bad, 0.0, frac)
