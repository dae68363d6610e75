"""What a new user meets first (issue 18): every option explained, ``--version``, spec typos
reported before torch is imported, outputs that say when they replaced a file, a solver line
that says what found the plan and what proved it, one unit for bytes, random draws named before
``run --check``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoddl import __version__
from autoddl.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
TINY = "mlp:batch=8,dim_in=4,hidden=8,layers=1,dim_out=4"


def _actions(parser: argparse.ArgumentParser, where: str = "autoddl"):
    """(command, action) of every option and positional of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        else:
            yield where, action


def test_every_option_has_help():
    missing = [f"{where} {'/'.join(a.option_strings) or a.dest}"
               for where, a in _actions(build_parser())
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"options without help text: {missing}"


def test_output_help_states_the_default():
    for where, a in _actions(build_parser()):
        if "-o" in a.option_strings and a.default is not None:
            assert str(a.default) in a.help and "replaced" in a.help, (where, a.help)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"autoddl {__version__}"


# a wrapper that runs the command line, then says whether torch was imported
_PROBE = ("import sys; from autoddl.cli import main; rc = main(sys.argv[1:]); "
          "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")


@pytest.mark.parametrize("model,cluster,fragment", [
    ("gpt:layerz=2", "cpu:devices=4", "'layerz'"),
    ("gtp", "cpu:devices=4", "unknown model 'gtp'"),
    ("gpt", "cpu:device=4", "'device'"),
    ("vgg:depth=12", "cpu:devices=4", "depth=12"),
    ("missing_file.py:make", "cpu:devices=4", "not found"),
])
def test_spec_errors_come_before_torch(tmp_path, model, cluster, fragment):
    """A typo in a spec is reported without importing torch (which takes seconds)."""
    for command in ("plan", "compare"):
        p = subprocess.run([sys.executable, "-c", _PROBE, command, "--model", model,
                            "--cluster", cluster], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("autoddl: error: ") and fragment in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == 1, p.stderr
        assert p.stdout.strip() == "NO-TORCH", f"{command}: torch imported before the error"


def test_plan_says_it_replaced_the_default_file(tmp_path, monkeypatch, capsys):
    """Without -o the plan goes to ./plan.json; a file there is replaced, and the output says
    so (and says nothing of the kind when the file is new)."""
    monkeypatch.chdir(tmp_path)
    argv = ["plan", "--model", TINY, "--cluster", "cpu:devices=2", "--workers", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "plan written to " in first and "(replaced" not in first, first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert f"plan written to {tmp_path / 'plan.json'} (replaced the file that was there)" \
        in second, second
    solver = json.loads((tmp_path / "plan.json").read_text())["solver"]
    # the solver line says what found the plan and what proved its bound
    from autoddl.engine.provenance import finder_words

    assert "plan found by " + " ".join(finder_words(solver["backend"]).split()) in " ".join(
        second.split())
    assert "bound proven by " in second
    assert solver["ilps_solved"] == sum(solver["ilp_solvers"].values())
    assert " GB " not in second, "memory in GiB, not GB"


def test_backends_describes_the_default_search(capsys):
    from autoddl.formulations.backends import default_backend

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "(default)" not in out
    assert f"{default_backend()}" in out and "branch and bound" in out, out
    assert "without --backend" in out


def test_calibrate_summary_explains_the_residual_and_uses_gib():
    from autoddl.engine.cluster import parse_cluster
    from autoddl.runtime.calibrate import LinkFit, summary

    cluster = parse_cluster("cpu:devices=2,memory_gb=12.64")
    text = summary(cluster, {"intra": LinkFit(3.0, 2e-5, 0.542, 40)}, {"intra": 2})
    assert "54.2%" in text and "residual: root-mean-square relative difference" in text
    assert "11.77 GiB" in text or "11.8 GiB" in text, text
    assert " GB per device" not in text


def test_random_draws_are_named():
    """A model with dropout > 0 is named before `run --check`; dropout 0 is not."""
    import torch

    from autoddl.engine.capture import export
    from autoddl.engine.normalize import random_draws_line

    class Net(torch.nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.drop = torch.nn.Dropout(p)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(x)).sum()

    x = torch.randn(2, 4)
    line = random_draws_line(export(Net(0.1), (x,)))
    assert line.startswith("note: the model draws random numbers") and "p=0.1" in line, line
    assert random_draws_line(export(Net(0.0), (x,))) == ""


def test_ops_per_stage_names_the_shared_middle_stages():
    """A 4-stage plan of repeated layers shows the program it solved: stage 1 stands for the
    middle stages, and the line says so instead of printing a bare 0."""
    from types import SimpleNamespace

    from autoddl.engine.plan import _ops_per_stage

    ops = [SimpleNamespace(stage=k, target="aten.mm.default")
           for k, n in enumerate((3, 2, 0, 4)) for _ in range(n)]
    text = _ops_per_stage(SimpleNamespace(interleave=1, num_chunks=4, ops=ops))
    assert text == ("ops per stage of the solved program: 3, 2 (each of stages 1..2: they "
                    "share one strategy), 4"), text
    flat = _ops_per_stage(SimpleNamespace(interleave=1, num_chunks=2, ops=ops[:5]))
    assert flat == "ops per stage: 3, 2"


def test_plan_file_and_show_carry_module_paths(tmp_path, capsys):
    """Every op of a `gpt:` plan names the module it was called in (parameters their qualified
    name), in the file and in `show`; a file without the field (older autoddl) still loads."""
    from autoddl.engine.plan import load_plan

    path = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt:layers=2,hidden=32,heads=2,seq=8,batch=4,vocab=64",
                 "--cluster", "cpu:devices=2", "--workers", "1", "-o", str(path)]) == 0
    capsys.readouterr()
    data = json.loads(path.read_text())
    modules = {o["name"]: o.get("module", "") for o in data["ops"]}
    assert "blocks.0.qkv" in modules.values() and "blocks.1.fc2" in modules.values(), modules
    assert "blocks.0.qkv.weight" in modules.values(), "parameters carry their qualified name"
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "module" in shown and "blocks.0.qkv" in shown and "blocks.1.fc1" in shown, shown
    for o in data["ops"]:
        o.pop("module", None)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert all(o.module == "" for o in load_plan(old).ops)
    assert main(["show", str(old)]) == 0
    assert "blocks.0.qkv " not in capsys.readouterr().out


def _bar_rows(png) -> list[tuple[int, int]]:
    """The runs of pixel rows of a stage plot holding a wide stretch of bar colour."""
    import numpy as np
    from matplotlib.colors import to_rgb

    from autoddl.engine.show import _PLACED

    img = np.asarray(png)[..., :3].astype(float)
    mask = np.zeros(img.shape[:2], dtype=bool)
    for colour in _PLACED.values():
        mask |= np.abs(img - np.array(to_rgb(colour))).max(axis=-1) < 0.02
    wide = mask.sum(axis=1) >= 60  # legend patches are narrower than that
    runs, start = [], None
    for y, on in enumerate(list(wide) + [False]):
        if on and start is None:
            start = y
        elif not on and start is not None:
            runs.append((start, y))
            start = None
    return runs


def test_plot_of_a_pipelined_plan_draws_every_stage(tmp_path, capsys, monkeypatch):
    """`show --plot` of a 4-stage plan draws bars in each stage's band (stages 1 and 2 share
    the middle strategy of a plan of repeated layers) and says nothing of tight layout; a flat
    plan's plot names its operators."""
    import warnings

    import matplotlib.image

    from autoddl.engine.plan import load_plan
    from autoddl.engine.show import plot_plan

    path = tmp_path / "pp.json"
    assert main(["plan", "--model", "gpt:layers=4,hidden=32,heads=2,seq=8,batch=8,vocab=64",
                 "--cluster", "cpu:devices=4", "--stages", "4", "--workers", "1",
                 "-o", str(path)]) == 0
    plan = load_plan(path)
    assert plan.num_stages == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_plan(plan, tmp_path / "pp.png")
    runs = _bar_rows(matplotlib.image.imread(tmp_path / "pp.png"))
    assert len(runs) == 4, f"bands of bars at pixel rows {runs}, not one per stage"
    assert all(b - a >= 10 for a, b in runs), runs

    flat = tmp_path / "flat.json"
    assert main(["plan", "--model", TINY, "--cluster", "cpu:devices=2", "--workers", "1",
                 "-o", str(flat)]) == 0
    capsys.readouterr()
    import matplotlib.pyplot as plt

    from autoddl.engine import show

    labels: list[str] = []
    real = plt.Axes.set_yticks

    def spy(ax, ticks, names=None, **kw):
        labels.extend(names or [])
        return real(ax, ticks, names, **kw)

    monkeypatch.setattr(plt.Axes, "set_yticks", spy)
    show.plot_plan(load_plan(flat), tmp_path / "flat.png")
    assert any("linear" in t for t in labels), labels


_KEYWORD_MODEL = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, input_ids, labels=None, scale=None):
        return ((self.fc(input_ids) * scale - labels) ** 2).mean()


def as_dict():
    return Net(), {"input_ids": torch.randn(4, 8), "labels": torch.randn(4, 8),
                   "scale": torch.ones(8)}


def as_triple():
    return Net(), (torch.randn(4, 8),), {"labels": torch.randn(4, 8), "scale": torch.ones(8)}
'''


@pytest.mark.parametrize("factory", ["as_dict", "as_triple"])
def test_file_model_with_keyword_inputs(tmp_path, capsys, factory):
    """A file model's factory may return (model, kwargs) or (model, args, kwargs)."""
    (tmp_path / "kw.py").write_text(_KEYWORD_MODEL)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", f"{tmp_path / 'kw.py'}:{factory}", "--cluster",
                 "cpu:devices=2", "--workers", "1", "-o", str(out)]) == 0
    assert "plan written to" in capsys.readouterr().out
    modules = {o.get("module") for o in json.loads(out.read_text())["ops"]}
    assert any(m and m.endswith("fc") for m in modules), modules


_ENCODER_MODEL = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2)

    def forward(self, x):
        return self.enc(x).pow(2).mean()


def make():
    return Net(), (torch.randn(2, 4, 16),)
'''


def test_transformer_encoder_plans_without_the_fake_tensor_warning(tmp_path, capsys):
    import warnings

    (tmp_path / "enc.py").write_text(_ENCODER_MODEL)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["plan", "--model", f"{tmp_path / 'enc.py'}:make", "--cluster",
                     "cpu:devices=2", "--workers", "1", "-o", str(tmp_path / "p.json")]) == 0
    assert not [w for w in seen if "data pointer of FakeTensor" in str(w.message)], \
        [str(w.message) for w in seen]
    assert "FakeTensor" not in capsys.readouterr().err


def test_compare_plot_ticks_are_plain_ratios_and_labels_stay_inside(monkeypatch, tmp_path):
    """The comparison chart's log axis reads "1×", "2×", not "2×10⁰"; every bar's ratio label
    lies inside the axes."""
    from autoddl.engine import compare as cmp

    kept = {}
    monkeypatch.setattr(cmp, "save_figure", lambda fig, path: kept.setdefault("fig", fig))
    rows = [cmp.Row(cmp.ILP, ratio=1.0, fits=True), cmp.Row("DDP", ratio=3.7, fits=True),
            cmp.Row("ZeRO-3 (FSDP)", ratio=15.0, fits=True), cmp.Row("greedy", ratio=None)]
    cmp.plot(rows, tmp_path / "c.png", "title")
    fig = kept["fig"]
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels(which="both") if t.get_text()]
    assert labels and all(t.endswith("×") and float(t[:-1]) > 0 for t in labels)  # no 2×10⁰
    box = ax.get_window_extent()
    for text in ax.texts:
        extent = text.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1


def test_attention_without_dropout_draws_nothing():
    """Attention called with its mask and flags positional (dropout_p is argument 4, after the
    mask) is named only when dropout_p > 0: no false note on a causal model without dropout."""
    import torch
    import torch.nn.functional as F

    from autoddl.engine.capture import export
    from autoddl.engine.normalize import random_draws_line

    class Attn(torch.nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 8)
            self.p = p

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.qkv(x).view(2, 1, 4, 8)
            return F.scaled_dot_product_attention(q, q, q, None, self.p, True).sum()

    x = torch.randn(2, 4, 8)
    assert random_draws_line(export(Attn(0.0), (x,))) == ""
    assert "p=0.1" in random_draws_line(export(Attn(0.1), (x,)))


def test_compare_table_explains_its_columns():
    """The compare table says that communication counts hidden traffic too (so compute plus
    communication may exceed the step) and what "× ILP" is."""
    from autoddl.engine.compare import ILP, Row, table

    text = table([Row(ILP, total_s=1e-3, compute_s=9e-4, bandwidth_s=3e-4, ratio=1.0)])
    words = " ".join(text.split())
    assert "hidden behind compute" in words and "× ILP: step time over the ILP plan's" in words
