"""Shared fixtures: tiny models (built once per session), the built-in model, golden updating."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GOLDEN = Path(__file__).resolve().parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files")


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@functools.cache
def tiny(name: str = "tiny-llama", seed: int = 0):
    """A tiny random model, loaded once per test session."""
    from specsight.models import load_model

    return load_model(name, seed=seed, device="cpu")


@functools.cache
def builtin():
    from specsight.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm():
    return builtin()
