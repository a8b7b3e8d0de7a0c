"""The FlashAttention backends plugged into the GPT: a training step and generation match attention="manual"."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from llmbook.generate import generate
from llmbook.model import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def _triton_kernels_exist() -> bool:
    """Helper module present and triton importable: otherwise the "flash-triton" cases are skipped."""
    return importlib.util.find_spec("triton") is not None and (
        importlib.util.find_spec("llmbook.kernels.flash_triton") is not None
    )


_needs_triton = pytest.mark.skipif(not _triton_kernels_exist(), reason="llmbook.kernels.flash_triton not written yet")
# (backend, preset, overrides, T): Triton's CPU interpreter is slow, so its models are tiny
CASES = [
    pytest.param("flash-torch", "gpt-tiny", {}, 48, id="flash-torch-gpt"),
    pytest.param("flash-torch", "llama-tiny", {}, 48, id="flash-torch-llama-gqa"),
    pytest.param("flash-triton", "gpt-tiny", {"d_model": 32, "n_heads": 2}, 12, marks=_needs_triton,
                 id="flash-triton-gpt"),
    pytest.param("flash-triton", "llama-tiny", {"d_model": 32, "n_heads": 2, "n_kv_heads": 1}, 12,
                 marks=_needs_triton, id="flash-triton-llama-mqa"),
]
BACKENDS = ["flash-torch", pytest.param("flash-triton", marks=_needs_triton)]


def _twins(backend: str, preset: str, overrides: dict) -> tuple[GPT, GPT]:
    """The same weights twice: one model with attention="manual", one with ``backend``."""
    manual = GPT(ModelConfig.preset(preset, **overrides))
    flash = GPT(ModelConfig.preset(preset, **overrides, attention=backend))
    flash.load_state_dict(manual.state_dict())
    return manual, flash


@pytest.mark.parametrize("backend, preset, overrides, T", CASES)
def test_training_step_matches_manual(backend, preset, overrides, T):
    manual, flash = _twins(backend, preset, overrides)
    idx = torch.randint(0, manual.cfg.vocab_size, (2, T))
    targets = torch.randint(0, manual.cfg.vocab_size, (2, T))
    losses = []
    for model in (manual, flash):
        model.train()
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p_manual), p_flash in zip(manual.named_parameters(), flash.parameters(), strict=True):
        assert_close(p_flash.grad, p_manual.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend, preset, overrides, T", CASES)
def test_generation_with_kv_cache_gives_the_same_tokens(backend, preset, overrides, T):
    manual, flash = _twins(backend, preset, overrides)
    prompt = torch.randint(0, manual.cfg.vocab_size, (1, T // 2)).tolist()
    want = generate(manual, prompt, max_new_tokens=T // 2, temperature=0)
    assert generate(flash, prompt, max_new_tokens=T // 2, temperature=0) == want  # prompt at once, then 1 query
    if backend == "flash-torch":  # the same without the cache: T_q = T_k every step
        assert generate(flash, prompt, max_new_tokens=T // 2, temperature=0, use_cache=False) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_or_dropout_is_a_clear_error(backend):
    overrides = {"d_model": 32, "n_heads": 2}
    model = GPT(ModelConfig.preset("gpt-tiny", **overrides, attention=backend)).eval()
    idx = torch.randint(0, 256, (2, 6))
    with pytest.raises(ValueError, match='does not support a mask.*use attention="sdpa" or "manual"'):
        model(idx, mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match='does not support a mask'):  # left-padded prompts of different lengths
        generate(model, [[1, 2, 3], [4]], max_new_tokens=1, temperature=0)
    dropped = GPT(ModelConfig.preset("gpt-tiny", **overrides, dropout=0.1, attention=backend)).train()
    with pytest.raises(ValueError, match='does not support attention dropout.*use attention="sdpa" or "manual"'):
        dropped(idx)
    dropped.eval()(idx)  # no dropout in eval mode: fine


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_works_in_a_fresh_interpreter(backend):
    """ModelConfig(attention=...) imports llmbook.kernels on first use; importing it does not import triton."""
    code = f"""
import sys
from llmbook.model import GPT, ModelConfig
import torch
model = GPT(ModelConfig.preset("gpt-tiny", d_model=32, n_heads=2, attention="{backend}"))
assert "llmbook.kernels" not in sys.modules, "imported too early"
logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
assert logits.shape == (1, 4, 256) and "llmbook.kernels" in sys.modules
print("triton" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    triton_imported = done.stdout.strip().splitlines()[-1] == "True"
    assert triton_imported == (backend == "flash-triton")  # "flash-torch" never loads triton
