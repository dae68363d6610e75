"""Clusters: devices, links, memory, peak FLOP/s, and the device meshes they can be laid out as.

Units are in the names: ``_bytes``, ``_s`` (seconds), ``_flops`` (FLOP/s), ``_gbps`` (GB/s, where
GB = 1e9 bytes; *bytes* per second, not bits). A link's bandwidth is per device and per direction:
what one rank of a ring collective sees.

A cluster comes from ``parse_cluster(spec)`` (a preset such as ``dgx-a100:nodes=2`` or a
cluster file; presets, the file format and ``write_cluster_file`` are in
:mod:`autoddl.engine.cluster_files`, re-exported here).

Meshes: ``Cluster.meshes()`` lists every ordered factorization of the device count into at most
``max_axes`` factors >= 2. Devices are numbered node-major (rank = node * devices_per_node + local)
and the mesh is laid row-major over ranks (last axis innermost: contiguous ranks). An axis gets the
inter-node link if any of its groups (ranks that differ only in that axis's coordinate) holds ranks
of different nodes, else the intra-node link.

Two-level collectives. A group of an axis that spans nodes holds n = g·N ranks: g on each of the
N nodes it spans (``MeshAxis.ranks_per_node``, ``nodes_spanned``; g = 1 where the groups are not
spread evenly). With g > 1 NCCL runs a ring collective hierarchically, one NIC per GPU: intra-node
reduce-scatter, inter-node all-reduce of 1/g of the data over g rails at once, intra-node
all-gather. Each device sends a flat ring's bytes, (g−1)/g·T + (N−1)/N·T/g = (n−1)/n·T for a
reduce-scatter, but only a share φ = (N−1)/(n−1) of them crosses nodes; an all-to-all sends the
data for the n−g ranks on other nodes over its own NIC, φ = (n−g)/(n−1). A step that sends b
bytes in s latency steps takes b·((1−φ)/β_intra + φ/β_inter) + s·((1−φ)·α_intra + φ·α_inter)
(:meth:`MeshAxis.step_seconds`, the one place a step becomes seconds). g = 1 (each GPU of a group
on its own node: a rail-aligned ring) gives φ = 1, an axis within a node φ = 0: one flat link.

Every problem with a spec, a file or plan data raises :class:`autoddl.errors.UserError` with one
line naming the problem and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from autoddl.engine.compute import ComputeFigures
from autoddl.errors import UserError

__all__ = [
    "Link",
    "MeshAxis",
    "Mesh",
    "Cluster",
    "parse_cluster",
    "write_cluster_file",
    "list_presets",
    "DEVICE_TYPES",
    "CLUSTER_FILE_SUFFIXES",
]

GB = 1e9
DEVICE_TYPES = ("cpu", "cuda")
CLUSTER_FILE_SUFFIXES = (".toml", ".yaml", ".yml")
_AXIS_NAMES = "xyzwvu"


def _axis_name(i: int) -> str:
    return _AXIS_NAMES[i] if i < len(_AXIS_NAMES) else f"a{i}"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    return math.isfinite(v)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


#: plausible figures of one device (both ends included); a value outside is a typo or a unit
#: slip, and would overflow the cost model's arithmetic. Bandwidth in GB/s, latency in s.
BANDWIDTH_RANGE_GBPS = (1e-6, 1e6)
LATENCY_MAX_S = 1.0
MEMORY_RANGE_BYTES = (1, 1 << 50)  # up to 1 PiB per device
PEAK_FLOPS_RANGE = (1e6, 1e18)  # 1 MFLOP/s to 1 EFLOP/s per device
#: devices in one cluster (the largest built have about 10**5 GPUs)
MAX_DEVICES = 1 << 17


def _check_range(where: str, key: str, value: float, low: float, high: float,
                 unit: str = "") -> None:
    """:class:`UserError` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise UserError(f"{where}: {key}={value!r} is outside the plausible range "
                        f"[{low:g}, {high:g}]{unit}; check the value and its unit")


@dataclass(frozen=True)
class Link:
    """One kind of link: bandwidth per device per direction (GB/s) and latency per message (s)."""

    bandwidth_gbps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not (_is_number(self.bandwidth_gbps) and _finite(self.bandwidth_gbps)
                and self.bandwidth_gbps > 0):
            raise UserError(f"link bandwidth_gbps={self.bandwidth_gbps!r} must be a positive number")
        if not (_is_number(self.latency_s) and _finite(self.latency_s) and self.latency_s >= 0):
            raise UserError(f"link latency_s={self.latency_s!r} must be a number >= 0")
        _check_range("link", "bandwidth_gbps", self.bandwidth_gbps, *BANDWIDTH_RANGE_GBPS)
        _check_range("link", "latency_s", self.latency_s, 0.0, LATENCY_MAX_S)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbps * GB

    def to_dict(self) -> dict[str, float]:
        return {"bandwidth_gbps": float(self.bandwidth_gbps), "latency_s": float(self.latency_s)}


#: collectives whose ring runs two-level on an axis spanning nodes (see the module docstring)
RING_KINDS = ("all_reduce", "reduce_scatter", "all_gather")
_NEW_AXIS_KEYS = ("ranks_per_node", "intra_bandwidth_gbps", "intra_latency_s")


@dataclass(frozen=True)
class MeshAxis:
    """One axis of a device mesh: its slowest link (``bandwidth_gbps``, ``latency_s``: the
    inter-node link where its groups span nodes), and its topology: ``ranks_per_node`` (g, the
    ranks of one group on each node it spans) and the intra-node link. Left ``None`` (plan files
    written before they were recorded) they read as a flat ring on the slowest link: g = 1 on an
    axis spanning nodes, g = size on one that does not, intra link = the axis's link."""

    name: str
    size: int
    bandwidth_gbps: float
    latency_s: float
    spans_nodes: bool
    ranks_per_node: int | None = None
    intra_bandwidth_gbps: float | None = None
    intra_latency_s: float | None = None

    def __post_init__(self) -> None:
        if self.ranks_per_node is None:
            object.__setattr__(self, "ranks_per_node", 1 if self.spans_nodes else self.size)
        if self.intra_bandwidth_gbps is None:
            object.__setattr__(self, "intra_bandwidth_gbps", self.bandwidth_gbps)
        if self.intra_latency_s is None:
            object.__setattr__(self, "intra_latency_s", self.latency_s)
        g = self.ranks_per_node
        if (isinstance(g, bool) or not isinstance(g, int) or g < 1 or self.size % g
                or (g == self.size) == self.spans_nodes and self.size > 1):
            raise UserError(f"mesh axis {self.name!r}: ranks_per_node={g!r} must divide its size "
                            f"{self.size}, and be below it exactly when the axis spans nodes")

    @property
    def nodes_spanned(self) -> int:
        """N: the nodes one group of this axis spans (1 when it does not span nodes)."""
        return self.size // self.ranks_per_node

    @property
    def link(self) -> Link:
        return Link(self.bandwidth_gbps, self.latency_s)

    def inter_share(self, kind: str) -> float:
        """φ: the fraction of a collective's bytes sent per device (and of its latency steps)
        that cross the inter-node link; the rest ride the intra-node link."""
        n, g = self.size, self.ranks_per_node
        if not self.spans_nodes or n <= 1:
            return 0.0
        if kind == "all_to_all":
            return (n - g) / (n - 1)
        if kind in RING_KINDS:
            return (self.nodes_spanned - 1) / (n - 1)
        return 1.0  # anything else: priced on the slowest link

    def tree_share(self, kind: str) -> float:
        """The latency an all-reduce pays under NCCL's tree algorithm, as a share of the ring's:
        a double binary tree reaches every rank in ⌈log2 p⌉ hops up and as many down (+1 to
        start) against the ring's 2(p−1)+1, at the ring's bandwidth, and NCCL runs whichever
        is faster (its tuner picks trees for small messages across many ranks). Other kinds
        have no tree: 1."""
        p = self.size
        if kind != "all_reduce" or p <= 2:
            return 1.0
        return (2 * math.ceil(math.log2(p)) + 1) / (2 * (p - 1) + 1)

    def step_seconds(self, kind: str, bytes_per_device: float, latency_steps: float) -> float:
        """Seconds of one collective step of ``kind`` on this axis that sends
        ``bytes_per_device`` and takes ``latency_steps`` α steps (two-level where the axis spans
        nodes with g > 1: the module docstring). The one place a step becomes seconds."""
        phi = self.inter_share(kind)
        latency_steps *= self.tree_share(kind)
        intra_bps, inter_bps = self.intra_bandwidth_gbps * GB, self.bandwidth_gbps * GB
        return (bytes_per_device * (1.0 - phi) / intra_bps + bytes_per_device * phi / inter_bps
                + latency_steps * ((1.0 - phi) * self.intra_latency_s + phi * self.latency_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": int(self.size),
            "bandwidth_gbps": float(self.bandwidth_gbps),
            "latency_s": float(self.latency_s),
            "spans_nodes": bool(self.spans_nodes),
            "ranks_per_node": int(self.ranks_per_node),
            "intra_bandwidth_gbps": float(self.intra_bandwidth_gbps),
            "intra_latency_s": float(self.intra_latency_s),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "mesh axis") -> "MeshAxis":
        """Read :meth:`to_dict` output back; the topology keys may be absent (older files)."""
        r = _Reader(data, where)
        r.check_keys({"name", "size", "bandwidth_gbps", "latency_s", "spans_nodes",
                      *_NEW_AXIS_KEYS})
        name = r.string("name")
        size = r.integer("size", minimum=1)
        bw = r.number("bandwidth_gbps", positive=True)
        lat = r.number("latency_s", nonnegative=True)
        spans = r.data.get("spans_nodes")
        if not isinstance(spans, bool):
            raise UserError(f"{where}: spans_nodes={spans!r} must be true or false")
        g = r.integer("ranks_per_node") if "ranks_per_node" in r.data else None
        intra_bw = (r.number("intra_bandwidth_gbps", positive=True)
                    if "intra_bandwidth_gbps" in r.data else None)
        intra_lat = (r.number("intra_latency_s", nonnegative=True)
                     if "intra_latency_s" in r.data else None)
        return cls(name, size, bw, lat, spans, g, intra_bw, intra_lat)


@dataclass(frozen=True)
class Mesh:
    """A device mesh: axes in order (first outermost), laid row-major over node-major ranks."""

    axes: tuple[MeshAxis, ...]

    def __post_init__(self) -> None:
        if not self.axes:
            raise UserError("a mesh needs at least one axis")
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise UserError(f"mesh axis names {names} are not distinct; name each axis once")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    def symmetry_key(self) -> tuple:
        """Meshes with equal keys have equal optima: the same axes (size, link) in the same
        order. Axis order matters through nested sharding: operators nest a dim split on two
        axes left to right (the lower axis outer; only parameters and inputs are offered every
        order, :mod:`~autoddl.engine.mesh_signatures`), and which conversions are one clean step
        depends on it (:mod:`~autoddl.engine.placements`), so ``(2, 2, 4)`` and ``(4, 2, 2)``
        can differ. Swapping two identical axes gives the same mesh."""
        return ("exact",) + tuple((a.size, a.bandwidth_gbps, a.latency_s, a.spans_nodes,
                                   a.ranks_per_node, a.intra_bandwidth_gbps, a.intra_latency_s)
                                  for a in self.axes)

    def axis(self, name: str) -> MeshAxis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(f"mesh {self} has no axis {name!r}; axes: {', '.join(self.names)}")

    def __str__(self) -> str:
        return "·".join(f"{a.name}{a.size}" for a in self.axes)

    def to_dict(self) -> dict[str, Any]:
        return {"axes": [a.to_dict() for a in self.axes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "mesh") -> "Mesh":
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: expected a mapping with 'axes', got {type(data).__name__}")
        extra = sorted(set(data) - {"axes"})
        if extra:
            raise UserError(f"{where}: unexpected field {extra[0]!r}; accepted: axes")
        axes = data.get("axes")
        if not isinstance(axes, (list, tuple)) or not axes:
            raise UserError(f"{where}: 'axes' must be a non-empty list of axes")
        return cls(tuple(MeshAxis.from_dict(a, f"{where} axis {i}") for i, a in enumerate(axes)))


@dataclass(frozen=True)
class Cluster:
    """Devices, their links, memory and peak compute.

    ``spec`` records what it was parsed from (a preset spec or a file path); it takes no part in
    equality, so a cluster written to a file and read back equals the original.
    """

    name: str
    nodes: int
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    memory_per_device_bytes: int
    peak_flops: float
    device_type: str
    source: str
    spec: str = field(default="", compare=False)
    #: how fast operators run (:mod:`autoddl.engine.compute`)
    compute: ComputeFigures = ComputeFigures()

    def __post_init__(self) -> None:
        for key in ("nodes", "devices_per_node", "memory_per_device_bytes"):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise UserError(f"cluster {self.name!r}: {key}={v!r} must be a positive integer")
        if not (_is_number(self.peak_flops) and _finite(self.peak_flops) and self.peak_flops > 0):
            raise UserError(f"cluster {self.name!r}: peak_flops={self.peak_flops!r} must be a "
                            "positive finite number")
        where = f"cluster {self.name!r}"
        _check_range(where, "peak_flops", self.peak_flops, *PEAK_FLOPS_RANGE, " FLOP/s")
        _check_range(where, "memory_per_device_bytes", self.memory_per_device_bytes,
                     *MEMORY_RANGE_BYTES)
        if self.nodes * self.devices_per_node > MAX_DEVICES:
            raise UserError(f"{where}: {self.nodes} x {self.devices_per_node} devices is more "
                            f"than {MAX_DEVICES:,}; check nodes and devices per node")
        if self.device_type not in DEVICE_TYPES:
            raise UserError(
                f"cluster {self.name!r}: device_type {self.device_type!r} is unknown; "
                f"use one of {', '.join(DEVICE_TYPES)}"
            )
        if not isinstance(self.intra_node, Link) or not isinstance(self.inter_node, Link):
            raise UserError(f"cluster {self.name!r}: intra_node and inter_node must be Links")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def meshes(self, max_axes: int = 3) -> list[Mesh]:
        """Every mesh over all devices with 1..max_axes axes, each of size >= 2.

        The 1-axis mesh of all devices is always included; a 1-device cluster gives one mesh with
        one axis of size 1. Ordered by number of axes, then lexicographically by shape.
        """
        if isinstance(max_axes, bool) or not isinstance(max_axes, int) or max_axes < 1:
            raise UserError(f"max_axes={max_axes!r} must be an integer >= 1")
        n = self.num_devices
        shapes = [(n,)] + [s for s in ordered_factorizations(n, max_axes) if len(s) >= 2]
        shapes.sort(key=lambda s: (len(s), s))
        return [self.mesh(s) for s in shapes]

    def distinct_meshes(self, max_axes: int = 3) -> list[Mesh]:
        """:meth:`meshes` without those equivalent to an earlier one (:meth:`Mesh.symmetry_key`):
        the candidates the planner solves."""
        return unique_by(self.meshes(max_axes), Mesh.symmetry_key)

    def mesh(self, shape: tuple[int, ...]) -> Mesh:
        """The mesh of ``shape`` (product = device count), with each axis's link decided."""
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape) or math.prod(shape) != self.num_devices:
            raise UserError(
                f"mesh shape {shape} does not cover the {self.num_devices} devices of cluster "
                f"{self.name!r}; its sizes must multiply to {self.num_devices}"
            )
        node_of = (np.arange(self.num_devices) // self.devices_per_node).reshape(shape)
        axes = []
        for i, size in enumerate(shape):
            spans = bool(np.any(node_of.max(axis=i) != node_of.min(axis=i)))
            link = self.inter_node if spans else self.intra_node
            g = _ranks_per_node(np.moveaxis(node_of, i, -1).reshape(-1, size)) if spans else size
            axes.append(MeshAxis(_axis_name(i), size, link.bandwidth_gbps, link.latency_s, spans,
                                 g, self.intra_node.bandwidth_gbps, self.intra_node.latency_s))
        return Mesh(tuple(axes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "memory_per_device_bytes": self.memory_per_device_bytes,
            "peak_flops": float(self.peak_flops),
            "device_type": self.device_type,
            "source": self.source,
            "spec": self.spec,
            "intra_node": self.intra_node.to_dict(),
            "inter_node": self.inter_node.to_dict(),
            "compute": self.compute.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "cluster") -> "Cluster":
        """Read :meth:`to_dict` output (or the cluster-file mapping) back, checking every field."""
        from autoddl.engine.cluster_files import cluster_from_mapping

        return cluster_from_mapping(data, where, default_name=None, default_source=None,
                                     allow_spec=True)


def _ranks_per_node(groups: np.ndarray) -> int:
    """g of an axis from the node of each rank of each of its groups (one group a row, ranks in
    increasing order): the ranks of a group on each node it spans, when every group has as many
    on every node; else 1 (priced as a flat ring on the inter-node link)."""
    m, n = groups.shape
    nodes = 1 + (np.diff(groups, axis=1) != 0).sum(axis=1)
    big = int(nodes[0])
    if (nodes != big).any() or n % big:
        return 1
    blocks = groups.reshape(m, big, n // big)
    return n // big if bool((blocks == blocks[:, :, :1]).all()) else 1


def unique_by(items: list, key: Callable) -> list:
    """``items`` without those whose ``key`` equals an earlier one's, in order."""
    seen: set = set()
    out = []
    for it in items:
        k = key(it)
        if k not in seen:
            seen.add(k)
            out.append(it)
    return out


def ordered_factorizations(n: int, max_factors: int) -> list[tuple[int, ...]]:
    """Ordered tuples of factors >= 2 with product n and length 1..max_factors (n >= 2)."""
    if n < 2 or max_factors < 1:
        return []
    out: list[tuple[int, ...]] = [(n,)]
    if max_factors >= 2:
        for f in range(2, n // 2 + 1):
            if n % f == 0:
                out.extend((f,) + rest for rest in ordered_factorizations(n // f, max_factors - 1))
    return out


class _Reader:
    """Typed field access on a mapping, with errors that name the field and where it is."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
        self.data = data
        self.where = where

    def check_keys(self, allowed: set[str]) -> None:
        extra = sorted(str(k) for k in set(self.data) - allowed)
        if extra:
            raise UserError(
                f"{self.where}: unexpected field {extra[0]!r}; accepted: {', '.join(sorted(allowed))}"
            )

    def require(self, key: str, hint: str = "") -> Any:
        if key not in self.data or self.data[key] is None:
            raise UserError(f"{self.where}: missing required field {key!r}{hint}")
        return self.data[key]

    def string(self, key: str) -> str:
        v = self.require(key)
        if not isinstance(v, str) or not v:
            raise UserError(f"{self.where}: {key}={v!r} must be a non-empty string")
        return v

    def integer(self, key: str, minimum: int = 1) -> int:
        v = self.require(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{self.where}: {key}={v!r} must be an integer >= {minimum}")
        if v < minimum:
            raise UserError(f"{self.where}: {key}={v} must be at least {minimum}")
        return v

    def number(self, key: str, positive: bool = False, nonnegative: bool = False) -> float:
        v = self.require(key)
        if isinstance(v, str):  # PyYAML reads "5e-06" (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise UserError(f"{self.where}: {key}={v!r} is not a number") from None
        if not _is_number(v):
            raise UserError(f"{self.where}: {key}={v!r} is not a number")
        v = float(v)
        if not math.isfinite(v):
            raise UserError(f"{self.where}: {key}={v!r} must be finite")
        if positive and v <= 0:
            raise UserError(f"{self.where}: {key}={v!r} must be positive")
        if nonnegative and v < 0:
            raise UserError(f"{self.where}: {key}={v!r} must be >= 0")
        return v

    def one_of(self, a: str, b: str) -> str:
        """The one key of ``a``/``b`` present; error if both or neither."""
        has_a, has_b = a in self.data, b in self.data
        if has_a and has_b:
            raise UserError(f"{self.where}: give {a!r} or {b!r}, not both")
        if not has_a and not has_b:
            raise UserError(f"{self.where}: missing required field {a!r} (or {b!r})")
        return a if has_a else b


_FILE_NAMES = ("parse_cluster", "write_cluster_file", "list_presets")


def __getattr__(name: str) -> Any:
    """The presets' and cluster files' functions, from :mod:`autoddl.engine.cluster_files`
    (loaded on first use: that module reads the classes above)."""
    if name in _FILE_NAMES:
        from autoddl.engine import cluster_files

        return getattr(cluster_files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
