"""llmbook.inference.compiled: torch.compile for decoding, its skip note, and (opt-in) the same greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

from llmbook.inference import compiled
from llmbook.model import GPT, Block, ModelConfig


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("gpt-tiny"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_compile_failure_becomes_a_one_line_skip_note(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Inductor: no working C++ compiler\nlong traceback ...")

    monkeypatch.setattr(compiled, "compiler_missing", lambda: None)
    monkeypatch.setattr(torch, "compile", broken)
    model = tiny()
    result = compiled.compiled_decode(model, prompt_len=4, new_tokens=4, repeats=1)
    assert result.skipped == "torch.compile failed here: RuntimeError: Inductor: no working C++ compiler"
    assert result.eager_tokens_per_s > 0 and result.compiled_tokens_per_s is None and result.speedup is None
    assert all(type(b) is Block for b in model.blocks) and model.training  # the model as it came


def test_no_cxx_compiler_is_said_before_trying(monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert "no C++ compiler" in compiled.compiler_missing()
    result = compiled.compiled_decode(tiny(), prompt_len=4, new_tokens=3, repeats=1)
    assert result.skipped.startswith("torch.compile skipped: no C++ compiler")


def test_bad_input():
    with pytest.raises(ValueError, match="more than the model's context_length=64"):
        compiled.compiled_decode(tiny(), prompt_len=60, new_tokens=8)


# compiling takes 30 s to minutes on a shared 2-core CPU: opt in with LLMBOOK_TEST_COMPILE=1
@pytest.mark.skipif(os.environ.get("LLMBOOK_TEST_COMPILE") != "1",
                    reason="compiling takes 30+ s on 2 cores; set LLMBOOK_TEST_COMPILE=1 to run it")
@pytest.mark.skipif(compiled.compiler_missing() is not None, reason="no C++ compiler for torch.compile")
def test_compiled_decoding_gives_the_same_greedy_tokens():
    result = compiled.compiled_decode(tiny(), prompt_len=8, new_tokens=12, repeats=1)
    assert result.skipped is None, result.skipped
    assert result.identical
    assert result.compile_s > 0 and result.compiled_tokens_per_s > 0 and result.eager_tokens_per_s > 0
