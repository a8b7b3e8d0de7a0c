"""Chapter 6: FlashAttention, attention that never materializes the T_q x T_k matrix.

    online_softmax  the (max, sum, output) state that lets a softmax be computed block by block
    tiling          which query x key tiles a causal kernel visits, skips or masks (counted)
    flash_torch     FlashAttention-2's forward and backward in plain PyTorch loops, an autograd Function
    flash_triton    the same algorithm as Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    memory          peak memory of a function, measured on the CPU (profiler) or on CUDA
    roofline        this machine's FLOP/s and bandwidth, and naive attention's bytes and FLOPs

Importing this package registers the attention backends "flash-torch" and
"flash-triton" (``llmbook.attention.register_backend``), so
``ModelConfig(attention="flash-torch")`` trains and generates with them;
``llmbook.attention`` imports this package on its own when it meets those
names. Triton is imported only when "flash-triton" is first called.
"""

from __future__ import annotations

from torch import Tensor

from llmbook.attention import register_backend
from llmbook.kernels.flash_torch import (
    FlashAttentionTorch,
    flash_attention_torch,
    flash_backward_torch,
    flash_forward_torch,
)
from llmbook.kernels.memory import peak_memory
from llmbook.kernels.online_softmax import SoftmaxState, finish, merge, partial_state  # not online_softmax: see below
from llmbook.kernels.tiling import tile_counts, tile_grid

# The function online_softmax is not re-exported: it would hide the module of the same name,
# ``llmbook.kernels.online_softmax``; import it from there.
__all__ = [
    "FlashAttentionTorch", "SoftmaxState", "finish", "flash_attention_torch", "flash_backward_torch",
    "flash_forward_torch", "merge", "partial_state", "peak_memory", "tile_counts", "tile_grid",
]


def _supported(name: str, mask: Tensor | None, dropout_p: float) -> None:
    """The kernels compute causal or full attention without dropout: anything else gets one clear error."""
    if mask is not None or dropout_p > 0.0:
        what = "a mask (e.g. padding)" if mask is not None else f"attention dropout ({dropout_p})"
        raise ValueError(
            f'the "{name}" attention backend does not support {what}; use attention="sdpa" or "manual" '
            "for masked inputs and attention dropout"
        )


def _flash_torch_backend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout_p: float):
    _supported("flash-torch", mask, dropout_p)
    return flash_attention_torch(q, k, v, causal=is_causal)


def _flash_triton_backend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout_p: float):
    _supported("flash-triton", mask, dropout_p)
    from llmbook.kernels.flash_triton import flash_attention_triton  # imports triton: only when first used

    return flash_attention_triton(q, k, v, causal=is_causal)


register_backend("flash-torch", _flash_torch_backend)
register_backend("flash-triton", _flash_triton_backend)
