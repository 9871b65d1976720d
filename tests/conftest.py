"""Shared test fixtures. Unit tests use the fake backend; integration tests use the real tiny models."""

from __future__ import annotations

import pytest

from moa_local.config import load_recipe
from moa_local.config.recipe import Recipe


@pytest.fixture
def fake_recipe() -> Recipe:
    return load_recipe("fake")
