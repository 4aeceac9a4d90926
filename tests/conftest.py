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
