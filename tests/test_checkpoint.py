"""Checkpoint folders without running ranks (:mod:`autoddl.runtime.checkpoint`): which step
``--resume`` picks (the newest complete one, never a partial one), the lr it trains at, and the
one-line refusals of a checkpoint of another model or optimizer. The runs themselves, killed
while saving and resumed, are in ``tests/test_faults.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoddl.engine.plan import Plan
from autoddl.errors import UserError
from autoddl.runtime import checkpoint as ck


def _step(folder: Path, name: str, step: int, metadata: bool = True, **info) -> Path:
    """A step folder as the saver leaves it (DCP's data files aside)."""
    path = folder / name
    path.mkdir(parents=True)
    if metadata:
        (path / ck.DCP_METADATA).write_bytes(b"x")
    (path / ck.INFO).write_text(json.dumps({"step": step, "lr": 0.01, **info}))
    return path


def _manifest(folder: Path, name: str) -> None:
    (folder / ck.MANIFEST).write_text(json.dumps({"latest": name}))


def test_resume_picks_the_step_the_manifest_names_and_never_a_partial_one(tmp_path):
    _step(tmp_path, "step-1", 1)
    _step(tmp_path, "step-2", 2)
    _step(tmp_path, ".step-3.partial", 3)  # complete by DCP, not yet renamed: not resumed
    _step(tmp_path, "step-4", 4, metadata=False)  # cannot happen, but is not complete
    _manifest(tmp_path, "step-1")
    assert ck.latest(tmp_path).path == tmp_path / "step-1"
    (tmp_path / ck.MANIFEST).unlink()  # killed between the first rename and the manifest
    saved = ck.latest(tmp_path)
    assert (saved.path, saved.step) == (tmp_path / "step-2", 2)
    _manifest(tmp_path, "../step-1")  # not a step folder's name: ignored
    assert ck.latest(tmp_path).path == tmp_path / "step-2"
    _manifest(tmp_path, "step-9")  # names a folder that is gone: the newest complete one
    assert ck.latest(tmp_path).path == tmp_path / "step-2"


@pytest.mark.parametrize("make, says", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "no checkpoint files"),
    (lambda d: _step(d, ".step-1.partial", 1), "no checkpoint files"),
    (lambda d: (d.mkdir(), (d / "rank0.pt").write_bytes(b"")), "older autoddl"),
])
def test_nothing_to_resume_is_one_line(tmp_path, make, says):
    folder = tmp_path / "ck"
    make(folder)
    with pytest.raises(UserError, match=says) as err:
        ck.latest(folder)
    assert "\n" not in str(err.value)


def test_lr_is_the_saved_one_unless_given(tmp_path):
    saved = ck.latest(_step(tmp_path, "step-2", 2).parent)
    assert ck.pick_lr(None, None) == (ck.DEFAULT_LR, None)
    assert ck.pick_lr(None, 0.5) == (0.5, None)
    assert ck.pick_lr(saved, None) == (0.01, None)
    assert ck.pick_lr(saved, 0.01) == (0.01, None)
    assert ck.pick_lr(saved, 0.05) == (0.05, "lr changed from 0.01 to 0.05 (--lr; the "
                                             "checkpoint was saved with 0.01)")


def _plan(optimizer: str = "adam", graph_hash: str = "abc") -> Plan:
    return Plan(model={"spec": "m", "graph_hash": graph_hash}, cluster={},
                mesh={"axes": [{"name": "x", "size": 2}]},
                training={"optimizer": optimizer}, cost={}, memory={}, ops=(), solver={})


def test_another_model_or_optimizer_is_refused_in_one_line(tmp_path):
    info = {k: v for k, v in ck.describe(_plan(), 0.01, check=False).items() if k != "lr"}
    saved = ck.latest(_step(tmp_path, "step-1", 1, **info).parent)
    ck.check_resumable(saved, _plan(), check=False)
    with pytest.raises(UserError, match="another model") as err:
        ck.check_resumable(saved, _plan(graph_hash="def"), check=False)
    with pytest.raises(UserError, match=r"optimizer 'adam', but this plan trains with "
                                        r"'momentum'.*--optimizer adam") as err2:
        ck.check_resumable(saved, _plan("momentum"), check=False)
    with pytest.raises(UserError, match="saved without --check") as err3:
        ck.check_resumable(saved, _plan(), check=True)
    assert all("\n" not in str(e.value) for e in (err, err2, err3))
