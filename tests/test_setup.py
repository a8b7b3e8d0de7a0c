"""Set-up on Python 3.11-3.13: the Makefile's interpreter and torch choices, book/install.py's lock filter, CI."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_TORCH = ["filelock", 'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"', "sympy>=1.13.3"]
CPU_TORCH = ["filelock", "sympy>=1.13.3", 'pyyaml; extra == "pyyaml"']
LOCK = ["numpy==2.4.6", "torch==2.13.0", "triton==3.9.0"]


def install_module():
    spec = importlib.util.spec_from_file_location("book_install", ROOT / "book" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supported_pythons_agree_everywhere():
    install = install_module()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    versions = [f"{a}.{b}" for a, b in install.SUPPORTED]
    lowest, _, highest = project["requires-python"].partition(",")
    assert lowest.startswith(f">={versions[0]}") and highest == f"<3.{install.SUPPORTED[-1][1] + 1}"
    assert project["classifiers"] == [f"Programming Language :: Python :: {v}" for v in versions]
    makefile = (ROOT / "Makefile").read_text()
    assert f"foreach v,{' '.join(reversed(versions))}," in makefile, "the Makefile looks for the newest first"


def test_python_outside_the_range_gets_one_line():
    install = install_module()
    assert install.python_problem((3, 12, 1)) is None and install.python_problem((3, 11, 5)) is None
    message = install.python_problem((3, 10, 13))
    assert "not 3.10" in message and "PYTHON=python3.13" in message and "\n" not in message
    message = install.python_problem((3, 11, 2))  # Debian 12's python3: too old for the lock's soupsieve
    assert "3.11.2 is older than 3.11.5" in message and "\n" not in message
    oldest = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"].split(",")[0]
    assert oldest == ">=" + ".".join(map(str, install.OLDEST))


def test_triton_pin_kept_for_the_cpu_build_on_linux():
    install = install_module()
    assert install.lines_to_install(LOCK, "linux", CPU_TORCH) == LOCK


def test_triton_pin_dropped_where_torch_pins_its_own_or_has_no_wheel():
    install = install_module()
    assert install.lines_to_install(LOCK, "linux", CUDA_TORCH) == LOCK[:2]
    assert install.lines_to_install(LOCK, "darwin", CPU_TORCH) == LOCK[:2]
    assert install.pinned_version(install.lock_lines((ROOT / "requirements.lock").read_text()), "torch") == "2.13.0"


def test_unreachable_index_is_reported_not_raised():
    assert install_module().reachable("http://127.0.0.1:9/", timeout=2) is False


def dry_run(tmp_path: Path, path: str, *args: str) -> str:
    """The commands `make venv` would run for a fresh venv under tmp_path, with PATH as given."""
    env = {**os.environ, "PATH": path}
    env.pop("TORCH_INDEX", None)
    out = subprocess.run(["make", "-n", "--no-print-directory", "venv", f"VENV={tmp_path / 'v'}", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None or os.uname().sysname != "Linux", reason="needs make on Linux")
def test_makefile_chooses_the_torch_index(tmp_path):
    bare = os.environ["PATH"]
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (gpu / "nvidia-smi").chmod(0o755)
    if shutil.which("nvidia-smi") is None:
        assert f'--torch-index "{CPU_INDEX}"' in dry_run(tmp_path, bare)
    assert '--torch-index ""' in dry_run(tmp_path, f"{gpu}:{bare}"), "with an NVIDIA GPU, PyPI's default build"
    assert '--torch-index "https://example.org/whl"' in dry_run(tmp_path, bare, "TORCH_INDEX=https://example.org/whl")
    assert "--check-python" in dry_run(tmp_path, bare, "PYTHON=python3.13")


def test_fast_subset_names_files_that_exist():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    tests = re.search(r"^FAST_TESTS := (.*)$", makefile, re.M).group(1).split()
    chapter = re.search(r"^FAST_CHAPTER := (.*)$", makefile, re.M).group(1).strip()
    assert tests and all((ROOT / t).is_file() for t in tests + [chapter])
    assert "tests/test_setup.py" in tests


def test_ci_tests_the_interpreter_the_book_was_executed_with():
    ci = (ROOT / ".ci" / "run").read_text()
    env_python = re.search(r"^\s+- python=(3\.\d+)$", (ROOT / "environment.yml").read_text(), re.M).group(1)
    assert f"PYTHON=python{env_python}" in ci
    assert 'book/install.py --dry-run' in ci and "for v in 3.13 3.12" in ci, "CI resolves the lock for a newer Python"


def test_readme_names_each_set_up_path():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):]
    setup = setup[: setup.index("\n## ", 1)]
    for needle in ["Linux", "macOS", "WSL", "TORCH_INDEX", "uv sync", "uv run make book", "environment.yml",
                   "make PYTHON=python3.12", "make test-fast", CPU_INDEX]:
        assert needle in setup, f"the README's set-up section does not mention {needle}"
