"""Shared fixtures: the real benchmark data in ../shared/data (never copied into the repo)."""

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SHARED_DATA = Path(os.environ.get("MDLITE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with svamp/ and gsm8k/ JSONL files."""
    if not (SHARED_DATA / "svamp" / "test.jsonl").exists():
        pytest.fail(f"benchmark data not found in {SHARED_DATA}; set MDLITE_TEST_DATA")
    return SHARED_DATA


@pytest.fixture
def slow_context_creation(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any, float], threading.Event]:
    """`slow_down(engine, seconds)`: the engine's llama.cpp context creation takes `seconds` longer (as a big KV
    cache's allocation does); returns the event set when a creation starts. `monkeypatch.undo()` restores it."""
    def slow_down(engine: Any, seconds: float) -> threading.Event:
        creating = threading.Event()
        create = engine._llama.llama_init_from_model

        def slow_create(model: Any, params: Any) -> Any:
            creating.set()
            time.sleep(seconds)
            return create(model, params)

        monkeypatch.setattr(engine._llama, "llama_init_from_model", slow_create)
        return creating

    return slow_down
