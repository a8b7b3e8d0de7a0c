"""The Triton FlashAttention kernels against PyTorch, on CPU under Triton's interpreter (small shapes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmbook.attention import attention_with_lse, causal_mask
from llmbook.kernels import flash_triton as ft

# where the kernels run: CPU tensors under the interpreter here; on a CUDA machine the compiled kernels on the GPU
DEVICE = "cpu" if ft.INTERPRET else "cuda"

# (B, H, H_kv, T_q, T_k, D, causal)
CASES = [
    (1, 2, 2, 1, 1, 16, False),
    (1, 2, 2, 1, 1, 16, True),
    (2, 2, 2, 17, 17, 16, False),
    (2, 2, 2, 17, 17, 16, True),
    (1, 2, 2, 17, 17, 64, False),
    (1, 2, 2, 17, 17, 64, True),
    (1, 8, 2, 17, 17, 16, False),  # grouped-query 8:2
    (1, 8, 2, 17, 17, 16, True),
    (1, 4, 1, 17, 17, 64, True),  # multi-query
    (1, 4, 2, 1, 17, 16, True),  # one new token after 16 cached ones (bottom-right causal)
    (1, 2, 2, 5, 17, 16, True),
    (1, 2, 2, 1, 17, 16, False),
    (1, 2, 2, 100, 100, 16, True),
    (1, 2, 1, 100, 100, 32, False),
    (1, 1, 1, 17, 17, 24, True),  # head dim padded to 32 with masks
    (1, 1, 1, 17, 17, 32, False),
    (1, 1, 1, 33, 33, 128, True),
]


def _inputs(B, H, H_kv, T_q, T_k, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T_q, D, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(B, H_kv, T_k, D, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(B, H_kv, T_k, D, generator=g).to(DEVICE).requires_grad_()
    return q, k, v


def _sdpa(q, k, v, causal, scale=None):
    """PyTorch's attention with our bottom-right causal mask (its is_causal aligns top-left)."""
    mask = causal_mask(q.shape[2], k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("B,H,H_kv,T_q,T_k,D,causal", CASES)
def test_forward_and_gradients_match_pytorch(B, H, H_kv, T_q, T_k, D, causal):
    q, k, v = _inputs(B, H, H_kv, T_q, T_k, D)
    out, lse = ft.flash_forward_triton(q.detach(), k.detach(), v.detach(), causal=causal)
    ref_out, ref_lse = attention_with_lse(q.detach(), k.detach(), v.detach(), is_causal=causal)
    assert out.shape == (B, H, T_q, D) and lse.shape == (B, H, T_q) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)

    dout = torch.randn(B, H, T_q, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(ft.flash_attention_triton(q, k, v, causal=causal), (q, k, v), dout)
    ref_grads = torch.autograd.grad(_sdpa(q, k, v, causal), (q, k, v), dout)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_scale_argument_and_noncontiguous_inputs():
    """A custom scale, and q, k, v as transposed views of (B, T, H, D) tensors: the kernels use the strides."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 20, 4, 16, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 20, 2, 16, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 20, 2, 16, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    out = ft.flash_attention_triton(q, k, v, causal=True, scale=0.3)
    ref = _sdpa(q, k, v, True, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    dout = torch.randn(out.shape, generator=g).to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout),
                         strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_rows_that_see_no_key_give_zero_output_and_gradient():
    """Causal with T_q > T_k: the first T_q - T_k queries come before every key (as in causal_mask)."""
    q, k, v = _inputs(1, 2, 1, 20, 17, 16)
    out, lse = ft.flash_forward_triton(q.detach(), k.detach(), v.detach(), causal=True)
    ref_out, ref_lse = attention_with_lse(q.detach(), k.detach(), v.detach(), is_causal=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)  # -inf in the first three rows
    assert torch.isneginf(lse[..., :3]).all() and (out[..., :3, :] == 0).all()
    dout = torch.ones(1, 2, 20, 16, device=DEVICE)
    dq, dk, dv = torch.autograd.grad(ft.flash_attention_triton(q, k, v, causal=True), (q, k, v), dout)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all() and (dq[..., :3, :] == 0).all()
    ref_dq = torch.autograd.grad(attention_with_lse(q, k, v, is_causal=True)[0], q, dout)[0]
    torch.testing.assert_close(dq, ref_dq, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not ft.INTERPRET, reason="needs the interpreter's known 16 x 16 tiles (a GPU autotunes them)")
def test_causal_kernels_skip_fully_masked_tiles():
    """NaN in tiles a causal program must skip: if it loaded them, 0 * NaN would poison its output.

    With 16 x 16 tiles and T = 32, query tile 0 (rows 0-15) sees no key of key tile 1 (keys 16-31): the
    forward and dQ programs of query tile 0 must not loop over it, and the dK/dV program of key tile 1
    must not loop over query tile 0.
    """
    block = ft.INTERPRETER_CONFIG.kwargs["BLOCK_N"]
    assert block == ft.INTERPRETER_CONFIG.kwargs["BLOCK_M"] == 16
    q, k, v = _inputs(1, 1, 1, 2 * block, 2 * block, 16)
    v_poisoned = v.detach().clone()
    v_poisoned[..., block:, :] = float("nan")
    v_poisoned.requires_grad_()
    out = ft.flash_attention_triton(q, k, v_poisoned, causal=True)
    assert torch.isfinite(out[..., :block, :]).all() and torch.isnan(out[..., block:, :]).all()
    (dq,) = torch.autograd.grad(out[..., :block, :].sum(), (q,))
    assert torch.isfinite(dq[..., :block, :]).all()

    dout = torch.ones(1, 1, 2 * block, 16)
    dout[..., :block, :] = float("nan")
    dk, dv = torch.autograd.grad(ft.flash_attention_triton(q, k, v, causal=True), (k, v), dout)
    assert torch.isfinite(dk[..., block:, :]).all() and torch.isfinite(dv[..., block:, :]).all()


@pytest.mark.parametrize(
    "shapes,dtype,match",
    [
        (((1, 4, 16), (1, 1, 4, 16), (1, 1, 4, 16)), torch.float32, "shape"),
        (((1, 3, 4, 16), (1, 2, 4, 16), (1, 2, 4, 16)), torch.float32, "multiple of k/v"),
        (((1, 2, 4, 16), (1, 2, 4, 16), (1, 2, 5, 16)), torch.float32, "same batch and head_dim"),
        (((1, 1, 4, 256), (1, 1, 4, 256), (1, 1, 4, 256)), torch.float32, "head_dim"),
        (((1, 1, 4, 16), (1, 1, 4, 16), (1, 1, 4, 16)), torch.float64, "float32"),
        (((1, 1, 0, 16), (1, 1, 4, 16), (1, 1, 4, 16)), torch.float32, "non-empty"),
    ],
)
def test_bad_inputs_raise_one_clear_error(shapes, dtype, match):
    q, k, v = (torch.zeros(s, dtype=dtype, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ft.flash_attention_triton(q, k, v)


def test_mixed_devices_and_dtypes_are_refused():
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one device"):
        ft.flash_forward_triton(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="one floating dtype"):
        ft.flash_forward_triton(q, q.double(), q)


def test_cpu_runs_under_the_interpreter_with_one_config():
    if not torch.cuda.is_available():
        assert ft.INTERPRET
    if ft.INTERPRET:
        assert [c.kwargs for c in ft._fwd.configs] == [ft.INTERPRETER_CONFIG.kwargs]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is switched on only where CUDA is missing")
def test_interpreter_works_when_triton_was_imported_first():
    """triton imported with TRITON_INTERPRET unset: tl.zeros, tl.max... must be interpreted all the same."""
    code = (
        "import triton, torch\n"
        "from llmbook.attention import attention_with_lse\n"
        "from llmbook.kernels import flash_triton as ft\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "out, lse = ft.flash_forward_triton(q, q, q, causal=True)\n"
        "torch.testing.assert_close(out, attention_with_lse(q, q, q, is_causal=True)[0], atol=1e-5, rtol=1e-4)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit inputs run on CUDA only (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_on_cuda(dtype, causal):
    """bf16/fp16 in, float32 accumulation inside: as close to SDPA as two 16-bit roundings allow."""
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in _inputs(2, 8, 2, 300, 300, 64))
    dout = torch.randn(2, 8, 300, 64, device="cuda", dtype=dtype)
    out = ft.flash_attention_triton(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout),
                         strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmbook.kernels import flash_triton as ft

# where the kernels run: CPU tensors under the interpreter here; on a CUDA machine the compiled kernels on the GPU
DEVICE = "cpu" if ft.INTERPRET else "cuda"

assert not ft.INTERPRET
pointers = {"Lse": "*fp32", "Delta": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32",
            **{name: "*bf16" for name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")}}
consts = {"HEAD_DIM": 64, "CAUSAL": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "DOT_PRECISION": "tf32"}
for kernel in (ft._fwd_kernel, ft._bwd_preprocess, ft._bwd_dkdv_kernel, ft._bwd_dq_kernel):
    c = {name: value for name, value in consts.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in c else pointers.get(name, "i32")
                 for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs=c), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 3})
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels for real in the other tests")
def test_kernels_compile_for_a_gpu():
    """No GPU here, but Triton can still compile the kernels for one (H100/H200, sm_90, bfloat16, causal):
    a check that the code that only a GPU runs is valid Triton, not only valid Python for the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
