"""Setup in two layers: the quickstart installs the core only (no llama.cpp build), the test command adds the
test extras and llama-cpp-python; project.license is an SPDX string (the table form stops building in 2027)."""
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> str:
    return (ROOT / "scripts" / name).read_text()


def test_quickstart_installs_the_core_layer_only():
    assert "bash scripts/setup.sh\n" in _script("quickstart.sh")
    setup = _script("setup.sh")
    core = setup[: setup.index("exit 0")]  # what runs before the core layer exits
    assert "$INSTALL -e .\n" in core and "[test]" not in core
    assert "$PIP wheel" not in core and "llama-cpp-python[server]" not in core


def test_the_test_command_adds_the_test_layer_and_ci_runs_it():
    assert "bash scripts/setup.sh --test\n" in _script("test.sh")
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert 'llama-cpp-python[server]==$LLAMA_CPP_VERSION' in _script("setup.sh")


def test_setup_refuses_an_unknown_layer(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--everything"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in meta["build-system"]["requires"]
    core = meta["project"]["dependencies"]
    assert not any("llama" in d or "pytest" in d for d in core)
