"""Placement algebra: collective bytes against the ring formulas by hand, gradient rules."""

from __future__ import annotations

import pytest

from autoddl.engine.placements import B, P, S, input_grad, is_valid, reshard_steps
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


def test_gradient_placement_rule():
    assert input_grad(S(1), S(0)) == S(1)
    assert input_grad(P, P) == B
    assert input_grad(B, S(0)) == P  # a B input read by sharded work gets a P gradient
    assert input_grad(B, P) == P
    assert input_grad(B, B) == B


def test_validity():
    assert is_valid((S(0), S(1)), (4, 4), (2, 2))
    assert not is_valid((S(0), S(0)), (4, 4), (2, 2))  # no nested sharding
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
