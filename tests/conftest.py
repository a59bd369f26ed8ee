"""Shared fixtures: the real benchmark data in ../shared/data (never copied into the repo)."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MDLITE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with svamp/ and gsm8k/ JSONL files."""
    if not (SHARED_DATA / "svamp" / "test.jsonl").exists():
        pytest.fail(f"benchmark data not found in {SHARED_DATA}; set MDLITE_TEST_DATA")
    return SHARED_DATA
