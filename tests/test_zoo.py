"""Library models (Hugging Face, torchvision, timm) and ``file.py:factory`` models.

Each is captured at a small configuration and checked two ways: the captured graph, run op by op
on whole tensors from its constant leaves and parameters, gives the model's own loss (so the
rewrites of split views, in-place operators and constants keep the values); and its plan costs no
more than data parallelism and full replication under the same cost model (both are in the ILP's
space). The byte-checked multi-process run of Hugging Face GPT-2 is at the end.
"""

from __future__ import annotations

import operator
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from autoddl.engine import baselines
from autoddl.engine.capture import capture, export, graph_from_export, leaf_values
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import save_plan
from autoddl.engine.planner import plan_graph
from autoddl.engine.mesh_signatures import fallback_ops
from autoddl.engine.workload import Workload
from autoddl.engine.zoo import ensure_torchvision_importable
from autoddl.errors import NoRuleError, UserError
from tests.helpers import cluster, run_checked

ensure_torchvision_importable()
for _lib in ("transformers", "timm", "torchvision"):  # the models extra
    pytest.importorskip(_lib)

SMALL = {
    "hf-gpt2": "hf-gpt2:layers=2,hidden=32,heads=4,seq=16,batch=4,vocab=64",
    "hf-bert": "hf-bert:layers=2,hidden=32,heads=4,seq=16,batch=4,vocab=64",
    "hf-llama": "hf-llama:layers=2,hidden=32,heads=4,kv_heads=2,ffn=64,seq=16,batch=4,vocab=64",
    "tv-resnet50": "tv-resnet50:batch=2,image=32,classes=10",
    "tv-vgg16": "tv-vgg16:batch=2,image=32,classes=10",
    "timm-vit": "timm-vit:batch=4,image=32,patch=8,hidden=32,heads=4,layers=2,classes=10",
}


def run_graph(ep, graph, model, inputs) -> torch.Tensor:
    """The loss of ``graph`` evaluated op by op on whole tensors (one device, no sharding)."""
    env = dict(leaf_values(ep, graph, model, inputs))
    params = dict(model.named_parameters(remove_duplicate=False))
    env.update({n.name: params[n.fqn] for n in graph.params})
    fx = {n.name: n for n in ep.graph.nodes}
    for n in graph.ops:
        node = fx[n.name]

        def sub(v):
            if isinstance(v, torch.fx.Node):
                return env[v.name]
            if isinstance(v, (list, tuple)):
                return type(v)(sub(x) for x in v)
            return v

        env[n.name] = node.target(*sub(node.args), **{k: sub(v) for k, v in node.kwargs.items()})
    return env[graph.loss]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_captured_graph_computes_the_models_loss(name):
    spec = parse_model_spec(SMALL[name])
    model, inputs = build_model(spec, "cpu", seed=0)
    ep = export(model, inputs)
    graph = graph_from_export(ep)
    assert not any(node.target is operator.getitem for node in ep.graph.nodes
                   if node.name in {n.name for n in graph.ops})
    assert not fallback_ops(graph), fallback_ops(graph)  # every op has a rule
    unique = {id(p): p.numel() for p in model.parameters()}
    assert graph.param_count == sum(unique.values())  # tied weights counted once
    torch.testing.assert_close(run_graph(ep, graph, model, inputs), model(*inputs),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_real_models_plan_no_worse_than_data_parallel_or_replication(name):
    spec = parse_model_spec(SMALL[name])
    graph = capture(*build_model(spec, "meta"))  # configs only: no weights allocated
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, meshes=[c.mesh((2,))], workers=1)
    work = Workload(spec.text, graph, c)
    ddp = baselines.data_parallel(work)
    if ddp.plan is not None and ddp.fits:
        assert plan.cost["total_s"] <= ddp.plan.cost["total_s"] * (1 + 1e-6)
    replicated = sum(n.flops for n in graph.ops)  # replicated work: one device's share wasted
    assert plan.cost["total_s"] <= 3.0 * replicated / c.peak_flops * (1 + 1e-6)
    assert plan.model["num_params"] == graph.param_count


def test_normalize_refuses_an_inplace_op_whose_input_is_read_again():
    class Bad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            v = h[:, :2]  # a view of h, read after h is overwritten
            h.relu_()
            return v.sum() + h.mean()

    with pytest.raises(UserError, match=r"relu_.*read again"):
        export(Bad(), (torch.randn(2, 4),))


FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x, y):
        h = torch.flip(self.a(x), dims=[1])  # no sharding rule: runs replicated
        q, k = h.chunk(2, dim=1)
        return torch.nn.functional.mse_loss(self.b(torch.cat([k, q], dim=1)), y)

def make():
    return Net(), (torch.randn(32, 16), torch.randn(32, 8))
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoddl.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_file_factory_model_plans_and_reports_its_fallback(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent(FACTORY))
    out = tmp_path / "plan.json"
    proc = _cli("plan", "--model", f"{src}:make", "--cluster", "cpu:devices=2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "replicated (no sharding rule): 1 op(s): aten.flip.default x1" in proc.stdout
    strict = _cli("plan", "--model", f"{src}:make", "--cluster", "cpu:devices=2", "-o",
                  str(tmp_path / "strict.json"), "--strict-rules")
    assert strict.returncode == 2 and "aten.flip.default (x1)" in strict.stderr
    assert not (tmp_path / "strict.json").exists()


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing.py:make", "not found"),
    ("{src}:nothing", "has no function 'nothing'"),
    ("{src}:bad", "must return (model, example_inputs)"),
])
def test_file_factory_errors_name_the_fix(tmp_path, spec, message):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent(FACTORY) + "\ndef bad():\n    return 3\n")
    with pytest.raises(UserError) as info:
        build_model(parse_model_spec(spec.format(dir=tmp_path, src=src)), "meta")
    assert message in str(info.value)


def test_strict_rules_raise_for_the_fallback_ops(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent(FACTORY))
    spec = parse_model_spec(f"{src}:make")
    graph = capture(*build_model(spec, "meta"))
    assert fallback_ops(graph) == {"aten.flip.default": 1}
    with pytest.raises(NoRuleError, match="flip"):
        plan_graph(graph, cluster(devices=2), model_spec=spec.text, strict_rules=True)


@pytest.mark.dist
def test_hf_gpt2_runs_checked_with_bytes_equal_to_the_plan(tmp_path, monkeypatch):
    """Acceptance: a small Hugging Face GPT-2 on 4 gloo processes, a mixed data and tensor
    parallel plan: losses, gradients and the bytes per (axis, kind) match the plan. Planned
    without nested splits (else plain data parallelism over both axes wins at this size)."""
    from autoddl.engine import costs, mesh_signatures
    from autoddl.engine.placements import is_nested, is_valid, valid_splits

    def flat(dims, shapes, mesh) -> bool:  # mesh_signatures.signatures' check, no dim on two axes
        live = [a for a, n in enumerate(mesh) if n > 1]
        return valid_splits(dims, shapes, mesh) and all(
            len(ds) == len(set(ds)) for t in range(len(shapes))
            for ds in [[dims[a][t] for a in live if dims[a][t] is not None]])

    monkeypatch.setattr(mesh_signatures, "is_valid",
                        lambda p, shape, mesh: is_valid(p, shape, mesh) and not is_nested(p, mesh))
    monkeypatch.setattr(mesh_signatures, "valid_splits", flat)
    monkeypatch.setattr(costs, "_SIGNATURES", {})  # nothing cached under the patch leaks out
    spec = parse_model_spec("hf-gpt2:layers=2,hidden=64,heads=4,seq=32,batch=8,vocab=256")
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, meshes=[c.mesh((2, 2))], workers=1)
    monkeypatch.undo()
    split_weights = [o for o in plan.ops if o.target == "param"
                     and any(p.startswith("S(") for p in o.out.values())]
    assert split_weights, "expected tensor parallel weights in the plan"
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    out = run_checked(path, steps=2)
    assert re.search(r"byte check passed", out), out


@pytest.mark.dist
def test_file_model_with_a_fallback_op_runs_checked(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent(FACTORY))
    spec = parse_model_spec(f"{src}:make")
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec.text, workers=1)
    assert plan.model["fallback_ops"] == {"aten.flip.default": 1}
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    run_checked(path, steps=1)


@pytest.mark.parametrize("name", ["hf-llama", "hf-gpt2", "hf-bert", "timm-vit"])
def test_library_layers_are_solved_once_with_the_unreduced_optimum(name):
    """Each layer's constants (rotary tables, masks) are merged into shared leaves, so the
    layers are recognised as repeated: the reduced problem from a 3-layer capture is the one
    from the whole model, and its optimum is the unreduced one's."""
    from autoddl.engine.costs import build_problem
    from autoddl.engine.models import with_layers
    from autoddl.engine.planner import solve_sharding
    from autoddl.engine.repeat import find_blocks, reduce_graph

    spec = parse_model_spec(SMALL[name].replace("layers=2", "layers=5"))
    g = capture(*build_model(spec, "meta"))
    blocks = find_blocks(g)
    assert blocks is not None and blocks.count == 5
    red = reduce_graph(g, blocks)
    small = capture(*build_model(with_layers(spec, 3), "meta"))
    assert reduce_graph(small, find_blocks(small), layers=5).graph.digest() == red.graph.digest()
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    mesh = c.mesh((2, 2))
    full = solve_sharding(build_problem(g, mesh, c))
    reduced = solve_sharding(build_problem(red.graph, mesh, c, mult=red.mult))
    assert reduced.result.objective == pytest.approx(full.result.objective, rel=1e-7)
