"""Clusters: devices, links, memory, peak FLOP/s, and the device meshes they can be laid out as.

Units are in the names: ``_bytes``, ``_s`` (seconds), ``_flops`` (FLOP/s), ``_gbps`` (GB/s, where
GB = 1e9 bytes; *bytes* per second, not bits). A link's bandwidth is per device and per direction:
what one rank of a ring collective sees.

A cluster comes from ``parse_cluster(spec)``, where ``spec`` is one of

* a preset, ``NAME`` or ``NAME:key=value,...`` (``list_presets()`` names them):

  - ``cpu:devices=N`` — one node of N CPU processes talking over gloo (default N = 1). Its numbers
    are *nominal* (5 GB/s, 50 µs, 4 GiB and 100 GFLOP/s per device), not measured: calibrate for
    real numbers.
  - ``dgx-a100:nodes=N``, ``dgx-h100:nodes=N`` (default N = 1) — 8 GPUs per node with the published
    figures of ``reference/hardware.md``: intra-node link = NVLink per GPU per direction (300 / 450
    GB/s), inter-node link = one InfiniBand NIC per GPU (25 / 50 GB/s), 80 GB (80e9 bytes) per GPU,
    dense bf16 peak (312 / 989 TFLOP/s). Latencies are nominal (5 µs intra, 10 µs inter).

  Every preset accepts overrides: ``memory_gb`` (GB = 1e9 bytes), ``intra_gbps``, ``inter_gbps``,
  ``intra_latency_us``, ``inter_latency_us``, ``tflops`` (dense peak per device); the dgx presets
  also ``gpus_per_node``. An overridden preset says so in its ``source``.

* a cluster file: a path ending in ``.toml``, ``.yaml`` or ``.yml``, or any other existing file
  (read as TOML, else YAML). Format (TOML shown; YAML takes the same keys, nested mappings for the
  two links)::

      name = "my-cluster"            # optional; default: the file's stem
      nodes = 2                      # integer >= 1
      devices_per_node = 4           # integer >= 1
      memory_per_device_gb = 16      # GB = 1e9 bytes;  or memory_per_device_bytes = 16000000000
      peak_tflops = 125              # dense peak per device;  or peak_flops = 1.25e14
      device_type = "cuda"           # "cuda" or "cpu"
      source = "measured 2026-11"    # optional; default: the file's path

      [intra_node]                   # link between devices of one node
      bandwidth_gbps = 150           # per device, per direction
      latency_us = 5                 # or latency_s = 5e-6

      [inter_node]                   # link between nodes; optional when nodes = 1 (then = intra)
      bandwidth_gbps = 12.5
      latency_us = 10

      [compute]                      # optional (autoddl.engine.compute); without it matmuls
      matmul_efficiency = 0.75       #   run at the peak and memory-bound ops cost nothing
      memory_bandwidth_gbps = 1600   # what streaming kernels reach, GB/s
      kernel_overhead_us = 4         # fixed time per kernel

  Each quantity is given in exactly one of its two units. Unknown keys are an error.
  ``write_cluster_file(cluster, path)`` writes this format (exact units: bytes, FLOP/s, seconds),
  and ``parse_cluster`` reads it back to an equal :class:`Cluster`.

Meshes: ``Cluster.meshes()`` lists every ordered factorization of the device count into at most
``max_axes`` factors >= 2. Devices are numbered node-major (rank = node * devices_per_node + local)
and the mesh is laid row-major over ranks (last axis innermost: contiguous ranks). An axis gets the
inter-node link if any of its groups (ranks that differ only in that axis's coordinate) holds ranks
of different nodes, else the intra-node link.

Every problem with a spec, a file or plan data raises :class:`autoddl.errors.UserError` with one
line naming the problem and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from autoddl.engine.compute import PRESET_COMPUTE, ComputeFigures
from autoddl.errors import UserError
from autoddl.specs import as_float, as_int, check_keys, parse_spec

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
_WHAT = "--cluster"


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


@dataclass(frozen=True)
class MeshAxis:
    """One axis of a device mesh and the (slowest) link its groups communicate over."""

    name: str
    size: int
    bandwidth_gbps: float
    latency_s: float
    spans_nodes: bool

    @property
    def link(self) -> Link:
        return Link(self.bandwidth_gbps, self.latency_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": int(self.size),
            "bandwidth_gbps": float(self.bandwidth_gbps),
            "latency_s": float(self.latency_s),
            "spans_nodes": bool(self.spans_nodes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "mesh axis") -> "MeshAxis":
        r = _Reader(data, where)
        r.check_keys({"name", "size", "bandwidth_gbps", "latency_s", "spans_nodes"})
        name = r.string("name")
        size = r.integer("size", minimum=1)
        bw = r.number("bandwidth_gbps", positive=True)
        lat = r.number("latency_s", nonnegative=True)
        spans = r.data.get("spans_nodes")
        if not isinstance(spans, bool):
            raise UserError(f"{where}: spans_nodes={spans!r} must be true or false")
        return cls(name, size, bw, lat, spans)


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
        """Meshes with equal keys have equal optima: the same axes (size, link) in another
        order. The cost model reads no axis position (conversion steps are ordered by kind and
        axis size, :data:`~autoddl.engine.placements.STEP_ORDER`) except to break ties between
        axes of one size, so where axes of one size differ in link the key is the mesh itself.
        """
        axes = [(a.size, a.bandwidth_gbps, a.latency_s, a.spans_nodes) for a in self.axes]
        links = {}
        for size, *link in axes:
            if links.setdefault(size, link) != link:
                return ("exact",) + tuple(axes)
        return ("sorted",) + tuple(sorted(axes))

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
            axes.append(MeshAxis(_axis_name(i), size, link.bandwidth_gbps, link.latency_s, spans))
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
        return _cluster_from_mapping(data, where, default_name=None, default_source=None,
                                     allow_spec=True)


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


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

_OVERRIDES = {
    "memory_gb": "memory per device, GB (1e9 bytes)",
    "intra_gbps": "intra-node bandwidth per device per direction, GB/s",
    "inter_gbps": "inter-node bandwidth per device per direction, GB/s",
    "intra_latency_us": "intra-node latency, µs",
    "inter_latency_us": "inter-node latency, µs",
    "tflops": "dense peak per device, TFLOP/s",
}


@dataclass(frozen=True)
class _Preset:
    devices_per_node: int
    intra_gbps: float
    inter_gbps: float
    intra_latency_us: float
    inter_latency_us: float
    memory_bytes: int
    tflops: float
    device_type: str
    source: str
    count_key: str  # "nodes" (multi-node, devices per node fixed) or "devices" (one node)


_PRESETS: dict[str, _Preset] = {
    "cpu": _Preset(
        devices_per_node=1, intra_gbps=5.0, inter_gbps=5.0, intra_latency_us=50.0,
        inter_latency_us=50.0, memory_bytes=4 * 2**30, tflops=0.1, device_type="cpu",
        source="nominal CPU box on gloo (5 GB/s, 50 µs, 4 GiB, 100 GFLOP/s per device); "
               "calibrate for real numbers",
        count_key="devices",
    ),
    "dgx-a100": _Preset(
        devices_per_node=8, intra_gbps=300.0, inter_gbps=25.0, intra_latency_us=5.0,
        inter_latency_us=10.0, memory_bytes=80 * 10**9, tflops=312.0, device_type="cuda",
        source="published: DGX-A100 datasheet (NVLink 3 300 GB/s per GPU per direction, "
               "HDR InfiniBand 25 GB/s per GPU, 80 GB, 312 TFLOP/s bf16); latencies nominal",
        count_key="nodes",
    ),
    "dgx-h100": _Preset(
        devices_per_node=8, intra_gbps=450.0, inter_gbps=50.0, intra_latency_us=5.0,
        inter_latency_us=10.0, memory_bytes=80 * 10**9, tflops=989.0, device_type="cuda",
        source="published: DGX-H100 datasheet (NVLink 4 450 GB/s per GPU per direction, "
               "NDR InfiniBand 50 GB/s per GPU, 80 GB, 989 TFLOP/s bf16); latencies nominal",
        count_key="nodes",
    ),
}


def list_presets() -> list[str]:
    """Names of the cluster presets ``parse_cluster`` knows."""
    return sorted(_PRESETS)


def _known_message() -> str:
    return (f"known presets: {', '.join(list_presets())}; "
            f"or give a cluster file ({', '.join(CLUSTER_FILE_SUFFIXES)})")


def _parse_preset(spec: str) -> Cluster:
    name, params = parse_spec(spec, _WHAT)
    if name not in _PRESETS:
        raise UserError(f"{_WHAT}: unknown cluster {name!r}; {_known_message()}")
    p = _PRESETS[name]
    what = f"{_WHAT} {name}"
    allowed = dict(_OVERRIDES)
    if p.count_key == "devices":
        allowed["devices"] = "number of devices (processes) on the one node"
    else:
        allowed["nodes"] = "number of nodes"
        allowed["gpus_per_node"] = "devices per node"
    check_keys(params, allowed, what)

    if p.count_key == "devices":
        nodes = 1
        per_node = as_int(params, "devices", 1, what)
    else:
        nodes = as_int(params, "nodes", 1, what)
        per_node = as_int(params, "gpus_per_node", p.devices_per_node, what)
    memory_gb = as_float(params, "memory_gb", p.memory_bytes / GB, what,
                         bounds=(0.0, MEMORY_RANGE_BYTES[1] / GB))
    memory_bytes = p.memory_bytes if "memory_gb" not in params else int(round(memory_gb * GB))
    if memory_bytes < 1:
        raise UserError(f"{what}: memory_gb={params['memory_gb']!r} is below one byte")
    lat_us = (0.0, LATENCY_MAX_S * 1e6)
    intra_lat = as_float(params, "intra_latency_us", p.intra_latency_us, what, positive=False,
                         bounds=lat_us)
    inter_lat = as_float(params, "inter_latency_us", p.inter_latency_us, what, positive=False,
                         bounds=lat_us)
    for key, v in (("intra_latency_us", intra_lat), ("inter_latency_us", inter_lat)):
        if v < 0:
            raise UserError(f"{what}: {key}={params[key]!r} must be >= 0")
    gbps = BANDWIDTH_RANGE_GBPS
    intra = Link(as_float(params, "intra_gbps", p.intra_gbps, what, bounds=gbps), intra_lat / 1e6)
    inter = Link(as_float(params, "inter_gbps", p.inter_gbps, what, bounds=gbps), inter_lat / 1e6)
    peak = as_float(params, "tflops", p.tflops, what,
                    bounds=(PEAK_FLOPS_RANGE[0] / 1e12, PEAK_FLOPS_RANGE[1] / 1e12)) * 1e12

    source = p.source
    overridden = sorted(set(params) & set(_OVERRIDES))
    if overridden:
        source += "; overridden: " + ", ".join(f"{k}={params[k]}" for k in overridden)
    return Cluster(
        name=name, nodes=nodes, devices_per_node=per_node, intra_node=intra, inter_node=inter,
        memory_per_device_bytes=memory_bytes, peak_flops=peak, device_type=p.device_type,
        source=source, spec=spec.strip(), compute=PRESET_COMPUTE[name],
    )


# ---------------------------------------------------------------------------------------------
# Files and mappings
# ---------------------------------------------------------------------------------------------

_TOP_KEYS = {
    "name", "nodes", "devices_per_node", "memory_per_device_gb", "memory_per_device_bytes",
    "peak_tflops", "peak_flops", "device_type", "source", "intra_node", "inter_node", "compute",
}
_LINK_KEYS = {"bandwidth_gbps", "latency_us", "latency_s"}


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


def _link_from_mapping(data: Any, where: str) -> Link:
    r = _Reader(data, where)
    r.check_keys(_LINK_KEYS)
    bw = r.number("bandwidth_gbps", positive=True)
    key = r.one_of("latency_us", "latency_s")
    lat = r.number(key, nonnegative=True)
    return Link(bw, lat / 1e6 if key == "latency_us" else lat)


def _cluster_from_mapping(
    data: Any, where: str, default_name: str | None, default_source: str | None,
    allow_spec: bool = False, spec: str = "",
) -> Cluster:
    r = _Reader(data, where)
    r.check_keys(_TOP_KEYS | ({"spec"} if allow_spec else set()))
    name = r.string("name") if (default_name is None or "name" in r.data) else default_name
    nodes = r.integer("nodes")
    per_node = r.integer("devices_per_node")

    mem_key = r.one_of("memory_per_device_gb", "memory_per_device_bytes")
    if mem_key == "memory_per_device_bytes":
        memory = r.integer(mem_key)
    else:
        gb = r.number(mem_key, positive=True)
        _check_range(where, mem_key, gb, 0.0, MEMORY_RANGE_BYTES[1] / GB, " GB")
        memory = int(round(gb * GB))
        if memory < 1:
            raise UserError(f"{where}: {mem_key} is below one byte; give the memory in GB")

    peak_key = r.one_of("peak_tflops", "peak_flops")
    peak = r.number(peak_key, positive=True) * (1e12 if peak_key == "peak_tflops" else 1.0)

    device_type = r.string("device_type")
    if device_type not in DEVICE_TYPES:
        raise UserError(
            f"{where}: device_type {device_type!r} is unknown; use one of {', '.join(DEVICE_TYPES)}"
        )
    source = r.string("source") if (default_source is None or "source" in r.data) \
        else default_source

    intra = _link_from_mapping(r.require("intra_node"), f"{where} [intra_node]")
    if "inter_node" in r.data:
        inter = _link_from_mapping(r.data["inter_node"], f"{where} [inter_node]")
    elif nodes == 1:
        inter = intra
    else:
        raise UserError(f"{where}: missing required field 'inter_node' (needed when nodes > 1)")

    if allow_spec and "spec" in r.data:
        s = r.data["spec"]
        if not isinstance(s, str):
            raise UserError(f"{where}: spec={s!r} must be a string")
        spec = s
    compute = (ComputeFigures.from_dict(r.data["compute"], f"{where} [compute]")
               if "compute" in r.data else ComputeFigures())
    return Cluster(
        name=name, nodes=nodes, devices_per_node=per_node, intra_node=intra, inter_node=inter,
        memory_per_device_bytes=memory, peak_flops=peak, device_type=device_type, source=source,
        spec=spec, compute=compute,
    )


def _load_toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        raise UserError("reading TOML needs Python >= 3.11 (tomllib); use a .yaml file") from None
    return tomllib.loads(text)


def _load_yaml(text: str) -> Any:
    """YAML as plain data; a key given twice in one mapping is an error (PyYAML would keep the
    last silently)."""
    import yaml

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Strict)


def _first_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def _load_cluster_file(path_str: str) -> Cluster:
    path = Path(path_str).expanduser()
    where = f"cluster file {path_str}"
    if not path.exists():
        raise UserError(
            f"{_WHAT}: cluster file {path_str!r} not found; check the path, or use a preset "
            f"({', '.join(list_presets())})"
        )
    if not path.is_file():
        raise UserError(f"{_WHAT}: {path_str!r} is not a file; give a .toml or .yaml cluster file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read it ({_first_line(e)}); check the file") from None

    suffix = path.suffix.lower()
    kinds = ["yaml"] if suffix in (".yaml", ".yml") else ["toml"] if suffix == ".toml" \
        else ["toml", "yaml"]
    data: Any = None
    err = ""
    for kind in kinds:
        try:
            data = _load_toml(text) if kind == "toml" else _load_yaml(text)
        except UserError:
            raise
        except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, ...
            err = f"malformed {kind.upper()}: {_first_line(e)}"
            data = None
            continue
        if isinstance(data, Mapping):
            break
    if not isinstance(data, Mapping):
        if not err:
            err = "not a mapping of fields (see the cluster file format)"
        raise UserError(f"{where}: {err}; fix the file (format in autoddl.engine.cluster)")
    return _cluster_from_mapping(
        data, where, default_name=path.stem, default_source=f"file: {path_str}", spec=path_str,
    )


def _looks_like_file(spec: str) -> bool:
    s = spec.strip()
    if s.lower().endswith(CLUSTER_FILE_SUFFIXES):
        return True
    name = s.partition(":")[0].strip()
    if name in _PRESETS:
        return False
    return os.path.isfile(os.path.expanduser(s))


def parse_cluster(spec: str) -> Cluster:
    """A cluster from a preset spec (``dgx-a100:nodes=4``) or a cluster file path."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{_WHAT}: empty spec; give a preset ({_known_message()})")
    if _looks_like_file(spec):
        return _load_cluster_file(spec.strip())
    return _parse_preset(spec)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_float(x: float) -> str:
    assert math.isfinite(x)
    return repr(float(x))  # Python's shortest repr is valid TOML and round-trips exactly


def write_cluster_file(cluster: Cluster, path: str | os.PathLike[str]) -> None:
    """Write ``cluster`` as a TOML cluster file that ``parse_cluster`` reads back equal."""
    c = cluster
    lines = [
        "# autoddl cluster file. Units: bytes, FLOP/s, GB/s (1e9 bytes/s), seconds.",
        "# Alternatives: memory_per_device_gb, peak_tflops, latency_us.",
        f"name = {_toml_str(c.name)}",
        f"nodes = {int(c.nodes)}",
        f"devices_per_node = {int(c.devices_per_node)}",
        f"memory_per_device_bytes = {int(c.memory_per_device_bytes)}"
        f"  # {c.memory_per_device_bytes / GB:g} GB",
        f"peak_flops = {_toml_float(c.peak_flops)}  # {c.peak_flops / 1e12:g} TFLOP/s",
        f"device_type = {_toml_str(c.device_type)}",
        f"source = {_toml_str(c.source)}",
    ]
    for table, link in (("intra_node", c.intra_node), ("inter_node", c.inter_node)):
        lines += [
            "",
            f"[{table}]",
            f"bandwidth_gbps = {_toml_float(link.bandwidth_gbps)}",
            f"latency_s = {_toml_float(link.latency_s)}  # {link.latency_s * 1e6:g} µs",
        ]
    fig = c.compute.to_dict()
    lines += ["", "[compute]  # the roofline of autoddl.engine.compute; bandwidth 0: not modelled",
              f"matmul_efficiency = {_toml_float(fig['matmul_efficiency'])}",
              f"memory_bandwidth_gbps = {_toml_float(fig['memory_bandwidth_gbps'])}",
              f"kernel_overhead_s = {_toml_float(fig['kernel_overhead_s'])}",
              f"source = {_toml_str(fig['source'])}"]
    try:
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write cluster file {os.fspath(path)!r} ({_first_line(e)}); "
                        "check the directory exists and is writable") from None
