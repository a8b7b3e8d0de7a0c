"""llmbook.notebook and llmbook.seeding: tables, escaping, show, determinism."""

from __future__ import annotations

import torch

from llmbook.notebook import Table, latex_escape, machine_summary, show
from llmbook.seeding import seed_everything


def test_latex_escape_renders_code_spans():
    assert latex_escape("the `TRAIN_PRESETS` recipe, 5%") == r"the \texttt{TRAIN\_PRESETS} recipe, 5\%"


def test_latex_escape_keeps_math():
    assert latex_escape("50% of $x_1$ & more_") == r"50\% of $x_1$ \& more\_"


def test_table_renders_markdown_and_latex():
    t = Table([["gpt2", "124M"], ["llama", "6.74B"]], ["model", "params"],
              caption="Sizes", label="tab-sizes")
    md = t._repr_markdown_()
    assert "| model | params |" in md and "|:--|--:|" in md
    tex = t._repr_latex_()
    assert r"\caption{Sizes}" in tex and r"\label{tab-sizes}" in tex
    assert r"\begin{tabular}{lr}" in tex


def test_table_rejects_ragged_rows():
    import pytest

    with pytest.raises(ValueError, match="2 cells"):
        Table([["a"]], ["x", "y"])


def test_show_prints_real_source(capsys):
    from llmbook.units import count

    show(count)
    out = capsys.readouterr().out
    assert out.startswith("# llmbook.units.count") and "  1 def count(" in out


def test_seed_everything_is_deterministic():
    seed_everything(7)
    a = torch.randn(5)
    seed_everything(7)
    assert torch.equal(a, torch.randn(5))


def test_machine_summary_has_the_basics():
    info = machine_summary()
    assert int(info["cores"]) >= 1 and info["torch"].startswith("2.")
