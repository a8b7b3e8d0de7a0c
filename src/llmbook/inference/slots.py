"""A KV cache with one slot per sequence, and a decode step that runs every slot at its own position.

Chapter 4's ``KVCache`` keeps one ``length`` for the whole batch: every row has
seen the same number of tokens, which is what ``generate`` needs (it pads the
prompts on the left so that they line up). Continuous batching breaks that:
a sequence joins the batch when a slot frees up and leaves when it is done,
so at any step slot 0 may hold 37 tokens and slot 1 only 5. ``SlotKVCache``
therefore keeps, per layer, buffers ``(n_slots, n_kv_heads, max_len, head_dim)``
and one length per slot:

    slot 0: [k0 k1 ... k36 . . . . .]   length 37
    slot 1: [k0 .. k4 . . . . . . . .]  length 5
    slot 2: free

``decode_step`` feeds one new token per busy slot through the model's own
modules and weights (its embeddings, norms, q/k/v and output projections,
MLPs and head), but does attention itself: the new token of a slot at
position p is rotated by RoPE (or given the learned embedding) for position p,
its key and value are written at index p of that slot, and its query attends to
keys 0..p of that slot only (a mask over the other slots' longer lengths).
That is the one thing ``MultiHeadAttention.forward`` cannot do, since it
rotates the whole batch by one offset, ``cache.length``.

Each slot reserves ``max_len`` tokens whether it uses them or not. Paged
attention (vLLM, Kwon et al. 2023) avoids that waste: the cache is a pool of
small fixed-size blocks (16 tokens, say) and each sequence has a *block
table* listing which blocks hold its tokens, like a process's page table maps
virtual pages to physical frames. A sequence takes a new block only when its
last one fills, so at most one partly empty block per sequence is wasted
(instead of ``max_len - length`` slots), many more sequences fit in the same
memory, and sequences that share a prefix (the same system prompt, the
samples of one prompt) can point at the same blocks. The attention kernel
then gathers keys and values through the block table instead of reading one
contiguous row; the arithmetic is the same as here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmbook.attention import KVCache, get_backend, scaled_dot_product_attention
from llmbook.model import GPT

_MASKED_BACKENDS = ("manual", "sdpa")  # backends that take a boolean mask; the flash kernels are for training


class SlotKVCache:
    """Keys and values of up to ``n_slots`` sequences, each with its own length, in every layer of ``model``.

    ``k[layer]``, ``v[layer]``: ``(n_slots, n_kv_heads, max_len, head_dim)``; ``lengths[s]``: tokens slot s holds.
    """

    def __init__(self, model: GPT, n_slots: int, max_len: int | None = None):
        cfg = model.cfg
        max_len = cfg.context_length if max_len is None else max_len
        if not 0 < max_len <= cfg.context_length:
            raise ValueError(f"max_len must be in 1..context_length={cfg.context_length}, got {max_len}")
        if n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        self.n_slots, self.max_len = n_slots, max_len
        caches = model.new_caches(n_slots, max_len)  # the model's dtype and device
        self.k = [c.k for c in caches]
        self.v = [c.v for c in caches]
        self.lengths = [0] * n_slots

    @property
    def nbytes(self) -> int:
        """Memory of all buffers, used or not: what paged attention would not reserve."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def views(self, slot: int) -> list[KVCache]:
        """Chapter 4 caches for one slot, batch 1, that write straight into this cache's buffers (prefill).

        ``model(prompt[None], caches=cache.views(s))`` runs the model's own forward
        and leaves the prompt's keys and values in slot s; ``lengths[s]`` is set by the caller.
        """
        n = self.lengths[slot]
        return [KVCache(k[slot : slot + 1], v[slot : slot + 1], length=n) for k, v in zip(self.k, self.v, strict=True)]

    def free(self, slot: int) -> None:
        """Forget slot s (its buffers are reused, not cleared: the mask never lets anyone read past a length)."""
        self.lengths[slot] = 0


def _slot_attention(
    attn, x: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor, pos: Tensor, mask: Tensor
) -> Tensor:
    """``MultiHeadAttention.forward`` for one new token per slot, each at its own position: ``(A, 1, C) -> (A, 1, C)``.

    The same projections and head split as the layer; RoPE by each row's position;
    k, v written at ``[slot, :, pos]``; attention over keys ``0..max(pos)`` under ``mask``.
    """
    A, T, C = x.shape  # active slots, 1 new token each, d_model
    nh, nkv, hs = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    q = q.view(A, T, nh, hs).transpose(1, 2)  # (A, nh, 1, hs)
    k = k.view(A, T, nkv, hs).transpose(1, 2)  # (A, nkv, 1, hs)
    v = v.view(A, T, nkv, hs).transpose(1, 2)  # (A, nkv, 1, hs)
    if attn.rope is not None:
        q, k = attn.rope(q, pos[:, None]), attn.rope(k, pos[:, None])  # positions (A, 1): one per row
    k_buf[slots, :, pos] = k[:, :, 0]  # (A, nkv, hs) into each slot at its own position
    v_buf[slots, :, pos] = v[:, :, 0]
    t_k = mask.shape[-1]  # the longest slot's length, after this token
    keys, values = k_buf[slots, :, :t_k], v_buf[slots, :, :t_k]  # (A, nkv, t_k, hs)
    backend = get_backend(attn.backend) if attn.backend in _MASKED_BACKENDS else scaled_dot_product_attention
    y = backend(q, keys, values, mask, False, 0.0)  # (A, nh, 1, hs); the mask already is causal per slot
    y = y.transpose(1, 2).contiguous().view(A, T, nh * hs)
    return attn.proj(y)


@torch.no_grad()
def decode_step(model: GPT, cache: SlotKVCache, slots: list[int], tokens: list[int]) -> Tensor:
    """Feed ``tokens[i]`` to slot ``slots[i]`` (at position ``cache.lengths[slot]``); next-token logits ``(A, V)``.

    The model's forward, one token per row, with per-row positions. The block
    is written out here (pre-norm or post-norm, as ``Block.forward``) because its
    attention must be ours; everything else is the model's modules. Advances
    each slot's length by one. The model should be in eval mode (no dropout).
    """
    cfg = model.cfg
    device = cache.k[0].device
    slot_t = torch.tensor(slots, dtype=torch.long, device=device)  # (A,)
    pos = torch.tensor([cache.lengths[s] for s in slots], dtype=torch.long, device=device)  # (A,)
    if int(pos.max()) >= cache.max_len:
        raise ValueError(f"a slot is full: max_len={cache.max_len} tokens; submit shorter requests")
    idx = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # (A, 1)
    x = model.tok_emb(idx)  # (A, 1, C)
    if cfg.positions == "learned":
        x = x + model.pos_emb(pos[:, None])  # (A, 1, C): each row its own position
    x = model.drop(x)
    t_k = int(pos.max()) + 1
    mask = (torch.arange(t_k, device=device)[None, :] <= pos[:, None])[:, None, None, :]  # (A, 1, 1, t_k)
    for i, block in enumerate(model.blocks):
        k_buf, v_buf = cache.k[i], cache.v[i]
        if block.prenorm:
            x = x + block.drop(_slot_attention(block.attn, block.norm1(x), k_buf, v_buf, slot_t, pos, mask))
            x = x + block.mlp(block.norm2(x))
        else:
            x = block.norm1(x + block.drop(_slot_attention(block.attn, x, k_buf, v_buf, slot_t, pos, mask)))
            x = block.norm2(x + block.mlp(x))
    for s in slots:
        cache.lengths[s] += 1
    return model.lm_head(model.norm_f(x))[:, -1]  # (A, V)


@torch.no_grad()
def prefill(model: GPT, cache: SlotKVCache, slot: int, prompt: list[int]) -> Tensor:
    """Run ``prompt`` through the model's own forward into an empty slot; the last position's logits ``(V,)``."""
    if cache.lengths[slot]:
        raise ValueError(f"slot {slot} is busy ({cache.lengths[slot]} tokens); free it first")
    device = cache.k[0].device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    logits, _ = model(idx, caches=cache.views(slot))  # (1, T, V)
    cache.lengths[slot] = len(prompt)
    return logits[0, -1]
