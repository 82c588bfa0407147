"""Fixtures for the serve tests: adapters on disk and one live server shared by a module."""
from __future__ import annotations

import pytest

import serve_helpers


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    serve_helpers.write_adapters(root, serve_helpers.tokenizer())
    return root


@pytest.fixture(scope="module")
def server(adapter_root):
    """Adapters a, b, c served; d under --adapter-root for run-time loading; no API key."""
    live = serve_helpers.start({n: adapter_root / n for n in ("a", "b", "c")}, adapter_root=adapter_root)
    yield live
    live.close()
