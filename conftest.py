"""Let nbval execute the book's jupytext notebooks directly.

Chapters, solutions and starters are markdown notebooks (``NN_slug.md``); nbval
only reads ``.ipynb``. We collect the markdown files with nbval's own collector
and give nbval a reader that understands both formats, so ``pytest`` runs every
notebook, cell by cell, in a fresh kernel, with no converted copies on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jupytext
import nbformat
import nbval.plugin
from hypothesis import settings

# Property tests explore new examples on a developer's machine, but CI replays a
# fixed set, so a green build stays green for the same code.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

NOTEBOOK_DIRS = {"chapters", "solutions", "exercises"}
NOTEBOOK_NAME = re.compile(r"^\d\d_[\w-]+\.md$")

# Figures must come from the inline backend inside the kernels, never Agg.
os.environ.pop("MPLBACKEND", None)


class _NotebookReader:
    """nbformat, except that a markdown notebook is read through jupytext."""

    def __getattr__(self, name):
        return getattr(nbformat, name)

    @staticmethod
    def read(path, as_version=4, **kwargs):
        if str(path).endswith(".md"):
            return jupytext.read(path)
        return nbformat.read(path, as_version=as_version, **kwargs)


nbval.plugin.nbformat = _NotebookReader()


def pytest_collect_file(file_path: Path, parent):
    opt = parent.config.option
    if (getattr(opt, "nbval", False) or getattr(opt, "nbval_lax", False)) and file_path.parent.name in NOTEBOOK_DIRS:
        if NOTEBOOK_NAME.match(file_path.name):
            return nbval.plugin.IPyNbFile.from_parent(parent, path=file_path)
    return None
