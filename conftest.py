"""Let pytest execute the book's jupytext notebooks, once, for the tests and the PDFs alike.

Chapters, solutions and starters are markdown notebooks (``NN_slug.md``). Each
is one test item: it runs every cell in a fresh kernel (``build_pdf.run_notebook``,
the same executor ``make book`` uses) and fails with the cell and its error.
The executed notebook goes into ``build/cache`` under a key of its text, the
package's sources and the lock file, so ``make book`` after ``make test``
executes nothing again, and a rerun after a failure or Ctrl-C skips what
already passed. ``--fresh`` re-executes anyway.

``pytest chapters/05_transformer.md`` checks one chapter; ``pytest --nbval-lax
chapters/05_transformer.md`` hands it to nbval instead, cell by cell.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jupytext
import nbformat
import nbval.plugin
import pytest
from hypothesis import settings

import build_pdf

# Property tests explore new examples on a developer's machine, but CI replays a
# fixed set, so a green build stays green for the same code.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

NOTEBOOK_DIRS = set(build_pdf.KINDS)
NOTEBOOK_NAME = re.compile(r"^\d\d_[\w-]+\.md$")

# Figures must come from the inline backend inside the kernels, never Agg.
os.environ.pop("MPLBACKEND", None)


class _NotebookReader:
    """nbformat, except that a markdown notebook is read through jupytext (for ``--nbval``)."""

    def __getattr__(self, name):
        return getattr(nbformat, name)

    @staticmethod
    def read(path, as_version=4, **kwargs):
        if str(path).endswith(".md"):
            return jupytext.read(path)
        return nbformat.read(path, as_version=as_version, **kwargs)


nbval.plugin.nbformat = _NotebookReader()


def pytest_addoption(parser):
    parser.addoption("--fresh", action="store_true",
                     help="execute notebooks even when build/cache holds a current execution")


_TIMES: list[tuple[str, float | None, bool]] = []


class NotebookFailure(Exception):
    pass


class NotebookItem(pytest.Item):
    """One notebook, executed top to bottom in a fresh kernel."""

    def __init__(self, *, kind: str, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def runtest(self):
        try:
            nb, cached = build_pdf.executed_in_build(self.path, self.kind, self.config.getoption("fresh"))
        except build_pdf.BuildError as exc:
            details = getattr(exc, "details", "")
            tail = "\n".join(details.strip().splitlines()[-25:])
            raise NotebookFailure(f"{exc}\n\n{tail}" if tail else str(exc)) from None
        _TIMES.append((f"{self.kind}/{self.path.name}", build_pdf.execution_seconds(nb), cached))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, NotebookFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.kind}/{self.path.name}"


class NotebookFile(pytest.File):
    def collect(self):
        yield NotebookItem.from_parent(self, name="execute", kind=self.path.parent.name)


def pytest_collect_file(file_path: Path, parent):
    if file_path.parent.name not in NOTEBOOK_DIRS or not NOTEBOOK_NAME.match(file_path.name):
        return None
    opt = parent.config.option
    if getattr(opt, "nbval", False) or getattr(opt, "nbval_lax", False):
        return nbval.plugin.IPyNbFile.from_parent(parent, path=file_path)
    return NotebookFile.from_parent(parent, path=file_path)


def pytest_collection_finish(session):
    """Train (or resume) the reference models the selected notebooks load, first and visibly.

    Inside a test item the training would be silent (pytest captures output);
    here it shows its progress bar, and the items then only load the cache.
    """
    if session.config.option.collectonly:
        return
    stems = set()
    for item in session.items:
        if isinstance(item, NotebookItem):
            stems.add(item.path.stem)
        elif hasattr(item, "callspec") and "chapter" in item.callspec.params:  # tests/test_exercises.py
            stems.add(getattr(item.callspec.params["chapter"], "stem", ""))
    models = sorted({m for ch in build_pdf.load_book().chapters if ch.stem in stems for m in ch.models})
    if not models:
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        try:
            build_pdf.ensure_models(models, progress=True)
        except build_pdf.BuildError as exc:  # the notebooks that need the model fail with the same line
            print(f"\nerror: {exc}")


def pytest_terminal_summary(terminalreporter):
    """Per-notebook execution times, for CI's log: what each notebook costs and what came from the cache."""
    if not _TIMES:
        return
    terminalreporter.section("notebook execution times")
    total = 0.0
    for label, seconds, cached in _TIMES:
        total += seconds or 0.0
        how = "from build/cache, executed earlier in" if cached else "executed in"
        terminalreporter.write_line(f"{label:44s} {how} {seconds} s")
    executed_now = sum(1 for _, _, cached in _TIMES if not cached)
    terminalreporter.write_line(f"{len(_TIMES)} notebooks, {executed_now} executed now; "
                                f"their executions take {total:.0f} s in all")
