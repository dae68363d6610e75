"""What a new user reads in a plan (issue 18, last items): a pipelined plan's numbers explained
in words (and those words true of the numbers), the module path of every listed op (a
representative of repeated layers names the real layers it stands for), solver lines without
solver jargon, and a flat plan's plot of per-op placements."""

from __future__ import annotations

import json
import re

import pytest

from autoddl.cli import main

PP_MODEL = "gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128"
#: jargon of the solver's internals that the summary must not print
JARGON = ("tree relaxation", "(axis, kind)", "LP, integral", "(LP)", "LP branch and bound",
          "dominated", "signature", "incumbent", "cutoff")


def _plan(tmp_path, capsys, name: str, *args: str) -> tuple[str, dict]:
    """`autoddl plan` with ``args`` into ``tmp_path/name``: (its output, the plan file)."""
    path = tmp_path / name
    assert main(["plan", *args, "--workers", "1", "-o", str(path)]) == 0
    return capsys.readouterr().out, json.loads(path.read_text())


def _notes(out: str) -> str:
    """The "how to read these numbers" block of a summary, on one line."""
    start = out.index("how to read these numbers")
    return " ".join(out[start:out.index("\nprecision", start)].split())


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """The README's 2-stage pipelined plan: (`plan`'s output, the plan file, its path)."""
    tmp = tmp_path_factory.mktemp("pp")
    path = tmp / "pp.json"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--model", PP_MODEL, "--cluster", "cpu:devices=4", "--stages", "2",
                     "--microbatches", "4", "--workers", "1", "-o", str(path)]) == 0
    return out.getvalue(), json.loads(path.read_text()), path


def test_pipelined_plan_says_what_each_number_is(pipelined, capsys):
    """The step time (objective) is below the compute here: the summary says that compute and
    communication add every stage's work while the stages run side by side, and how the step
    is priced; the formula it states holds for the plan's own numbers."""
    out, data, path = pipelined
    c, k, m = data["cost"], data["pipeline"]["stages"], data["pipeline"]["microbatches"]
    v = data["pipeline"].get("interleave", 1)
    assert c["compute_s"] > c["total_s"], "the case that needs the words"
    notes = _notes(out)
    assert f"the {k} pipeline stages run side by side" in notes, notes
    assert "compute, communication each stage's" in notes and "added up" in notes
    assert "may exceed the step time" in notes
    assert "1F1B as the ILP prices it" in notes and "the slowest stage" in notes
    # the slowest stage's time per micro-batch, printed, and the 1F1B step it states: every
    # stage once, then m - 1/v more passes of the slowest (no weight traffic to hide on cpu)
    t = c["stage_time_s"]
    from autoddl.engine.plan import format_seconds

    assert f"({format_seconds(t)} per micro-batch)" in notes, notes
    assert f"then {m - 1 / v:g} more passes" in notes
    assert m * t * (1 - 1e-9) <= c["total_s"] <= (m + (k - 1) / v) * t * (1 + 1e-9)
    assert "estimated step time the same formula on this plan (equal to the step time)" in notes
    assert c["step_time_s"] == pytest.approx(c["total_s"], rel=1e-9)
    assert main(["show", str(path)]) == 0
    assert _notes(capsys.readouterr().out) == notes
    # 2 layers per stage, 2 stages: no layer stands for another, the proof has no proviso
    assert "share one" not in out


@pytest.mark.parametrize("stages,layers,interleave,words", [
    (2, 4, 1, None), (1, 5, 1, "whose 3 middle layers of `blocks` share one strategy"),
    (4, 24, 1, "stages 1–2 share one strategy and the 4 middle layers of `blocks` on each stage "
               "share one"),
    (2, 8, 2, "the 2 middle layers of `blocks` on each pipeline rank share one"),
    (3, 6, 1, None), (4, 4, 1, "stages 1–2 share one strategy)"),
])
def test_proof_proviso_names_what_is_shared(stages, layers, interleave, words):
    """Where repeated layers were solved once, the proof's proviso says which layers share a
    strategy: the middle ones unpipelined; pipelined, the middle stages and the middle layers
    of each stage (none with 2 layers per stage on 2 stages)."""
    from types import SimpleNamespace

    from autoddl.engine.provenance import repeat_line

    pipeline = None if stages == 1 else {"stages": stages, "layers_per_stage": layers // stages}
    plan = SimpleNamespace(model={"repeat": {"layers": layers, "container": "blocks"}},
                           pipeline=pipeline, num_stages=stages, interleave=interleave)
    text = " ".join(repeat_line(plan))
    assert (words in text) if words else text == "", text


def test_operator_staged_pipeline_says_why_its_estimate_is_lower(tmp_path, capsys):
    """A pipeline staged operator by operator (3 layers do not divide into 2 stages): the
    objective adds every stage's work in turn, the estimate runs the stages side by side; both
    as the words say."""
    out, data = _plan(tmp_path, capsys, "mlp.json", "--model",
                      "mlp:batch=8,dim_in=8,hidden=8,layers=3,dim_out=8", "--cluster",
                      "cpu:devices=2", "--stages", "2", "--microbatches", "2")
    c, k, m = data["cost"], data["pipeline"]["stages"], data["pipeline"]["microbatches"]
    assert "layers_per_stage" not in data["pipeline"], "staged operator by operator"
    notes = _notes(out)
    assert "added as if one device ran them in turn" in notes, notes
    assert c["total_s"] == pytest.approx(c["compute_s"] + c["bandwidth_s"] + c["bubble_s"],
                                         rel=1e-9)
    assert f"{m + k - 1} passes of its slowest stage" in notes
    assert c["step_time_s"] == pytest.approx((m + k - 1) * c["stage_time_s"], rel=1e-9)
    assert c["step_time_s"] < c["total_s"]
    assert "lower than the step time because the stages work at the same time" in notes


def _table_rows(shown: str) -> list[tuple[str, str, str]]:
    """(stage, node, module) of each op row of `show`'s table of a pipelined plan."""
    rows = []
    for line in shown[shown.index("\nstage  node"):].splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and not line.startswith("--"):
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def _layer_of(module: str) -> str | None:
    """The layer index text of a ``blocks.<i>...`` module path (``3``, ``{1..3}``), or None."""
    m = re.match(r"blocks\.(\{[^}]*\}|\d+)", module)
    return m.group(1) if m else None


@pytest.mark.parametrize("extra,per_chunk", [((), 2), (("--interleave", "2"), 1)])
def test_representatives_name_their_real_layers_and_stages(tmp_path, capsys, pipelined,
                                                          extra, per_chunk):
    """Pipelined over 2 stages, 4 layers: every layer op of `show` names its own layer (each
    of blocks.0..3 once per position) and the stage (chunk) it runs in: layer i in chunk
    i // (layers per chunk), as the README's schedule puts it."""
    if extra:
        _plan(tmp_path, capsys, "ipp.json", "--model", PP_MODEL, "--cluster", "cpu:devices=4",
              "--stages", "2", "--microbatches", "4", *extra)
        path = tmp_path / "ipp.json"
    else:
        path = pipelined[2]
    assert main(["show", str(path)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    layered = [(int(stage), int(_layer_of(mod))) for stage, _, mod in rows if _layer_of(mod)]
    assert sorted({i for _, i in layered}) == [0, 1, 2, 3], rows
    counts = {i: sum(1 for _, j in layered if j == i) for i in range(4)}
    assert len(set(counts.values())) == 1, counts  # each layer once per position in a block
    assert all(stage == i // per_chunk for stage, i in layered), layered


def test_flat_plan_names_first_middle_and_last_layers(tmp_path, capsys):
    """Unpipelined, 5 layers: the first layer's ops say blocks.0, the middle ones' (one shown
    for three alike) blocks.{1..3}, the last's blocks.4; parameters too."""
    _, data = _plan(tmp_path, capsys, "flat.json", "--model",
                    "gpt:layers=5,hidden=32,heads=2,seq=8,batch=4,vocab=64", "--cluster",
                    "cpu:devices=2")
    want = {"first": "0", "mid": "{1..3}", "last": "4"}
    seen = set()
    for o in data["ops"]:
        group = o["name"].split("/")[0]
        if group in want and o.get("module", "").startswith("blocks."):
            assert _layer_of(o["module"]) == want[group], o
            seen.add(group)
    assert seen == set(want)
    assert any(o.get("module") == "blocks.{1..3}.fc1.weight" for o in data["ops"])


def test_summary_has_no_solver_jargon(pipelined, capsys):
    """The solver lines say what found the plan and what proved it in words; none of the
    solver's internal names (tree relaxation, LP, integral, dominated, ...) is printed."""
    out = pipelined[0]
    assert "plan found by " in out and "bound proven by " in out
    for phrase in JARGON:
        assert phrase not in out, phrase


@pytest.mark.parametrize("name", ["screening (rounded tree relaxation)", "highs (LP)",
                                  "highs (LP, integral)", "highs (LP branch and bound)",
                                  "ortools-cbc"])
def test_every_recorded_solver_reads_in_words(name):
    """Each solver name a plan file records reads as words in the summary, the parenthesised
    internals left out."""
    from autoddl.engine.provenance import finder_words, provenance_lines

    from autoddl.engine.provenance import SCREENING_FINDER

    solvers = {"ortools-cbc" if name == SCREENING_FINDER else name: 2}  # no ILP solver itself
    lines = " ".join(" ".join(provenance_lines({
        "backend": name, "ilps_solved": 2, "ilp_solvers": solvers,
        "candidates_bounded": 1})).split())
    assert "plan found by" in lines and "bound proven by 2 ILPs" in lines, lines
    assert "ruled out 1 candidate mesh without an ILP" in lines
    inner = name.partition(" (")[2]
    assert not inner or inner not in lines, lines
    assert finder_words(name) in lines


def _cells(png, axes: int) -> list[list[str]]:
    """Per mesh axis of a flat plot (the grid's pixel columns of placement colours, split in
    ``axes`` equal columns), the placement of each cell from top to bottom (cells are
    separated by white lines)."""
    import numpy as np
    from matplotlib.colors import to_rgb

    from autoddl.engine.show import _PLACED

    img = np.asarray(png)[..., :3].astype(float)
    kind = np.full(img.shape[:2], "", dtype=object)
    for name, colour in _PLACED.items():
        kind[np.abs(img - np.array(to_rgb(colour))).max(axis=-1) < 0.02] = name
    filled = np.nonzero((kind != "").sum(axis=0) >= img.shape[0] // 3)[0]
    left, width = filled.min(), (filled.max() + 1 - filled.min()) / axes
    columns = []
    for j in range(axes):
        runs, prev = [], ""
        for y in range(img.shape[0]):
            k = kind[y, int(left + j * width) + 3]
            if k and k != prev:
                runs.append([k, 0])
            if k:
                runs[-1][1] += 1
            prev = k
        runs = [r for r in runs if r[1] > 3]  # not a grey pixel of antialiased text
        assert all(h >= 10 for _, h in runs), "a cell less than 10 pixels high"
        columns.append([k for k, _ in runs])
    return columns


def test_flat_plot_shows_each_ops_placement_per_axis(tmp_path, capsys, monkeypatch):
    """`show --plot` of a flat plan: a cell per op and mesh axis, coloured as the plan places
    the op's output on that axis (read back from the PNG's pixels), and every op's row named
    by its module and operator."""
    import matplotlib.image

    from autoddl.engine import show
    from autoddl.engine.plan import load_plan

    _plan(tmp_path, capsys, "flat.json", "--model",
          "gpt:layers=4,hidden=64,heads=4,seq=16,batch=8,vocab=128", "--cluster",
          "cpu:devices=4", "--stages", "1")
    plan = load_plan(tmp_path / "flat.json")
    ops = [o for o in plan.ops if o.target not in ("param", "input")]
    assert len(ops) > 50
    from autoddl.engine import compare

    kept, saver = {}, compare.save_figure

    def keep(fig, path):
        kept["fig"] = fig
        saver(fig, path)

    monkeypatch.setattr(compare, "save_figure", keep)
    assert main(["show", str(tmp_path / "flat.json"), "--plot", str(tmp_path / "f.png")]) == 0
    columns = _cells(matplotlib.image.imread(tmp_path / "f.png"), len(plan.axis_names))
    for axis, column in zip(plan.axis_names, columns):
        assert column == [show._axis_placed(o.out[axis]) for o in ops], axis
    grid = kept["fig"].axes[0]
    labels = [t.get_text() for t in grid.get_yticklabels()]
    assert len(labels) == len(ops)
    for o, label in zip(ops, labels):
        assert label.split()[-1] in o.target and (not o.module or label.startswith(o.module))
    assert any(label.startswith("blocks.{1,2}.fc1") for label in labels), labels

    # two mesh axes, each op placed at random on the second: both columns read back
    import dataclasses
    import random

    rng = random.Random(0)
    axis = plan.mesh["axes"][0]
    two = dataclasses.replace(plan, mesh={**plan.mesh, "axes": [
        {**axis, "name": "x", "size": 2}, {**axis, "name": "y", "size": 2}]}, ops=tuple(
        dataclasses.replace(o, out={"x": o.out[plan.axis_names[0]],
                                    "y": rng.choice(["B", "P", "S(1)"])}) for o in plan.ops))
    show.plot_plan(two, tmp_path / "two.png")
    columns = _cells(matplotlib.image.imread(tmp_path / "two.png"), 2)
    for axis_name, column in zip("xy", columns):
        want = [show._axis_placed(o.out[axis_name]) for o in two.ops
                if o.target not in ("param", "input")]
        assert column == want, axis_name


_HF_MODEL = '''
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def _config():
    return GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32)


def as_given():
    ids = torch.randint(0, 32, (4, 8))
    return GPT2LMHeadModel(_config()), {"input_ids": ids, "labels": ids}


class Loss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.m = GPT2LMHeadModel(_config())

    def forward(self, input_ids, labels):
        return self.m(input_ids=input_ids, labels=labels).loss


def wrapped():
    ids = torch.randint(0, 32, (4, 8))
    return Loss(), (ids, ids)
'''


def test_hugging_face_file_model(tmp_path, capsys):
    """A Hugging Face model in a file: as Hugging Face gives it (forward returns an output
    object), the error says to return its loss; wrapped, it plans without transformers'
    loss_type note on stderr."""
    pytest.importorskip("transformers")
    (tmp_path / "hf.py").write_text(_HF_MODEL)
    argv = ["plan", "--cluster", "cpu:devices=2", "--workers", "1", "-o", str(tmp_path / "p.json")]
    assert main([*argv, "--model", f"{tmp_path / 'hf.py'}:as_given"]) == 2
    err = capsys.readouterr().err
    assert "must return the training loss" in err and "`model(**inputs).loss`" in err, err
    import logging

    from transformers.utils.logging import warning_once

    warning_once.cache_clear()  # the note is logged once per process: not skipped as seen
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        assert main([*argv, "--model", f"{tmp_path / 'hf.py'}:wrapped"]) == 0
    finally:
        logger.removeHandler(handler)
    out, err = capsys.readouterr()
    assert "plan written to" in out
    assert "loss_type" not in err and not [m for m in seen if "loss_type" in m], (err, seen)
