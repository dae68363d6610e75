"""Cluster presets and cluster files: ``parse_cluster``, ``write_cluster_file``, ``list_presets``.

(Re-exported by :mod:`autoddl.engine.cluster`, which holds the data: links, meshes, clusters.)

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
      matmul_efficiency = 0.70       #   run at the peak and memory-bound ops cost nothing
      memory_bandwidth_gbps = 1600   # what streaming kernels reach, GB/s
      kernel_overhead_us = 4         # fixed time per kernel
      attention_score_passes = 4     # unfused attention's score matrix through memory
      overlap = true                 # weight traffic may run behind compute

  Each quantity is given in exactly one of its two units. Unknown keys are an error.
  ``write_cluster_file(cluster, path)`` writes this format (exact units: bytes, FLOP/s, seconds),
  and ``parse_cluster`` reads it back to an equal :class:`Cluster`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from autoddl.engine.cluster import (
    BANDWIDTH_RANGE_GBPS, CLUSTER_FILE_SUFFIXES, DEVICE_TYPES, GB, LATENCY_MAX_S,
    MEMORY_RANGE_BYTES, PEAK_FLOPS_RANGE, Cluster, Link, _check_range, _Reader,
)
from autoddl.engine.compute import PRESET_COMPUTE, ComputeFigures
from autoddl.errors import UserError
from autoddl.specs import as_float, as_int, check_keys, parse_spec

__all__ = ["parse_cluster", "write_cluster_file", "list_presets"]

_WHAT = "--cluster"


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
    "peak_tflops", "peak_flops", "device_type", "source", "intra_node", "inter_node",
    "compute",
}
_LINK_KEYS = {"bandwidth_gbps", "latency_us", "latency_s"}


def _link_from_mapping(data: Any, where: str) -> Link:
    r = _Reader(data, where)
    r.check_keys(_LINK_KEYS)
    bw = r.number("bandwidth_gbps", positive=True)
    key = r.one_of("latency_us", "latency_s")
    lat = r.number(key, nonnegative=True)
    return Link(bw, lat / 1e6 if key == "latency_us" else lat)


def cluster_from_mapping(
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
        raise UserError(f"{where}: {err}; fix the file (format in autoddl.engine.cluster_files)")
    return cluster_from_mapping(
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
        f"  # {c.memory_per_device_bytes / 2**30:.2f} GiB",
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
              f"attention_score_passes = {_toml_float(fig['attention_score_passes'])}",
              f"overlap = {'true' if fig['overlap'] else 'false'}",
              f"source = {_toml_str(fig['source'])}"]
    try:
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write cluster file {os.fspath(path)!r} ({_first_line(e)}); "
                        "check the directory exists and is writable") from None
