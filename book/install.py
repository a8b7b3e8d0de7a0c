#!/usr/bin/env python3
"""Install requirements.lock into the running virtual environment (`make venv` calls this).

Why a script and not one `pip install -r requirements.lock`: PyPI's Linux build of torch
carries several GB of CUDA libraries that a CPU reader never uses, and it pins its own
triton. So torch comes first, from PyTorch's CPU wheel index when one is given (the
Makefile gives it unless an NVIDIA GPU is present); then the rest of the lock, with the
lock's triton pin dropped where the installed torch pins its own (the CUDA build) or where
triton has no wheels (anything but Linux). Where the index cannot be reached, torch comes
from pip's configured index and one line says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
SUPPORTED = ((3, 11), (3, 12), (3, 13))  # pyproject's requires-python and classifiers, the Makefile's search order
OLDEST = (3, 11, 5)  # soupsieve (via nbconvert) at the locked version: Debian 12's python3 is 3.11.2


def python_problem(version: tuple[int, ...]) -> str | None:
    """One line for an interpreter outside the supported range, None inside it."""
    names = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
    hint = "set PYTHON=python3.13 (or 3.12, 3.11); `uv python find 3.13` prints one uv installed"
    if tuple(version[:2]) not in SUPPORTED:
        return f"the book supports Python {names}, not {version[0]}.{version[1]}: {hint}"
    if tuple(version) < OLDEST:
        shown = ".".join(map(str, version))
        return f"Python {shown} is older than {'.'.join(map(str, OLDEST))}, the oldest the lock installs on: {hint}"
    return None


def lock_lines(text: str) -> list[str]:
    """The pins of requirements.lock, without comments and blank lines."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def pinned_version(lines: list[str], name: str) -> str:
    """The exact version the lock pins for `name`."""
    for line in lines:
        if line.split("==")[0].strip().lower() == name:
            return line.split("==", 1)[1].split(";")[0].split()[0]
    raise SystemExit(f"requirements.lock does not pin {name}")


def torch_pins_triton(torch_requires: list[str]) -> bool:
    """True for torch builds that require a triton of their own (PyPI's CUDA build on Linux)."""
    return any(r.replace(" ", "").lower().startswith("triton") for r in torch_requires)


def lines_to_install(lines: list[str], platform: str, torch_requires: list[str]) -> list[str]:
    """The lock as installed here: triton's pin goes where torch pins its own or no wheel exists."""
    keep_triton = platform.startswith("linux") and not torch_pins_triton(torch_requires)
    return [line for line in lines if keep_triton or not line.lower().startswith("triton==")]


def reachable(index: str, timeout: float = 15.0) -> bool:
    """Whether the wheel index answers for torch (a build machine without internet does not)."""
    try:
        urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=timeout).close()
        return True
    except OSError:
        return False


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)


def dry_run(lines: list[str], torch: str, index: str) -> None:
    """Resolve the install for this interpreter from the indexes' metadata, downloading no wheels.

    CI runs it for 3.13 beside its tests: a few minutes, mostly waiting on the network, where a
    real install costs GBs of downloads. It shows every pin exists for this Python and the pins agree.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "torch.json"
        source = ["--index-url", index] if index and reachable(index) else []
        pip("--dry-run", "--ignore-installed", "--no-deps", "--report", str(report), *source, torch)
        torch_requires = json.loads(report.read_text())["install"][0]["metadata"].get("requires_dist", [])
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("\n".join(lines_to_install(lines, sys.platform, torch_requires)) + "\n")
        extra = ["--extra-index-url", index] if source else []
        pip("--dry-run", "--ignore-installed", "--prefer-binary", *extra, "-r", str(requirements))
    print(f"Python {sys.version_info[0]}.{sys.version_info[1]}: requirements.lock resolves ({len(lines)} pins)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-index", default="", help="wheel index for torch; empty: pip's configured index")
    parser.add_argument("--check-python", action="store_true", help="only check this interpreter's version")
    parser.add_argument("--dry-run", action="store_true", help="resolve the install for this Python, install nothing")
    args = parser.parse_args()
    problem = python_problem(tuple(sys.version_info[:3]))
    if problem or args.check_python:
        sys.exit(problem)
    lines = lock_lines(LOCK.read_text())
    torch = f"torch=={pinned_version(lines, 'torch')}"
    if args.dry_run:
        return dry_run(lines, torch, args.torch_index)

    if args.torch_index and reachable(args.torch_index):
        print(f"{torch} from {args.torch_index}")
        pip("--no-deps", "--index-url", args.torch_index, torch)
    else:
        if args.torch_index:
            print(f"{args.torch_index} cannot be reached: {torch} comes from pip's configured index")
        pip("--no-deps", torch)

    torch_requires = importlib.metadata.requires("torch") or []
    install = lines_to_install(lines, sys.platform, torch_requires)
    if len(install) < len(lines):
        why = "this torch pins its own triton" if torch_pins_triton(torch_requires) else "triton is Linux-only"
        print(f"requirements.lock without its triton pin: {why}")
    requirements = Path(sys.prefix) / "requirements.txt"
    requirements.write_text("\n".join(install) + "\n")
    pip("-r", str(requirements))
    pip("--no-deps", "-e", str(ROOT))


if __name__ == "__main__":
    main()
