"""The rewrites of exported graphs keep the model's values, or refuse.

Each case is a small module whose captured graph, run op by op on whole tensors, must give the
module's own result (``tests/test_zoo.py: run_graph``), or whose capture must fail naming the
operator. The cases are those a review found broken in a first version.
"""

from __future__ import annotations

import pytest
import torch

from autoddl.engine.capture import export, graph_from_export
from autoddl.engine.mesh_signatures import axis_signatures
from autoddl.engine.workload import load_workload
from autoddl.errors import UserError
from tests.test_zoo import run_graph


class _Net(torch.nn.Module):
    def __init__(self, body) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.body = body

    def forward(self, x):
        return self.body(self.lin(x))


def _same_as_eager(body) -> None:
    model = _Net(body)
    x = torch.randn(2, 4)
    ep = export(model, (x,))
    graph = graph_from_export(ep)
    torch.testing.assert_close(run_graph(ep, graph, model, (x,)), model(x))


def test_writing_a_view_of_a_tensor_read_later_is_refused():
    def body(h):
        v = h[:, :2]
        v.add_(100.0)  # writes h
        return h.sum()

    with pytest.raises(UserError, match=r"add_.*read again"):
        export(_Net(body), (torch.randn(2, 4),))


def test_a_constant_written_in_place_is_not_merged_with_an_equal_one():
    def body(h):
        a = torch.zeros(2, 4)
        a[:, 0] = 1.0
        b = torch.zeros(2, 4)
        return (h * a).sum() + (h + b).sum()

    _same_as_eager(body)


def test_a_constant_read_and_then_written_in_place_is_refused():
    def body(h):
        c = torch.ones(2, 4)
        y1 = h * c
        c.mul_(3.0)
        return (y1 + h * c).sum()

    with pytest.raises(UserError, match=r"constant 'ones' is read by .* then written in place"):
        export(_Net(body), (torch.randn(2, 4),))


def test_random_draws_are_neither_constants_nor_merged():
    def body(h):
        return (h + torch.randn(2, 4) - torch.randn(2, 4)).sum()

    ep = export(_Net(body), (torch.randn(2, 4),))
    graph = graph_from_export(ep)
    draws = [n for n in graph.ops if n.target.startswith("aten.randn")]
    assert len(draws) == 2
    assert not [n for n in graph.nodes if n.target == "const"]


def test_a_tensor_times_itself_has_no_partial_sum_signature():
    def body(h):
        return (h * h).sum()

    ep = export(_Net(body), (torch.randn(2, 4),))
    graph = graph_from_export(ep)
    mul = next(n for n in graph.ops if n.target == "aten.mul.Tensor")
    assert all(s.out != "P" for s in axis_signatures(mul, graph))


def test_models_whose_layers_do_not_repeat_are_captured_whole():
    work = load_workload("mlp:layers=5", "cpu:devices=2", stages=1)
    assert work.layers is None
    assert sum(n.target == "aten.linear.default" for n in work.graph.ops) == 6
