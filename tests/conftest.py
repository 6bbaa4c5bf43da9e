"""Shared fixtures: tiny models (built once per session), the built-in model, golden updating,
and the IOI patching spec most tests start from."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GOLDEN = Path(__file__).resolve().parent / "golden"

#: the IOI prompt pair: both 14 tokens on SmolLM2 and on the tiny tokenizer; the second name
#: (position 9) differs
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
#: the patch of the IOI sweep: the clean residual stream at one (layer, position) cell
PATCH = {"op": "patch", "site": "resid_post.{layer}", "positions": ["{pos}"], "from": "clean"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files")


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


def ratio_tolerance(patched: Any, clean: Any, corrupt: Any, tol: float = 1e-5) -> Any:
    """The tolerance of each ``(patched - corrupt) / (clean - corrupt)`` when each ingredient
    is known within ``tol * (1 + |x|)``: their errors carried through the ratio, so a small
    denominator (a cell where clean and corrupt nearly agree) allows what it amplifies. Float
    sums differ in their last bits between CPUs; a fixed tolerance on a ratio does not hold."""
    import torch

    p, c, k = (torch.as_tensor(x, dtype=torch.float64) for x in (patched, clean, corrupt))
    ratio = (p - k) / (c - k)

    def err(x: Any) -> Any:
        return tol * (1 + x.abs())

    return (err(p) + err(k) + ratio.abs() * (err(c) + err(k))) / (c - k).abs()


def assert_ratio_close(
    actual: Any, patched: Any, clean: Any, corrupt: Any, tol: float = 1e-5
) -> None:
    """``actual`` equals ``(patched - corrupt) / (clean - corrupt)`` within the tolerance
    :func:`ratio_tolerance` gives."""
    import torch

    p, c, k = (torch.as_tensor(x, dtype=torch.float64) for x in (patched, clean, corrupt))
    expected = (p - k) / (c - k)
    bound = ratio_tolerance(p, c, k, tol)
    diff = (torch.as_tensor(actual, dtype=torch.float64) - expected).abs()
    excess = diff - bound
    assert bool((excess <= 0).all()), (
        f"ratio differs beyond its tolerance: worst {float(diff.flatten()[excess.argmax()]):.3g} "
        f"where {float(bound.flatten()[excess.argmax()]):.3g} is allowed"
    )


@functools.cache
def tiny(name: str = "tiny-llama", seed: int = 0):
    """A tiny random model, loaded once per test session."""
    from specsight.models.load import load_model

    return load_model(name, seed=seed, device="cpu")


@functools.cache
def builtin():
    from specsight.models.load import load_model

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


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session, from the machine's initdb/pg_ctl in a temporary
    folder (tests/postgres.py); the tests that need it skip when PostgreSQL is not installed."""
    from tests.postgres import PostgresServer, find_binaries

    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (initdb, pg_ctl, postgres)")
    pytest.importorskip("psycopg", reason="the 'postgres' extra (psycopg 3) is not installed")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


def ioi_spec(
    model: str = "tiny-llama",
    *,
    name: str | None = None,
    sweep: dict[str, Any] | None = None,
    patched: str = "corrupt",
    baseline: str | None = None,
    recovery: str | None = None,
    target: str | int = " Mary",
    foil: str | int = " John",
    ops: list[dict[str, Any]] | tuple = (),
    clean_ops: list[dict[str, Any]] | tuple = (),
    clean_ld: bool = True,
    metrics: dict[str, Any] | None = None,
    invoke_extra: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """The IOI residual patching experiment as spec data.

    Invokes: ``clean``, the unpatched corrupted run ``baseline`` (when named), and ``patched``
    (the corrupted prompt swept over ``sweep``, default every layer x position, with
    :data:`PATCH` and then ``ops``). Metrics: ``ld`` (the logit difference target - foil on the
    patched invoke), ``clean_ld``, ``base_ld`` (with a baseline), a recovery metric named
    ``recovery``, then ``metrics``. ``top`` adds top-level keys (``expect``, ...).
    """

    def logit_diff(invoke: str) -> dict[str, Any]:
        return {"kind": "logit_diff", "invoke": invoke, "target": target, "foil": foil}

    invokes: dict[str, Any] = {"clean": {"prompt": CLEAN}}
    if clean_ops:
        invokes["clean"]["ops"] = list(clean_ops)
    if baseline is not None:
        invokes[baseline] = {"prompt": CORRUPT}
    invokes[patched] = {
        "prompt": CORRUPT,
        "sweep": sweep or {"layer": "all", "pos": "all"},
        "ops": [dict(PATCH), *ops],
        **(invoke_extra or {}),
    }
    measured: dict[str, Any] = {"ld": logit_diff(patched)}
    if clean_ld:
        measured["clean_ld"] = logit_diff("clean")
    if baseline is not None:
        measured["base_ld"] = logit_diff(baseline)
    if recovery is not None:
        measured[recovery] = {
            "kind": "recovery",
            "patched": "ld",
            "clean": "clean_ld",
            "corrupt": "base_ld",
        }
    measured.update(metrics or {})
    head: dict[str, Any] = {"specsight": 1, **({"name": name} if name else {}), "model": model}
    return {**head, "invokes": invokes, "metrics": measured, **top}
