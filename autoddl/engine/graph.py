"""The operator graph the planner works on: plain data, no torch.

An :class:`OpGraph` holds one :class:`OpNode` per parameter, user input and ATen operator of one
training step's forward pass (loss included), in topological order, and one :class:`Edge` per
tensor argument. Backward is implied: every edge carries a gradient back when its tensor requires
one. ``engine/capture.py`` builds it from ``torch.export``; tests build small ones by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}

#: the position of ``dropout_p`` in ``aten.scaled_dot_product_attention``'s arguments
#: (query, key, value, attn_mask, dropout_p, is_causal): Hugging Face passes the mask
#: positionally; costs and normalize both read the dropout at this index
SDPA_DROPOUT_ARG = 4


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor (global, unsharded)."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return _ITEMSIZE.get(self.dtype, 4)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        """Whether the dtype is floating point (only those carry gradients)."""
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)


@dataclass(frozen=True)
class TensorArg:
    """Marks, inside :attr:`OpNode.args`, the position of the node's ``index``-th tensor input."""

    index: int


@dataclass(frozen=True)
class OpNode:
    """One node: a parameter, a user input, or an operator call.

    ``kind`` is ``"param"``, ``"input"`` or ``"op"``. ``inputs`` names the nodes feeding its tensor
    arguments, in order; ``args``/``kwargs`` are the call's arguments with tensors replaced by
    :class:`TensorArg`. ``flops`` counts one forward pass.
    """

    name: str
    kind: str
    target: str
    out: TensorMeta
    inputs: tuple[str, ...] = ()
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    flops: float = 0.0
    requires_grad: bool = False
    fqn: str = ""  # parameter's qualified name in the module, for params
    scope: str = ""  # outermost numbered submodule it belongs to ("blocks.3"), or ""
    #: the module it was called in (ops: innermost ``nn_module_stack`` entry, such as
    #: ``blocks.3.mlp.fc1``; params: the qualified name), or "" at the top level
    module: str = ""

    def kwarg(self, key: str, default: Any = None) -> Any:
        """A keyword argument's value, or ``default``."""
        return dict(self.kwargs).get(key, default)

    def arg(self, pos: int, key: str, default: Any = None) -> Any:
        """Argument at position ``pos`` or keyword ``key``, else ``default``."""
        if pos < len(self.args):
            return self.args[pos]
        return self.kwarg(key, default)


@dataclass(frozen=True)
class Edge:
    """The tensor output of ``src`` read as the ``index``-th tensor input of ``dst``."""

    src: str
    dst: str
    index: int


@dataclass(frozen=True, eq=False)
class OpGraph:
    """Nodes in topological order; the last op is the loss."""

    nodes: tuple[OpNode, ...]
    loss: str
    _by_name: dict[str, OpNode] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_name = {n.name: n for n in self.nodes}
        assert len(by_name) == len(self.nodes), "duplicate node names"
        seen: set[str] = set()
        for n in self.nodes:
            assert all(i in seen for i in n.inputs), f"{n.name}: inputs not topologically before"
            seen.add(n.name)
        assert self.loss in by_name
        object.__setattr__(self, "_by_name", by_name)

    def __getitem__(self, name: str) -> OpNode:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def edges(self) -> list[Edge]:
        """Every (producer, consumer, argument) edge, in consumer order."""
        return [Edge(src, n.name, i) for n in self.nodes for i, src in enumerate(n.inputs)]

    @property
    def params(self) -> list[OpNode]:
        """Parameter nodes."""
        return [n for n in self.nodes if n.kind == "param"]

    @property
    def ops(self) -> list[OpNode]:
        """Operator nodes."""
        return [n for n in self.nodes if n.kind == "op"]

    @property
    def user_inputs(self) -> list[OpNode]:
        """The inputs the user feeds each step; constant leaves (target ``const``: masks,
        position ids, rotary tables, buffers) are left out."""
        return [n for n in self.nodes if n.kind == "input" and n.target != "const"]

    def weights_read(self, name: str) -> list[str]:
        """The parameters node ``name`` reads directly."""
        return [i for i in self[name].inputs if self[i].kind == "param"]

    def edge_bytes(self, edge: Edge) -> int:
        """Bytes of the tensor an edge carries (whole, unsharded)."""
        return self[edge.src].out.nbytes

    def to_networkx(self) -> nx.MultiDiGraph:
        """The graph as networkx (node attribute ``node``; edge attribute ``index``)."""
        g = nx.MultiDiGraph()
        for n in self.nodes:
            g.add_node(n.name, node=n)
        for e in self.edges:
            g.add_edge(e.src, e.dst, index=e.index)
        return g

    def digest(self) -> str:
        """A stable hash of structure, targets, shapes and dtypes (plans record it)."""
        rows = [[n.name, n.kind, n.target, list(n.inputs), list(n.out.shape), n.out.dtype]
                for n in self.nodes]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    @property
    def param_count(self) -> int:
        """Number of parameter elements."""
        return sum(n.out.numel for n in self.params)
