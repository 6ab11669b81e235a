"""Benchmarks and kernel correctness tests (owned by performance work; see docs/performance.md).

The default test run passes ``--benchmark-disable`` (pyproject addopts): every benchmark body
still runs once, as a test, without timing loops. Time them with:

    pytest tests/bench --benchmark-enable --benchmark-only

Without pytest-benchmark installed, ``benchmark`` falls back to calling the function once.
"""
from __future__ import annotations

import importlib.util

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: a pytest-benchmark timing (runs once unless --benchmark-enable)")


if importlib.util.find_spec("pytest_benchmark") is None:
    @pytest.fixture
    def benchmark():
        def run(fn, *args, **kwargs):
            return fn(*args, **kwargs)
        run.pedantic = lambda fn, args=(), kwargs=None, **_: fn(*args, **(kwargs or {}))  # type: ignore[attr-defined]
        return run
