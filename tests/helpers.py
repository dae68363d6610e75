"""Hand-built graphs and small utilities shared by the tests."""

from __future__ import annotations

from autoddl.engine.cluster import Cluster, Link
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta


def cluster(devices: int = 2, memory_bytes: int = 2**40, gbps: float = 10.0,
            latency_s: float = 1e-5, peak_flops: float = 1e12, nodes: int = 1,
            inter_gbps: float | None = None) -> Cluster:
    """A synthetic cluster with round numbers."""
    per_node = devices // nodes
    return Cluster("test", nodes, per_node, Link(gbps, latency_s),
                   Link(inter_gbps or gbps, latency_s), memory_bytes, peak_flops, "cpu", "test")


def mlp_graph(batch: int, d_in: int, hidden: int, d_out: int, bias: bool = False) -> OpGraph:
    """x -> linear(W1) -> gelu -> linear(W2) -> mse(target), built by hand."""
    f = "float32"
    lin = "aten.linear.default"
    n = [
        OpNode("w1", "param", "param", TensorMeta((hidden, d_in), f), requires_grad=True,
               fqn="w1"),
        OpNode("w2", "param", "param", TensorMeta((d_out, hidden), f), requires_grad=True,
               fqn="w2"),
        OpNode("x", "input", "input", TensorMeta((batch, d_in), f)),
        OpNode("y", "input", "input", TensorMeta((batch, d_out), f)),
    ]
    if bias:
        n.append(OpNode("b1", "param", "param", TensorMeta((hidden,), f), requires_grad=True,
                        fqn="b1"))
    ins1 = ("x", "w1", "b1") if bias else ("x", "w1")
    n += [
        OpNode("h", "op", lin, TensorMeta((batch, hidden), f), ins1,
               tuple(TensorArg(i) for i in range(len(ins1))), flops=2.0 * batch * d_in * hidden,
               requires_grad=True),
        OpNode("a", "op", "aten.gelu.default", TensorMeta((batch, hidden), f), ("h",),
               (TensorArg(0),), flops=batch * hidden, requires_grad=True),
        OpNode("o", "op", lin, TensorMeta((batch, d_out), f), ("a", "w2"),
               (TensorArg(0), TensorArg(1)), flops=2.0 * batch * hidden * d_out,
               requires_grad=True),
        OpNode("loss", "op", "aten.mse_loss.default", TensorMeta((), f), ("o", "y"),
               (TensorArg(0), TensorArg(1)), flops=batch * d_out, requires_grad=True),
    ]
    return OpGraph(tuple(n), "loss")
