"""Helpers every chapter uses: one-line setup, showing library source, measured tables.

A chapter starts with::

    from llmbook.notebook import setup, show, Table
    setup()

``setup`` seeds everything and makes each matplotlib figure carry both a PNG
(what Jupyter shows) and a vector PDF (what the book embeds). ``show`` prints the
real ``llmbook`` source of a function or class, so the book never pastes a copy
that could drift. ``Table`` turns rows computed in a cell into a table that is
markdown in Jupyter and a captioned, numbered LaTeX table in the PDF.
"""

from __future__ import annotations

import inspect
import platform
import re
import textwrap
from collections.abc import Sequence

from llmbook.seeding import DEFAULT_SEED, seed_everything


def setup(seed: int = DEFAULT_SEED) -> None:
    """Seed all RNGs and configure matplotlib for the book (PNG + PDF, readable sizes)."""
    seed_everything(seed)
    try:
        import matplotlib
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return
    plt.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 110,
            "savefig.bbox": "tight",
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "pdf.fonttype": 42,  # embed TrueType, so text in figures stays searchable
            "svg.fonttype": "none",
        }
    )
    if "inline" in matplotlib.get_backend().lower():
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png", "pdf")


def show(obj, numbered: bool = True) -> None:
    """Print the source of an ``llmbook`` function, class or module, with line numbers.

    >>> from llmbook.units import count
    >>> show(count)                               # doctest: +SKIP
      1 def count(n: float, digits: int = 3) -> str:
      ...
    """
    source = textwrap.dedent(inspect.getsource(obj)).rstrip("\n")
    module = inspect.getmodule(obj)
    origin = module.__name__ if module else "?"
    print(f"# {origin}.{getattr(obj, '__qualname__', '')}".rstrip("."))
    for i, line in enumerate(source.splitlines(), start=1):
        print(f"{i:3d} {line}" if numbered else line)


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials outside ``$...$`` math, so captions may contain math and `code`.

    Markdown code spans become ``\texttt{...}``, as pandoc renders them in the
    prose, instead of printing their backticks.
    """

    def plain(part: str) -> str:
        return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in part)

    out = []
    for part in re.split(r"(\$[^$]+\$|`[^`]+`)", str(text)):
        if len(part) > 1 and part[0] == part[-1] == "$":
            out.append(part)
        elif len(part) > 1 and part[0] == part[-1] == "`":
            out.append(r"\texttt{" + plain(part[1:-1]) + "}")
        else:
            out.append(plain(part))
    return "".join(out)


class Table:
    """A table of computed values: markdown in Jupyter, a numbered LaTeX table in the book.

    ``label`` makes it referable from the prose as ``[Table](#tab-memory)``.
    Columns whose cells are all numbers or formatted quantities are right-aligned.
    """

    def __init__(
        self,
        rows: Sequence[Sequence[object]],
        headers: Sequence[str],
        caption: str = "",
        label: str = "",
    ) -> None:
        if any(len(row) != len(headers) for row in rows):
            raise ValueError(f"every row needs {len(headers)} cells, one per header")
        self.rows = [[str(cell) for cell in row] for row in rows]
        self.headers = list(headers)
        self.caption = caption
        self.label = label

    def _align(self) -> list[str]:
        numeric = re.compile(r"^[-+~≈]?[\d.,]+(e[-+]?\d+)?\s*[A-Za-z%×]*$")
        return [
            "r" if all(numeric.match(row[j].strip()) for row in self.rows) else "l"
            for j in range(len(self.headers))
        ]

    def _repr_markdown_(self) -> str:
        align = {"l": ":--", "r": "--:"}
        lines = []
        if self.caption:
            lines += [f"**Table: {self.caption}**", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join(align[a] for a in self._align()) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def _repr_latex_(self) -> str:
        spec = "".join(self._align())
        body = [
            r"\begin{table}[H]",
            r"\centering\small",
        ]
        if self.caption:
            body.append(r"\caption{" + latex_escape(self.caption) + "}")
        if self.label:
            body.append(r"\label{" + self.label + "}")
        body += [
            r"\begin{tabular}{" + spec + "}",
            r"\toprule",
            " & ".join(r"\textbf{" + latex_escape(h) + "}" for h in self.headers) + r" \\",
            r"\midrule",
            *(" & ".join(latex_escape(c) for c in row) + r" \\" for row in self.rows),
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
        ]
        return "\n".join(body)

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(r[j]) for r in self.rows)) for j, h in enumerate(self.headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
        return "\n".join([line(self.headers), line(["-" * w for w in widths])] + [
            line(r) for r in self.rows
        ])


def machine_summary() -> dict[str, str]:
    """What this notebook runs on: CPU, cores, memory, accelerator, library versions."""
    import os

    import torch

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = f"{mem / 1e9:.1f} GB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": memory,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
