"""Conversions on 4 gloo ranks (2×2 mesh): what torch runs equals what the plan prices, and the
runtime's byte log holds every collective torch ran (issue 14).

Before the fix, a conversion that moved a split dim between axes — ``(B, S(0)) -> (S(0), B)``
priced as a free slice then a quarter-size all-gather — ran two all-gathers in DTensor (the
slice nested two splits of dim 0), and the log, written from the plan's steps, showed one; an
all-to-all after such a nesting even gave wrong values. ``tests/reshard_ranks.py`` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autoddl.runtime.worker import aggregate_measured, byte_check

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reshard") / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         "--standalone", "-m", "tests.reshard_ranks", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_conversion_runs_exactly_its_predicted_collectives(ranks):
    """Every pair of placements of the 2×2 mesh, nested dims in either order: the right pieces,
    torch ran the predicted collectives, the byte log holds their bytes."""
    rows = ranks["conversions"]
    assert len(rows) > 90
    assert sum("^" in p for r in rows for p in r["src"] + r["dst"]) > 40
    for r in rows:
        case = (r["src"], r["dst"])
        assert r["correct"], case
        assert r["torch"] == r["predicted_kinds"], case  # CommDebugMode: what torch ran
        assert r["logged"] == r["predicted"], case  # the byte log: count and bytes per axis


def test_moves_between_axes_are_priced_as_what_runs(ranks):
    by = {(tuple(r["src"]), tuple(r["dst"])): r for r in ranks["conversions"]}
    r = by[(("B", "S(0)"), ("S(0)", "B"))]  # the case: gather half, then slice
    assert r["predicted"] == {"b/all_gather": [1, 32.0]}
    r = by[(("S(0)", "S(1)"), ("S(1)", "S(0)"))]  # a swap: one gather breaks the cycle
    assert r["predicted"] == {"a/all_gather": [1, 16.0], "b/all_to_all": [1, 16.0]}


def test_gradients_of_moving_edges(ranks):
    """Including edges into and out of the other nesting order (its reduce-scatters and
    slices backward)."""
    assert all(r["correct"] for r in ranks["gradients"]), ranks["gradients"]


def test_nesting_orders_are_dtensors_strided_shards(ranks):
    """Each placement, in either order, is distributed by DTensor (``_StridedShard`` for the
    other order) into exactly the pieces the order defines, on every rank."""
    r = ranks["layouts"]
    assert r["ordered"] >= 2 and r["bad"] == [], r


def test_log_holds_collectives_dtensor_adds_and_the_byte_check_fails(ranks):
    """Steps that nest splits (the old order) make DTensor run an all-gather no step names:
    the log has it, with its bytes, and the byte table reports the mismatch."""
    r = ranks["nested"]
    assert r["torch"] == {"all_gather": 2} and r["predicted_kinds"] == {"all_gather": 1}
    assert r["logged"]["b/all_gather"][0] == 2 and r["logged"]["b/all_gather"][1] > 16.0
    measured = aggregate_measured([(0, {tuple(k.split("/")): v
                                        for k, v in r["logged"].items()})])
    pred = {"a": {}, "b": {"all_gather": {"count": 1, "bytes": 16.0}}}
    (row,) = byte_check(pred, measured)
    assert row.status == "MISMATCH" and row.executed_count == 2


def test_nested_conversions_on_a_2x2x2_mesh(tmp_path):
    """8 gloo ranks: a sample of conversions from or to placements nesting a split on two or
    three axes, in the default order or another (3-axis nests in any of six), gives DTensor's
    pieces (those the target's order defines), and the log holds exactly the predicted
    collectives."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8",
         "--standalone", "-m", "tests.reshard_ranks3", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ran"] > 140 and r["ordered"] > 50 and r["bad"] == [], r["bad"][:3]
