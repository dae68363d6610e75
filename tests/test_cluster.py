"""Tests of autoddl.engine.cluster: presets, overrides, meshes and their links, files, errors."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from autoddl.engine.cluster import (
    Cluster,
    Link,
    Mesh,
    list_presets,
    parse_cluster,
    write_cluster_file,
)
from autoddl.errors import UserError


def brute_force_shapes(n: int, max_axes: int) -> set[tuple[int, ...]]:
    """All tuples of 1..max_axes factors in [2, n] whose product is n, by exhaustive search."""
    shapes = {(n,)}
    for k in range(2, max_axes + 1):
        for t in itertools.product(range(2, n + 1), repeat=k):
            if math.prod(t) == n:
                shapes.add(t)
    return shapes


# ---------------------------------------------------------------------------------------------
# Presets and overrides


def test_list_presets():
    assert list_presets() == ["cpu", "dgx-a100", "dgx-h100"]


def test_dgx_a100_figures():
    c = parse_cluster("dgx-a100:nodes=2")
    assert (c.name, c.nodes, c.devices_per_node, c.num_devices) == ("dgx-a100", 2, 8, 16)
    assert c.intra_node.bandwidth_gbps == 300.0
    assert c.inter_node.bandwidth_gbps == 25.0
    assert c.intra_node.latency_s == pytest.approx(5e-6)
    assert c.inter_node.latency_s == pytest.approx(10e-6)
    assert c.memory_per_device_bytes == 80_000_000_000
    assert c.peak_flops == pytest.approx(312e12)
    assert c.device_type == "cuda"
    assert "published" in c.source and "nominal" in c.source
    assert c.spec == "dgx-a100:nodes=2"


def test_dgx_h100_figures():
    c = parse_cluster("dgx-h100")
    assert (c.nodes, c.devices_per_node) == (1, 8)
    assert (c.intra_node.bandwidth_gbps, c.inter_node.bandwidth_gbps) == (450.0, 50.0)
    assert c.peak_flops == pytest.approx(989e12)
    assert c.memory_per_device_bytes == 80 * 10**9


def test_cpu_preset():
    c = parse_cluster("cpu:devices=4")
    assert (c.nodes, c.devices_per_node, c.num_devices, c.device_type) == (1, 4, 4, "cpu")
    assert c.intra_node.bandwidth_gbps == 5.0
    assert c.intra_node.latency_s == pytest.approx(50e-6)
    assert c.memory_per_device_bytes == 4 * 2**30
    assert c.peak_flops == pytest.approx(100e9)
    assert "nominal" in c.source and "calibrate" in c.source


def test_overrides_applied():
    c = parse_cluster(
        "dgx-a100:nodes=3,gpus_per_node=4,memory_gb=40,intra_gbps=150,inter_gbps=12.5,"
        "intra_latency_us=2,inter_latency_us=20,tflops=100"
    )
    assert (c.nodes, c.devices_per_node, c.num_devices) == (3, 4, 12)
    assert c.memory_per_device_bytes == 40_000_000_000
    assert c.intra_node == Link(150.0, 2e-6)
    assert c.inter_node == Link(12.5, 20e-6)
    assert c.peak_flops == pytest.approx(100e12)
    assert "overridden" in c.source and "memory_gb=40" in c.source


def test_cpu_overrides_and_zero_latency():
    c = parse_cluster("cpu:devices=2,memory_gb=1.5,intra_latency_us=0")
    assert c.memory_per_device_bytes == 1_500_000_000
    assert c.intra_node.latency_s == 0.0


# ---------------------------------------------------------------------------------------------
# Meshes


def test_mesh_enumeration_8_devices():
    c = parse_cluster("cpu:devices=8")
    meshes = c.meshes()
    expected = brute_force_shapes(8, 3)
    assert len(meshes) == len(expected) == 4  # (8), (2,4), (4,2), (2,2,2)
    assert {m.shape for m in meshes} == expected
    assert [m.shape for m in meshes] == [(8,), (2, 4), (4, 2), (2, 2, 2)]
    for m in meshes:
        assert m.num_devices == 8
        assert m.names == ("x", "y", "z")[: len(m.shape)]
        assert all(not a.spans_nodes and a.bandwidth_gbps == 5.0 for a in m.axes)


@pytest.mark.parametrize("n", [1, 2, 12, 16, 24, 64])
@pytest.mark.parametrize("max_axes", [1, 2, 3])
def test_mesh_enumeration_matches_brute_force(n, max_axes):
    c = parse_cluster(f"cpu:devices={n}")
    shapes = [m.shape for m in c.meshes(max_axes)]
    expected = {(1,)} if n == 1 else brute_force_shapes(n, max_axes)
    assert set(shapes) == expected
    assert len(shapes) == len(expected)
    assert shapes == sorted(shapes, key=lambda s: (len(s), s))


def test_one_device_cluster():
    (m,) = parse_cluster("cpu").meshes()
    assert m.shape == (1,) and m.num_devices == 1 and not m.axes[0].spans_nodes
    assert str(m) == "x1"


def test_axis_links_dgx_a100_two_nodes():
    c = parse_cluster("dgx-a100:nodes=2")
    by_shape = {m.shape: m for m in c.meshes()}
    # 16 devices: (16), (2,8), (4,4), (8,2), (2,2,4), (2,4,2), (4,2,2)
    assert set(by_shape) == brute_force_shapes(16, 3) and len(by_shape) == 7

    (x,) = by_shape[(16,)].axes
    assert x.spans_nodes and x.bandwidth_gbps == 25.0

    x, y = by_shape[(2, 8)].axes  # x: {r, r+8} cross nodes; y: ranks 0..7 = node 0
    assert (x.spans_nodes, x.bandwidth_gbps, x.latency_s) == (True, 25.0, pytest.approx(1e-5))
    assert (y.spans_nodes, y.bandwidth_gbps, y.latency_s) == (False, 300.0, pytest.approx(5e-6))

    x, y = by_shape[(8, 2)].axes  # x: {0,2,...,14} crosses nodes; y: {2i, 2i+1} in one node
    assert (x.spans_nodes, x.bandwidth_gbps) == (True, 25.0)
    assert (y.spans_nodes, y.bandwidth_gbps) == (False, 300.0)

    x, y = by_shape[(4, 4)].axes  # x: {0,4,8,12} crosses; y: {0..3} in node
    assert (x.bandwidth_gbps, y.bandwidth_gbps) == (25.0, 300.0)

    x, y, z = by_shape[(4, 2, 2)].axes  # x stride 4 size 4 crosses; y stride 2, z stride 1 don't
    assert [a.spans_nodes for a in (x, y, z)] == [True, False, False]
    assert [a.bandwidth_gbps for a in (x, y, z)] == [25.0, 300.0, 300.0]

    assert str(by_shape[(2, 8)]) == "x2·y8"
    assert by_shape[(2, 8)].axis("y").size == 8
    with pytest.raises(KeyError):
        by_shape[(2, 8)].axis("z")


def test_axis_links_when_nodes_do_not_align():
    # 2 nodes of 6: ranks 0-5 node 0, 6-11 node 1. Shape (3, 4): y's group {4,5,6,7} crosses,
    # so y is inter-node although y is innermost; x's groups {0,4,8} cross as well.
    c = parse_cluster("dgx-a100:nodes=2,gpus_per_node=6")
    m = c.mesh((3, 4))
    assert [a.spans_nodes for a in m.axes] == [True, True]
    # Shape (2, 6): y = one node each, x crosses.
    m = c.mesh((2, 6))
    assert [a.spans_nodes for a in m.axes] == [True, False]
    # Shape (4, 3): y groups {0,1,2}, {3,4,5}, {6,7,8}, {9,10,11} all within a node.
    m = c.mesh((4, 3))
    assert [a.bandwidth_gbps for a in m.axes] == [25.0, 300.0]


def test_mesh_dict_round_trip():
    m = parse_cluster("dgx-a100:nodes=2").mesh((2, 8))
    data = json.loads(json.dumps(m.to_dict()))
    assert Mesh.from_dict(data) == m


def test_mesh_from_dict_errors():
    with pytest.raises(UserError, match="axes"):
        Mesh.from_dict({"axes": []})
    with pytest.raises(UserError, match="size"):
        Mesh.from_dict({"axes": [{"name": "x", "size": 0, "bandwidth_gbps": 1.0,
                                  "latency_s": 0.0, "spans_nodes": False}]})


def test_cluster_dict_round_trip():
    c = parse_cluster("dgx-h100:nodes=4,memory_gb=40")
    data = json.loads(json.dumps(c.to_dict()))
    back = Cluster.from_dict(data)
    assert back == c and back.spec == c.spec


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize(
    "spec",
    ["dgx-a100:nodes=2", "cpu:devices=4", "dgx-h100:nodes=3,intra_latency_us=0.3,tflops=123.456"],
)
def test_file_round_trip(tmp_path, spec):
    c = parse_cluster(spec)
    path = tmp_path / "c.toml"
    write_cluster_file(c, path)
    back = parse_cluster(str(path))
    assert back == c
    assert back.spec == str(path)


def test_file_round_trip_odd_strings(tmp_path):
    c = parse_cluster("cpu:devices=2")
    c = Cluster(**{**c.__dict__, "name": 'we"ird\\name\tµ', "source": "line1\nline2\x7f"})
    path = tmp_path / "odd.toml"
    write_cluster_file(c, path)
    assert parse_cluster(str(path)) == c


TOML_EXAMPLE = """
name = "my-cluster"
nodes = 2
devices_per_node = 4
memory_per_device_gb = 16
peak_tflops = 125
device_type = "cuda"
[intra_node]
bandwidth_gbps = 150
latency_us = 5
[inter_node]
bandwidth_gbps = 12.5
latency_us = 10
"""

YAML_EXAMPLE = """
nodes: 2
devices_per_node: 4
memory_per_device_bytes: 16000000000
peak_flops: 1.25e+14
device_type: cuda
intra_node: {bandwidth_gbps: 150, latency_s: 5e-06}
inter_node: {bandwidth_gbps: 12.5, latency_us: 10}
"""


def test_toml_example(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(TOML_EXAMPLE)
    c = parse_cluster(str(path))
    assert (c.name, c.nodes, c.devices_per_node, c.num_devices) == ("my-cluster", 2, 4, 8)
    assert c.memory_per_device_bytes == 16_000_000_000
    assert c.peak_flops == pytest.approx(125e12)
    assert c.intra_node == Link(150.0, 5e-6)
    assert c.inter_node == Link(12.5, 1e-5)
    assert c.source == f"file: {path}"
    x, y = c.mesh((2, 4)).axes
    assert (x.bandwidth_gbps, y.bandwidth_gbps) == (12.5, 150.0)


def test_yaml_example(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text(YAML_EXAMPLE)
    c = parse_cluster(str(path))
    assert c.name == "other"  # the stem, since no name is given
    assert c.memory_per_device_bytes == 16_000_000_000
    assert c.intra_node == Link(150.0, 5e-6)  # "5e-06" is a string to PyYAML; still a number
    assert c.inter_node == Link(12.5, 1e-5)


def test_single_node_file_without_inter_node(tmp_path):
    path = tmp_path / "box.toml"
    path.write_text(
        'nodes = 1\ndevices_per_node = 2\nmemory_per_device_gb = 8\npeak_tflops = 1\n'
        'device_type = "cpu"\n[intra_node]\nbandwidth_gbps = 5\nlatency_us = 50\n'
    )
    c = parse_cluster(str(path))
    assert c.inter_node == c.intra_node


def test_extensionless_existing_file(tmp_path):
    path = tmp_path / "clusterfile"
    path.write_text(TOML_EXAMPLE)
    assert parse_cluster(str(path)).name == "my-cluster"


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("tpu-v4:nodes=2", "known presets: cpu, dgx-a100, dgx-h100"),
        ("", "empty spec"),
        ("dgx-a100:node=2", "unknown key 'node'"),
        ("cpu:gpus_per_node=2", "unknown key 'gpus_per_node'"),
        ("dgx-a100:nodes=two", "not an integer"),
        ("dgx-a100:nodes=0", "at least 1"),
        ("cpu:devices=-2", "at least 1"),
        ("dgx-a100:memory_gb=abc", "not a number"),
        ("dgx-a100:memory_gb=0", "must be positive"),
        ("dgx-a100:intra_gbps=-5", "must be positive"),
        ("dgx-a100:inter_gbps=0", "must be positive"),
        ("dgx-a100:tflops=nan", "finite"),
        ("dgx-a100:inter_latency_us=-1", ">= 0"),
        ("dgx-a100:nodes", "not key=value"),
        ("missing/cluster.toml", "not found"),
        ("missing.yaml", "not found"),
    ],
)
def test_spec_errors(spec, fragment):
    with pytest.raises(UserError) as info:
        parse_cluster(spec)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


GOOD = {
    "nodes": "2",
    "devices_per_node": "4",
    "memory_per_device_gb": "16",
    "peak_tflops": "125",
    "device_type": '"cuda"',
}
GOOD_LINKS = "[intra_node]\nbandwidth_gbps = 150\nlatency_us = 5\n" \
             "[inter_node]\nbandwidth_gbps = 12.5\nlatency_us = 10\n"


def toml_with(drop: str = "", links: str = GOOD_LINKS, **changes: str) -> str:
    fields = {**GOOD, **changes}
    fields.pop(drop, None)
    return "".join(f"{k} = {v}\n" for k, v in fields.items()) + links


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("nodes = = 2", "malformed TOML"),
        ("nodes = 2\n[intra_node\n", "malformed TOML"),
        (toml_with(drop="nodes"), "missing required field 'nodes'"),
        (toml_with(drop="device_type"), "missing required field 'device_type'"),
        (toml_with(drop="memory_per_device_gb"), "missing required field 'memory_per_device_gb'"),
        (toml_with(links=""), "missing required field 'intra_node'"),
        (toml_with(links="[intra_node]\nbandwidth_gbps = 1\nlatency_us = 1\n"), "'inter_node'"),
        (toml_with(links="[intra_node]\nlatency_us = 1\n[inter_node]\nbandwidth_gbps = 1\n"
                         "latency_us = 1\n"), "missing required field 'bandwidth_gbps'"),
        (toml_with(devices_per_node="0"), "devices_per_node=0 must be at least 1"),
        (toml_with(nodes="2.5"), "must be an integer"),
        (toml_with(nodes='"two"'), "must be an integer"),
        (toml_with(memory_per_device_gb="-16"), "must be positive"),
        (toml_with(memory_per_device_gb='"lots"'), "not a number"),
        (toml_with(peak_tflops="0"), "must be positive"),
        (toml_with(device_type='"tpu"'), "device_type 'tpu' is unknown; use one of cpu, cuda"),
        (toml_with(links=GOOD_LINKS.replace("bandwidth_gbps = 150", "bandwidth_gbps = 0")),
         "[intra_node]: bandwidth_gbps=0.0 must be positive"),
        (toml_with(links=GOOD_LINKS.replace("latency_us = 5", "latency_us = 5\nlatency_s = 1")),
         "not both"),
        (toml_with(gpus="8"), "unexpected field 'gpus'"),
        (toml_with(memory_per_device_bytes="16"), "not both"),
        (toml_with(links=GOOD_LINKS + "jitter_us = 3\n"), "unexpected field 'jitter_us'"),
    ],
)
def test_toml_file_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        parse_cluster(str(path))
    msg = str(info.value)
    assert fragment in msg, msg
    assert "bad.toml" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("nodes: [1, 2\n", "malformed YAML"),
        ("- just\n- a list\n", "not a mapping"),
        ("", "not a mapping"),
        ("nodes: 2\nintra_node: 5\n", "missing required field"),
    ],
)
def test_yaml_file_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        parse_cluster(str(path))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_link_not_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "nodes: 1\ndevices_per_node: 2\nmemory_per_device_gb: 1\npeak_tflops: 1\n"
        "device_type: cpu\nintra_node: 5\n"
    )
    with pytest.raises(UserError, match=r"\[intra_node\]: expected a mapping"):
        parse_cluster(str(path))


def test_directory_and_unreadable_file(tmp_path):
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(UserError, match="not a file"):
        parse_cluster(str(d))
    f = tmp_path / "binary.toml"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="cannot read it"):
        parse_cluster(str(f))


def test_meshes_bad_max_axes_and_bad_shape():
    c = parse_cluster("cpu:devices=4")
    with pytest.raises(UserError):
        c.meshes(0)
    with pytest.raises(UserError, match="multiply to 4"):
        c.mesh((3,))


def test_cluster_construction_validates():
    c = parse_cluster("cpu:devices=2")
    with pytest.raises(UserError, match="device_type"):
        Cluster(**{**c.__dict__, "device_type": "tpu"})
    with pytest.raises(UserError, match="memory_per_device_bytes"):
        Cluster(**{**c.__dict__, "memory_per_device_bytes": 0})
    with pytest.raises(UserError, match="bandwidth"):
        Link(0.0, 1e-6)
