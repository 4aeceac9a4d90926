"""Shared fixtures: tiny real components, built once per session and seeded."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pipe_factory():
    """Builds fresh tiny-random pipelines (fresh, because tests attach adapters to them)."""
    from diffalign import pipeline

    def make(seed: int = 0):
        return pipeline.load("tiny-random", seed=seed)

    return make


@pytest.fixture()
def tiny_pipe(tiny_pipe_factory):
    return tiny_pipe_factory()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """diffalign's cache (``DIFFALIGN_CACHE``) moved into the test's own folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFALIGN_CACHE", str(folder))
    return folder
