"""Suite-wide settings: one capture cache per test run (never the user's ``~/.cache``), shared
by the test processes, so each model spec is exported once per run and planned from its
cached graph after that (:mod:`autoddl.engine.capture_cache`)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _capture_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # xdist workers' base temps share a parent: one cache for the run
    root = tmp_path_factory.getbasetemp().parent / "autoddl-capture-cache"
    root.mkdir(exist_ok=True)
    os.environ["AUTODDL_CACHE_DIR"] = str(root)
