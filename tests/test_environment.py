"""The pins: requirements.lock is exact, environment.yml mirrors it, pyproject agrees."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock must pin exactly: {line}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_environment_yml_mirrors_the_lock():
    env = (ROOT / "environment.yml").read_text()
    env_pins = dict(
        (m.group(1).lower().replace("_", "-"), m.group(2))
        for m in re.finditer(r"^\s+- ([A-Za-z0-9_.\-]+)==(\S+)$", env, re.M)
    )
    assert env_pins == lock_pins()
    assert "python=3.11" in env


def test_every_declared_dependency_is_pinned():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = meta["dependencies"] + meta["optional-dependencies"]["book"]
    pins = lock_pins()
    for requirement in declared:
        name = re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not pinned in requirements.lock"
    assert pins["torch"] == "2.13.0"
