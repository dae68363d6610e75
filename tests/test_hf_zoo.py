"""The Hugging Face zoo by name (issue 16): ``--model hf:MODEL_TYPE:key=value,...``.

Every decoder and encoder family below is built from its config at a tiny size, captured and
planned in this process on a 2×2 mesh (batch 2, so the second axis must shard something else:
tensor-parallel weights in most families), and then all of them run ``autoddl run --check``'s
code (:func:`autoddl.runtime.worker.run`) on 4 gloo ranks in one torchrun launch
(``tests/hf_ranks.py``): loss and every gradient against one process on the whole batch, and
the bytes per (mesh axis, kind) against the plan. The launch's output is split per family, so
each family has its own test. All of these tests share the one launch: they run in one xdist
group.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autoddl.engine import baselines
from autoddl.engine.capture import capture, export
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import Plan, save_plan
from autoddl.engine.planner import plan_graph
from autoddl.engine.workload import Workload
from autoddl.engine.zoo import ensure_torchvision_importable
from autoddl.errors import UserError
from autoddl.runtime.launch import torchrun_command
from tests.helpers import check_byte_table, cluster

ensure_torchvision_importable()
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TINY = "layers=2,hidden=32,heads=4,seq=16,batch=2,vocab=64"
#: family -> extra keys (grouped-query and multi-query attention where the family has it)
FAMILIES = {
    "gpt2": "", "gpt_neox": "", "gptj": "", "llama": "", "mistral": ",kv_heads=2",
    "qwen2": ",kv_heads=2", "gemma": ",kv_heads=1", "phi": "", "falcon": "", "bloom": "",
    "opt": "", "bert": "", "roberta": "", "electra": "",
}
pytestmark = pytest.mark.xdist_group("hf_zoo")


def _spec(family: str) -> str:
    return f"hf:{family}:{TINY}{FAMILIES[family]}"


@functools.lru_cache(maxsize=None)
def _planned(family: str) -> tuple[object, Plan, int]:
    """The family's captured graph, its plan on a 2×2 mesh and the model's own count of
    distinct parameters (tied weights once)."""
    spec = parse_model_spec(_spec(family))
    model, inputs = build_model(spec, "meta")
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    graph = capture(model, inputs)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, meshes=[c.mesh((2, 2))], workers=1)
    return graph, plan, params


@pytest.fixture(scope="module")
def checked_runs(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """family -> (its part of the one torchrun launch's output, its plan file)."""
    folder = tmp_path_factory.mktemp("hf_plans")
    paths = {}
    for family in FAMILIES:
        paths[family] = folder / f"{family}.json"
        save_plan(_planned(family)[1], paths[family])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(torchrun_command("tests.hf_ranks", 4, [str(p) for p in paths.values()]),
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = re.split(r"^=== (\S+)\n", proc.stdout, flags=re.M)
    by_path = dict(zip(parts[1::2], parts[2::2]))
    return {f: (by_path.get(str(p), ""), p) for f, p in paths.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_captured_and_planned(family):
    """Captured whole (the graph's parameters are the model's), planned no worse than data
    parallelism under the same cost model."""
    graph, plan, params = _planned(family)
    assert graph.param_count == params == plan.model["num_params"]
    work = Workload(plan.model["spec"], graph, cluster(devices=4, latency_s=1e-6,
                                                       peak_flops=1e10))
    ddp = baselines.data_parallel(work)
    if ddp.plan is not None and ddp.fits:
        assert plan.cost["total_s"] <= ddp.plan.cost["total_s"] * (1 + 1e-6)


@pytest.mark.dist
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_runs_checked_on_4_gloo_ranks(family, checked_runs):
    """``run --check``'s step on 4 ranks: loss and gradients within 1e-5 of one process, and
    every (mesh axis, kind) of collectives as the plan predicts."""
    out, path = checked_runs[family]
    assert "check PASSED" in out and "=== exit 0" in out, out
    assert re.search(r"^step 0: loss", out, re.M), out
    check_byte_table(out, path)


def test_most_families_shard_weights():
    """The runs check more than data parallelism: on the second mesh axis most families'
    plans split weights (tensor parallelism)."""
    split = [f for f in FAMILIES if any(
        o.target == "param" and any(p.startswith("S(") for p in o.out.values())
        for o in _planned(f)[1].ops)]
    assert len(split) >= len(FAMILIES) - 3, split


SPEC_MISTAKES = {
    "hf:lama": "did you mean llama or ",
    "hf:": "no model type",
    "hf:gpt2:layers=x": "layers='x' is not an integer",
    "hf:gpt2:hidden=30": "hidden=30 is not divisible by heads=4",
    "hf:llama:heads=4,kv_heads=3": "heads=4 is not a multiple of kv_heads=3",
    "hf:gpt2:head=seq2seq": "choose causal or masked",
    "hf:gpt2:layers": "'layers' is not key=value",
    "hf:gpt2:a-b=1": "'a-b' is not a key name",
}


def test_spec_mistakes_are_one_line_before_torch():
    """Each mistake is one line naming it, found without importing torch (one process)."""
    code = ("import sys; from autoddl.model_specs import parse_model_spec\n"
            f"for spec in {list(SPEC_MISTAKES)!r}:\n"
            "    try:\n        parse_model_spec(spec)\n    except ValueError as e:\n"
            "        print(e)\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60).stdout.splitlines()
    assert out[-1] == "NO-TORCH" and len(out) == len(SPEC_MISTAKES) + 1, out
    for line, fragment in zip(out, SPEC_MISTAKES.values()):
        assert fragment in line, (fragment, line)
    assert "transformers has no causal or masked LM of model type 'lama'" in out[0]
    assert "causal LM types: " in out[0] and "masked LM types: " in out[0]


@pytest.mark.parametrize("spec, fragment", [
    ("hf:gpt2:n_embdd=4", "'n_embdd' is not a key of GPT2Config"),
    ("hf:gpt2:n_embd=48", "n_embd is set by autoddl's key hidden="),
    ("hf:gpt2:kv_heads=2", "GPT2Config has none of num_key_value_heads"),
    ("hf:gpt2:head=masked", "no masked LM of this type; give head=causal"),
    ("hf:opt:layerdrop=0.1", "branches on a random draw in training (modeling_opt.py"),
])
def test_build_mistakes_are_one_line(spec, fragment):
    with pytest.raises(UserError) as info:
        capture(*build_model(parse_model_spec(spec), "meta"))
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_config_takes_the_keys_under_each_familys_names():
    """autoddl's keys under GPT-2's and Falcon's names, a raw key, the head, dropout 0."""
    from autoddl.engine.hf_zoo import hf_config

    gpt2, head, _ = hf_config("gpt2", dict(parse_model_spec(
        "hf:gpt2:layers=3,hidden=48,heads=6,ffn=96,seq=20,vocab=128,activation_function=relu"
    ).params))
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_inner, gpt2.n_positions) == \
        (3, 48, 6, 96, 20)
    assert gpt2.activation_function == "relu" and head == "causal" and gpt2.resid_pdrop == 0
    falcon, _, _ = hf_config("falcon", dict(parse_model_spec("hf:falcon:kv_heads=2").params))
    assert (falcon.num_kv_heads, falcon.ffn_hidden_size) == (2, 256)
    roberta, head, _ = hf_config("roberta", dict(parse_model_spec("hf:roberta:seq=16").params))
    assert head == "masked" and roberta.max_position_embeddings == 16 + 2  # padding offset


def test_layerdrop_one_captures_the_skipped_layers_and_zero_all_of_them():
    """OPT's layer drop with a certain outcome: 1 skips every layer (no layer's weights are
    read), 0 runs them all; the draws are not left in the graph."""
    every = capture(*build_model(parse_model_spec(_spec("opt") + ",layerdrop=1"), "meta"))
    none = _planned("opt")[0]
    assert not any(n.fqn.startswith("model.model.decoder.layers.") for n in every.params)
    assert sum(n.fqn.startswith("model.model.decoder.layers.") for n in none.params) == 32
    assert not any("rand" in n.target for g in (every, none) for n in g.ops)


@pytest.mark.parametrize("compare", ["lt", "le", "gt", "ge"])
def test_a_draw_compared_with_a_number_converts_to_its_certain_outcome(compare):
    """Under :class:`FixedDraws` a ``torch.rand`` draw compared with c converts to the outcome
    every draw in [0, 1) gives — found here by trying draws 0, 1e-7, 0.5 and 1-1e-7 — and is
    refused where the outcome varies; the reflected form (``c > draw``) likewise. On fake
    tensors, as in an export: without the mode, converting would fail."""
    import operator as op

    from torch._subclasses.fake_tensor import FakeTensorMode

    from autoddl.engine.draws import FixedDraws

    fn = getattr(op, compare)
    flipped = {"lt": op.gt, "le": op.ge, "gt": op.lt, "ge": op.le}[compare]
    for c in (-0.5, 0.0, 1e-9, 0.5, 1.0, 1.5):
        outcomes = {fn(u, c) for u in (0.0, 1e-7, 0.5, 1 - 1e-7)}
        for expr in (lambda d: fn(d, c), lambda d: flipped(c, d)):
            with FakeTensorMode(), FixedDraws():
                draw = torch.rand([])
                if len(outcomes) == 1:
                    assert bool(expr(draw)) == next(iter(outcomes)), (compare, c)
                else:
                    with pytest.raises(UserError, match="random draw"):
                        bool(expr(draw))


FILE_MODELS = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel

def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(cfg).train(), torch.randint(0, 32, (2, 8))

def output():
    model, ids = _gpt2()
    return model, {"input_ids": ids, "labels": ids}

def as_tuple():
    model, ids = _gpt2()
    model.config.return_dict = False
    return model, {"input_ids": ids, "labels": ids}

def no_labels():
    model, ids = _gpt2()
    return model, {"input_ids": ids}
"""


@pytest.mark.parametrize("factory", ["output", "as_tuple"])
def test_file_model_may_return_a_model_output_or_a_tuple(tmp_path, factory):
    """The loss is taken from ``.loss`` or the tuple's first item: the captured graph computes
    the next-token cross-entropy of the logits; no wrapper module is added for it."""
    from autoddl.engine.capture import graph_from_export
    from tests.test_zoo import run_graph

    src = tmp_path / "hf_model.py"
    src.write_text(textwrap.dedent(FILE_MODELS))
    model, inputs = build_model(parse_model_spec(f"{src}:{factory}"), "cpu")
    ep = export(model, inputs)
    graph = graph_from_export(ep)
    # KeywordInputs' "model." and the model's own names: no wrapper for the loss
    assert {n.fqn.split(".")[1] for n in graph.params} == {"transformer", "lm_head"}
    ids = inputs[0]
    with torch.no_grad():
        hf = model.model  # its class's forward: the instance's returns the loss only
        logits = type(hf).forward(hf, input_ids=ids, return_dict=True).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32),
                                                 ids[:, 1:].reshape(-1))
        torch.testing.assert_close(run_graph(ep, graph, model, inputs), want)


def test_file_model_output_without_a_loss_says_to_pass_labels(tmp_path):
    src = tmp_path / "hf_model.py"
    src.write_text(textwrap.dedent(FILE_MODELS))
    with pytest.raises(UserError, match="without a loss .*pass the labels"):
        export(*build_model(parse_model_spec(f"{src}:no_labels"), "meta"))
