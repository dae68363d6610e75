"""Placement algebra: collective bytes against the ring formulas by hand, gradient rules."""

from __future__ import annotations

import pytest

from autoddl.engine.placements import B, P, S, input_grad, is_nested, is_valid, reshard_steps
from autoddl.engine.rules import view_groups

T = 1024.0  # bytes of the whole tensor


@pytest.mark.parametrize("p", [2, 4, 8])
def test_one_axis_collectives_match_ring_formulas(p):
    cases = {
        (S(0), B): ("all_gather", (p - 1) / p * T),
        (P, B): ("all_reduce", 2 * (p - 1) / p * T),
        (P, S(0)): ("reduce_scatter", (p - 1) / p * T),
        (S(0), S(1)): ("all_to_all", (p - 1) / p * T / p),
        (B, S(1)): ("slice", 0.0),
    }
    for (a, b), (kind, nbytes) in cases.items():
        (step,) = reshard_steps((a,), (b,), T, (p,))
        assert step.kind == kind
        assert step.bytes_per_device == pytest.approx(nbytes)


def test_identity_and_forbidden():
    assert reshard_steps((S(0), B), (S(0), B), T, (2, 2)) == []
    assert reshard_steps((S(0),), (P,), T, (2,)) is None  # partial sums come only from ops
    assert reshard_steps((B,), (P,), T, (2,)) is None


def test_two_axis_sizes_follow_the_other_axis():
    # all-gather on y while x keeps the tensor split in 2: the group holds T/2
    (step,) = reshard_steps((S(0), S(1)), (S(0), B), T, (2, 4))
    assert step.kind == "all_gather" and step.bytes_per_device == pytest.approx(3 / 4 * T / 2)
    # shrinking steps first: slice on x happens before the all-reduce on y, halving its bytes
    steps = reshard_steps((B, P), (S(0), B), T, (2, 4))
    assert [s.kind for s in steps] == ["slice", "all_reduce"]
    assert steps[1].bytes_per_device == pytest.approx(2 * 3 / 4 * T / 2)


def _nested(steps, src, mesh_shape) -> bool:
    cur = list(src)
    for st in steps:
        cur[st.axis] = st.dst
        splits = [p for p, size in zip(cur, mesh_shape) if p.startswith("S(") and size > 1]
        if len(splits) != len(set(splits)):
            return True
    return False


def test_a_dim_moving_between_axes_is_given_up_before_it_is_split():
    """(S(0), B) -> (B, S(0)) is no free slice: device (0, 1) holds rows 0..T/2 and needs the
    other half, so it is gathered first (sliced first, the intermediate nests two splits of dim
    0, which DTensor gathers unpriced). Likewise a reduce-scatter or an all-to-all into a dim
    another axis still splits waits for that axis."""
    steps = reshard_steps((S(0), B), (B, S(0)), T, (2, 2))
    assert [(s.axis, s.kind) for s in steps] == [(0, "all_gather"), (1, "slice")]
    assert steps[0].bytes_per_device == pytest.approx(T / 2)
    steps = reshard_steps((P, S(1)), (S(1), B), T, (2, 2))
    assert [(s.axis, s.kind) for s in steps] == [(1, "all_gather"), (0, "reduce_scatter")]
    steps = reshard_steps((S(1), B), (S(0), S(1)), T, (2, 2))
    assert [(s.axis, s.kind) for s in steps] == [(0, "all_to_all"), (1, "slice")]
    # unaffected: a slice of a dim no other axis splits still runs first
    assert [s.kind for s in reshard_steps((B, S(0)), (S(1), B), T, (2, 2))] == [
        "slice", "all_gather"]


@pytest.mark.parametrize("src,dst", [((S(0), S(1)), (S(1), S(0))),
                                     ((S(0), S(1), S(2)), (S(1), S(2), S(0)))])
def test_a_cycle_of_moves_is_broken_by_one_gather(src, dst):
    mesh = (2,) * len(src)
    steps = reshard_steps(src, dst, T, mesh)
    assert not _nested(steps, src, mesh)
    assert steps[0].kind == "all_gather" and steps[0].dst == B
    assert steps[-1].kind == "slice" and steps[-1].axis == steps[0].axis
    assert [s.kind for s in steps[1:-1]] == ["all_to_all"] * (len(src) - 1)


def test_no_step_nests_two_splits_of_one_dim():
    """Between placements that nest nothing, no step nests either."""
    import itertools
    one = [B, P, S(0), S(1), S(2)]
    pls = [p for p in itertools.product(one, repeat=3) if is_valid(p, (8, 8, 8), (2, 2, 2))
           and not is_nested(p, (2, 2, 2))]
    for src, dst in itertools.product(pls, pls):
        steps = reshard_steps(src, dst, T, (2, 2, 2))
        if steps is not None:
            assert not _nested(steps, src, (2, 2, 2)), (src, dst)


def test_gradient_placement_rule():
    assert input_grad(S(1), S(0)) == S(1)
    assert input_grad(P, P) == B
    assert input_grad(B, S(0)) == P  # a B input read by sharded work gets a P gradient
    assert input_grad(B, P) == P
    assert input_grad(B, B) == B


def test_validity():
    assert is_valid((S(0), S(1)), (4, 4), (2, 2))
    assert is_valid((S(0), S(0)), (4, 4), (2, 2))  # nested: dim 0 in 2 x 2 pieces
    assert not is_valid((S(0), S(0)), (2, 4), (2, 2))  # 2 rows do not make 4 pieces
    assert not is_valid((S(0), S(0), S(0)), (18, 4), (2, 3, 2))  # 18 % 12
    assert is_valid((S(0), S(0)), (2, 4), (2, 1))  # a size-1 axis splits nothing
    assert not is_valid((S(0),), (3, 4), (2,))  # not divisible
    assert not is_valid((S(2),), (4, 4), (2,))


def test_view_groups():
    assert view_groups((8, 32, 64), (8, 32, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert view_groups((8, 32, 4, 16), (256, 64)) == [([0, 1], [0]), ([2, 3], [1])]
    assert view_groups((8, 1, 4), (8, 4)) == [([0], [0]), ([1, 2], [1])]


def test_capture_records_shapes_flops_weights_and_edges():
    from autoddl.engine.capture import capture
    from autoddl.engine.models import build_model, parse_model_spec

    spec = parse_model_spec("gpt:layers=1,hidden=32,heads=2,seq=8,batch=4,vocab=64")
    g = capture(*build_model(spec, "meta"))
    assert g[g.loss].target == "aten.cross_entropy_loss.default"
    fc1 = next(n for n in g.ops if g.weights_read(n.name) == ["p_blocks_0_fc1_weight",
                                                               "p_blocks_0_fc1_bias"])
    assert fc1.out.shape == (4, 8, 128)
    assert fc1.flops == 2 * 4 * 8 * 32 * 128  # 2·M·K·N by hand
    e = next(e for e in g.edges if e.dst == fc1.name and e.index == 0)
    assert g.edge_bytes(e) == 4 * 8 * 32 * 4  # float32 activations (b, s, h)
    assert g.param_count == sum(p.numel() for p in build_model(spec, "meta")[0].parameters())


def _split_lists(pl, mesh):
    """Per dim, the axes (size > 1) that split it, outer first: DTensor's nesting order."""
    out: dict[int, list[int]] = {}
    for a, p in enumerate(pl):
        if p.startswith("S(") and mesh[a] > 1:
            out.setdefault(int(p[2:-1]), []).append(a)
    return out


@pytest.mark.parametrize("mesh", [(2, 2), (2, 3, 2), (2, 1, 2)])
def test_nested_conversions_only_gather_innermost_and_split_outer_to_inner(mesh):
    """Every conversion between placements that may nest splits, replayed on each dim's list
    of splitting axes: a gather (or the source of an all-to-all) removes the innermost (last)
    axis of its dim, a split appends an axis after every axis already splitting the dim, so
    each intermediate is a valid left-to-right nesting, and the end is ``dst``'s nesting."""
    import itertools
    one = [B, P, S(0), S(1)]
    pls = [p for p in itertools.product(one, repeat=len(mesh))
           if is_valid(p, (12, 12), mesh)]
    assert any(is_nested(p, mesh) for p in pls)
    for src, dst in itertools.product(pls, pls):
        steps = reshard_steps(src, dst, T, mesh)
        if steps is None:
            assert any(q == P and p != P for p, q in zip(src, dst))
            continue
        lists = _split_lists(src, mesh)
        for st in steps:
            if st.src.startswith("S("):
                d = int(st.src[2:-1])
                assert lists[d][-1] == st.axis, (src, dst, st)
                lists[d].pop()
            if st.dst.startswith("S("):
                d = int(st.dst[2:-1])
                assert all(a < st.axis for a in lists.get(d, [])), (src, dst, st)
                lists.setdefault(d, []).append(st.axis)
        assert {d: v for d, v in lists.items() if v} == _split_lists(dst, mesh), (src, dst)


def test_nested_conversion_bytes_by_hand():
    """T bytes on a 2 x 4 mesh. (S(0), S(0)) holds T/8 per device."""
    mesh = (2, 4)
    # the inner split gathered: one all-gather on axis 1 of the T/8 piece, 3 · T/8
    steps = reshard_steps((S(0), S(0)), (S(0), B), T, mesh)
    assert [(s.axis, s.kind, s.bytes_per_device) for s in steps] == [
        (1, "all_gather", 3 * T / 8)]
    # the outer split gathered: DTensor's order, the inner gathered (3 · T/8), the outer
    # gathered (1 · T/2), the inner sliced again
    steps = reshard_steps((S(0), S(0)), (B, S(0)), T, mesh)
    assert [(s.axis, s.kind, s.bytes_per_device) for s in steps] == [
        (1, "all_gather", 3 * T / 8), (0, "all_gather", T / 2), (1, "slice", 0.0)]
    # two-level data-parallel gradients: reduce-scatter nothing, all-reduce T on each axis
    steps = reshard_steps((P, P), (B, B), T, mesh)
    assert sorted((s.axis, s.bytes_per_device) for s in steps) == [(0, T), (1, 2 * 3 / 4 * T)]
    # a partial sum reduce-scattered into a nested split: outer axis first (T/2), then inner
    steps = reshard_steps((P, P), (S(0), S(0)), T, mesh)
    assert [(s.axis, s.kind, s.bytes_per_device) for s in steps] == [
        (0, "reduce_scatter", T / 2), (1, "reduce_scatter", 3 / 4 * T / 2)]
