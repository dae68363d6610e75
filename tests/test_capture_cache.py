"""The capture cache: a cached graph is the graph a fresh capture makes, a hit needs no torch,
the key tells specs and captures apart, and a damaged entry is captured again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoddl.engine import capture_cache
from autoddl.engine.workload import capture_graphs, load_workload
from autoddl.model_specs import parse_model_spec

SPEC = "gpt:layers=4,hidden=32,heads=2,seq=8,batch=4,vocab=64"
CLUSTER = "cpu:devices=4"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(capture_cache.CACHE_ENV, str(tmp_path))
    return tmp_path / "capture"


def _same(a, b) -> bool:
    return a.digest() == b.digest() and a.nodes == b.nodes and a.loss == b.loss


def test_cached_graphs_equal_a_fresh_capture(cache):
    first = load_workload(SPEC, CLUSTER)
    assert len(list(cache.glob("*.pickle"))) == 1
    again = load_workload(SPEC, CLUSTER)
    fresh = capture_graphs(parse_model_spec(SPEC), None, True)
    for w in (first, again):
        assert _same(w.graph, fresh.graph)
        assert _same(w.microbatch_graph, fresh.microbatch_graph)
        assert (w.microbatches, w.layers) == (fresh.microbatches, fresh.layers) == (4, 4)


def test_a_hit_imports_no_torch(cache):
    load_workload(SPEC, CLUSTER)
    code = ("import sys; from autoddl.engine.workload import load_workload; "
            f"w = load_workload({SPEC!r}, {CLUSTER!r}); "
            "print(len(w.graph.ops), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) > 0 and out[1] == "False"


def test_key_tells_specs_and_captures_apart():
    spec = parse_model_spec(SPEC)
    base = capture_cache.capture_key(spec, None, True)
    assert base == capture_cache.capture_key(parse_model_spec(SPEC), None, True)
    assert base != capture_cache.capture_key(parse_model_spec(SPEC.replace("seq=8", "seq=16")),
                                             None, True)
    assert base != capture_cache.capture_key(spec, 2, True)
    assert base != capture_cache.capture_key(spec, None, False)


def test_file_models_are_not_cached(tmp_path):
    model = tmp_path / "m.py"
    model.write_text("def factory():\n    pass\n")
    assert not capture_cache.cacheable(parse_model_spec(f"{model}:factory"))
    assert capture_cache.cacheable(parse_model_spec(SPEC))


def test_a_damaged_entry_is_captured_again(cache):
    load_workload(SPEC, CLUSTER)
    (entry,) = cache.glob("*.pickle")
    entry.write_bytes(entry.read_bytes()[:100])
    w = load_workload(SPEC, CLUSTER)
    assert _same(w.graph, capture_graphs(parse_model_spec(SPEC), None, True).graph)
    assert capture_cache.load(entry.stem) is not None  # rewritten whole


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(capture_cache.CACHE_ENV, "off")
    monkeypatch.chdir(tmp_path)
    assert capture_cache.cache_dir() is None
    load_workload(SPEC, CLUSTER)
    assert not list(tmp_path.rglob("*.pickle"))
