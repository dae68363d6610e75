"""A disk cache of captured graphs, so a preset or library model is exported once per machine.

Capturing a model (building it on the ``meta`` device and running ``torch.export``) costs a few
seconds, most of them importing torch and tracing; planning a repeated-layer model costs about
as much again. The :class:`~autoddl.engine.graph.OpGraph` that capture produces is plain data,
so ``autoddl plan``, ``compare`` and the Python API keep it on disk and reuse it: a second
command for the same model reads it back in milliseconds, without importing torch at all.

What is cached: the built-in models and the library models (``hf-…``, ``tv-…``, ``timm-…``),
never a user's ``file.py:factory`` (its source, and whatever it imports, can change under us).

The key is a SHA-256 of everything the graphs are a function of: the parsed model spec
(every field, its text included), the captures asked for (micro-batch graph or not, the
micro-batch count), the versions of torch and of the model libraries, and a digest of
autoddl's own source (any change to capture, rules or models starts a fresh entry). An entry is written to a
temporary file and renamed into place, so a reader sees a whole entry or none; an entry that
cannot be read (truncated, from another Python) is ignored and captured again.

Location: ``$AUTODDL_CACHE_DIR`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/autoddl`` or ``~/.cache/autoddl``; entries live under ``capture/``.

This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import autoddl
from autoddl.engine.graph import OpGraph
from autoddl.model_specs import FILE_MODEL, ModelSpec

#: the environment variable naming the cache folder (``off``: no cache)
CACHE_ENV = "AUTODDL_CACHE_DIR"
#: libraries whose versions change what a model spec builds
_LIBRARIES = ("torch", "transformers", "timm", "torchvision")
#: bump when the entry layout changes
_FORMAT = 1


@dataclass(frozen=True)
class Captured:
    """The graphs ``load_workload`` captures for one model spec: the whole batch (with three
    layers when ``layers`` is set), the first micro-batch (or None), and the micro-batch
    count and layer count they were made for."""

    graph: OpGraph
    microbatch_graph: OpGraph | None
    microbatches: int
    layers: int | None


def cache_dir() -> Path | None:
    """The folder holding cached captures, or None when the cache is off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "no") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autoddl"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over autoddl's own ``.py`` files (paths and contents)."""
    root = Path(autoddl.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cacheable(spec: ModelSpec) -> bool:
    """Whether captures of ``spec`` may be cached (not a user's file model)."""
    return spec.name != FILE_MODEL


def capture_key(spec: ModelSpec, microbatches: int | None, with_microbatch: bool) -> str:
    """The cache key of the captures of ``spec`` (see the module docstring)."""
    fields = {
        "format": _FORMAT,
        "spec": repr(spec),  # every field of the parsed spec, whatever kinds it grows
        "microbatches": microbatches,
        "with_microbatch": with_microbatch,
        "libraries": {p: _version(p) for p in _LIBRARIES},
        "autoddl": source_digest(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _entry(key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / "capture" / f"{key}.pickle"


def load(key: str) -> Captured | None:
    """The cached captures under ``key``, or None (absent, unreadable, or cache off)."""
    path = _entry(key)
    if path is None or not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            got = pickle.load(f)
    except Exception:  # a damaged or foreign entry is a miss, never an error
        return None
    return got if isinstance(got, Captured) else None


def store(key: str, captured: Captured) -> None:
    """Keep ``captured`` under ``key`` (atomically; silently skipped where the folder cannot
    be written: the cache only ever saves time)."""
    path = _entry(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pickle")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(captured, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return
