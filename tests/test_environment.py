"""The pins: requirements.lock is exact; environment.yml, pyproject's uv constraints and any uv.lock mirror it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock must pin exactly: {line}"
            pins[normal(name)] = version
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_mirrors_the_lock():
    env = (ROOT / "environment.yml").read_text()
    env_pins = {
        normal(m.group(1)): m.group(2)
        for m in re.finditer(r"^\s+- ([A-Za-z0-9_.\-]+)==([^\s;]+)(; .*)?$", env, re.M)
    }
    assert env_pins == lock_pins()
    assert re.search(r"^\s+- triton==\S+; sys_platform == \"linux\"$", env, re.M), "triton has Linux wheels only"
    # conda's pip takes torch from PyPI otherwise: the CUDA build, which pins another triton than the lock
    assert re.search(r"^\s+- --extra-index-url https://download.pytorch.org/whl/cpu$", env, re.M)
    python = re.search(r"^\s+- python=(3\.\d+)$", env, re.M).group(1)
    assert f"Programming Language :: Python :: {python}" in pyproject()["project"]["classifiers"]


def test_every_declared_dependency_is_pinned():
    meta = pyproject()["project"]
    declared = meta["dependencies"] + meta["optional-dependencies"]["book"]
    pins = lock_pins()
    for requirement in declared:
        name = normal(re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} is a dependency but not pinned in requirements.lock"
    assert pins["torch"] == "2.13.0"


def test_uv_constraints_are_the_lock():
    """`uv sync` resolves under these constraints, so it installs the lock's versions (book/lock.py writes them)."""
    constraints = pyproject()["tool"]["uv"]["constraint-dependencies"]
    assert dict(c.split("==") for c in constraints) == dict(
        line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_uv_takes_cpu_torch_and_the_book_extra():
    project = pyproject()
    assert project["dependency-groups"]["dev"] == ["llmbook[book]"], "uv sync installs the dev group by default"
    index = {i["name"]: i for i in project["tool"]["uv"]["index"]}["pytorch-cpu"]
    assert index["url"] == "https://download.pytorch.org/whl/cpu" and index["explicit"]
    assert project["tool"]["uv"]["sources"]["torch"] == [{"index": "pytorch-cpu", "marker": "sys_platform != 'darwin'"}]


def test_a_uv_lock_has_the_lock_versions():
    """No uv.lock is committed (see pyproject.toml); one that `uv sync` wrote must hold the lock's versions."""
    path = ROOT / "uv.lock"
    if not path.exists():
        return
    pins = lock_pins()
    for package in tomllib.loads(path.read_text())["package"]:
        name, version = normal(package["name"]), package.get("version", "").split("+")[0]
        if name in pins and "source" in package and "editable" not in package["source"]:
            assert version == pins[name], f"uv.lock has {name} {version}, requirements.lock {pins[name]}"


def test_lock_script_would_write_the_committed_mirrors():
    """book/lock.py writes environment.yml and the uv constraints from the pins: both are what it would write now."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("book_lock", ROOT / "book" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    assert lock.environment_yml(pins) == (ROOT / "environment.yml").read_text()
    text = (ROOT / "pyproject.toml").read_text()
    assert lock.uv_constraints(text, pins) == text
