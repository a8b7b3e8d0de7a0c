"""Tensor parallelism from scratch: every layer's weight matrices split across ranks (Megatron-LM).

Data parallelism (``ddp``, ``zero``) gives every rank the whole model and a
slice of the batch. Tensor parallelism gives every rank the whole batch and a
slice of *every weight matrix*, so a layer too big for one device fits on p
of them, and each does 1/p of the layer's arithmetic. Shoeybi et al. (2019,
"Megatron-LM") found the placement that needs only two all-reduces per
transformer block in the forward pass, and two in the backward pass.

A linear layer ``y = x Wᵀ`` with ``W`` of shape ``(out, in)`` can be split two ways:

    column parallel   rank r holds rows r·out/p .. of W      y_r = x W_rᵀ is a slice of y's features
                      (Megatron's "columns" are those of Wᵀ)  no communication: each rank has its slice
    row parallel      rank r holds columns r·in/p .. of W    x must already be split by features;
                                                             y = Σ_r x_r W_rᵀ: one all-reduce of the sums

Chaining them costs one all-reduce for two matmuls: the MLP's first matrix
goes column-parallel (each rank computes d_ff/p hidden features, and GELU
works feature by feature, so it needs nothing from the other ranks), the
second row-parallel (each rank's d_ff/p features give a partial sum of the
output). Attention is the same with heads as the "features": the fused
q, k, v projection is column-parallel *by heads* (rank r gets query heads
r·H/p .. and their key/value heads), each rank attends with its own heads
alone, and the output projection is row-parallel. Embeddings, norms and the
LM head stay replicated: every rank computes them on the same numbers.

Two conjugate operators place the communication, and autograd moves it to
the right place in the backward pass:

    f = copy_to_parallel       forward: identity      backward: all-reduce
    g = reduce_from_parallel   forward: all-reduce    backward: identity

``f`` sits where the replicated activation enters a parallel region (each
rank's gradient with respect to x covers only its slice of the matrix; the
full gradient is their sum), ``g`` where the partial sums leave it. Per block:
f, attention, g, f, MLP, g: two all-reduces of a ``(B, T, d_model)``
activation forward, two backward. Communication is per *layer*, on the
critical path, which is why tensor parallelism stays inside one node's fast
links (NVLink) in practice, and data parallelism goes across nodes.

Left out for clarity: sequence parallelism (Korthikanti et al. 2022: norms
and dropout split over tokens, all-reduce replaced by reduce-scatter +
all-gather), a vocabulary-parallel embedding and cross-entropy, and the RNG
bookkeeping that lets dropout inside the parallel region differ per rank
(use ``attention_dropout=0``; dropout on the replicated stream is fine because
``spawn`` and torchrun seed every rank alike).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llmbook.attention import MultiHeadAttention
from llmbook.distributed.collectives import all_reduce_bytes_per_rank
from llmbook.layers import MLP, SwiGLU
from llmbook.model import GPT

# --- Recording the communication: how many all-reduces, of how many bytes -------------------------------------------


@dataclass
class AllReduceRecord:
    """One all-reduce that a tensor-parallel layer sent: in which pass, of what shape and size."""

    phase: Literal["forward", "backward"]
    shape: tuple[int, ...]
    nbytes: int


_LOGS: list[list[AllReduceRecord]] = []


@contextlib.contextmanager
def record_all_reduces() -> Iterator[list[AllReduceRecord]]:
    """Inside the ``with``, every all-reduce of ``f`` and ``g`` is appended to the yielded list.

    >>> with record_all_reduces() as log:  # doctest: +SKIP
    ...     model(x, y)[1].backward()
    >>> sum(r.phase == "forward" for r in log)  # doctest: +SKIP
    4
    """
    log: list[AllReduceRecord] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None, phase: Literal["forward", "backward"]) -> Tensor:
    """The sum of ``x`` over the group's ranks, in a new tensor (autograd may still need ``x``)."""
    out = x.contiguous().clone()
    for log in _LOGS:
        log.append(AllReduceRecord(phase, tuple(out.shape), out.numel() * out.element_size()))
    dist.all_reduce(out, group=group)
    return out


# --- f and g: the two conjugate operators -----------------------------------------------------------------------------


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x.view_as(x)  # a view, so autograd records this op (returning x itself would skip it)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group, "backward"), None


class _ReduceFromParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        return _all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def copy_to_parallel(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """f: enter a parallel region. Forward returns x; backward sums the ranks' gradients with respect to x.

    Each rank's part of the region uses x through its own slice of the
    weights, so its gradient ``dL/dx`` holds only that slice's contribution;
    x fed all the slices, so the true gradient is the sum over ranks.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """g: leave a parallel region. Forward sums the ranks' partial results; backward passes the gradient on.

    The sum's gradient with respect to each term is the gradient of the sum
    itself, which every rank already holds whole: nothing to communicate.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _ReduceFromParallel.apply(x, group)


# --- Which slice each rank holds --------------------------------------------------------------------------------------


def _slice_index(size: int, rank: int, world_size: int, what: str) -> Tensor:
    if size % world_size:
        raise ValueError(
            f"{what}={size} is not divisible by the world size {world_size}; choose sizes that split evenly"
        )
    n = size // world_size
    return torch.arange(rank * n, (rank + 1) * n)


def shard_rows(t: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s equal slice of ``t`` along dim 0 (a column-parallel weight): rows of 6 on 2 ranks -> 0-2, 3-5."""
    return t.index_select(0, _slice_index(t.shape[0], rank, world_size, "rows").to(t.device)).clone()


def shard_columns(t: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s equal slice of ``t`` along its last dim (a row-parallel weight)."""
    return t.index_select(-1, _slice_index(t.shape[-1], rank, world_size, "columns").to(t.device)).clone()


def qkv_rows(n_heads: int, n_kv_heads: int, head_dim: int, rank: int, world_size: int) -> Tensor:
    """The rows of a fused ``(H + 2·Hkv)·hd`` q, k, v projection that rank ``rank`` holds: its heads' rows.

    The fused matrix stacks all query heads, then all key heads, then all
    value heads. An even split of its rows would give rank 0 every query head
    and rank 1 the keys and values, so each rank instead takes its query heads
    ``r·H/p ..`` from the q block and the k/v heads they use from the k and v
    blocks. With grouped-query attention query head h reads k/v head
    ``h // (H/Hkv)``, so query heads ``r·H/p ..`` read exactly k/v heads ``r·Hkv/p ..``.
    H=4, Hkv=2, hd=1 on 2 ranks: rank 0 holds rows [0, 1, 4, 6], rank 1 rows [2, 3, 5, 7].
    """
    for name, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if n % world_size:
            raise ValueError(
                f"{name}={n} is not divisible by the tensor-parallel world size {world_size}: attention is "
                f"split by heads; use a world size that divides both n_heads and n_kv_heads"
            )
    q = _slice_index(n_heads * head_dim, rank, world_size, "n_heads·head_dim")
    k = n_heads * head_dim + _slice_index(n_kv_heads * head_dim, rank, world_size, "n_kv_heads·head_dim")
    v = (n_heads + n_kv_heads) * head_dim + _slice_index(n_kv_heads * head_dim, rank, world_size, "n_kv_heads·head_dim")
    return torch.cat([q, k, v])


def _gather(local: Tensor, index: Tensor, full_size: int, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Put every rank's slice back where it came from: ``full.index_select(dim, index_r) == local_r``."""
    world = dist.get_world_size(group)
    locals_ = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(locals_, local.contiguous(), group=group)
    index = index.to(local.device)
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(indices, index, group=group)
    shape = list(local.shape)
    shape[dim] = full_size
    full = local.new_empty(shape)
    for part, idx in zip(locals_, indices, strict=True):
        full.index_copy_(dim, idx, part)
    return full


# --- The two parallel linears -----------------------------------------------------------------------------------------


def _group_rank_size(group: dist.ProcessGroup | None, who: str) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who} needs a process group: run it under torchrun or llmbook's spawn")
    return dist.get_rank(group), dist.get_world_size(group)


class ColumnParallelLinear(nn.Linear):
    """A linear layer whose rank holds a slice of the *output* features: ``W_r`` = some rows of W.

    ``y_r = x W_rᵀ + b_r`` is this rank's slice of the full output: no
    communication in the forward pass. The input x is the full, replicated
    activation; ``copy_input=True`` passes it through f so that the backward
    pass sums the ranks' gradients with respect to x (set it False when the
    caller applies f once for several layers that read the same x, as
    SwiGLU's gate and up do). ``rows`` says which rows of the full
    ``(out_features, in_features)`` matrix this rank holds (default: the
    rank's equal contiguous slice). An ``nn.Linear`` subclass, so weight
    decay grouping (``llmbook.optim.param_groups``) and ``in_features``
    keep working; ``out_features`` is this rank's count.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group: dist.ProcessGroup | None = None,
        rows: Tensor | None = None, copy_input: bool = True, device=None, dtype=None,
    ):
        rank, world = _group_rank_size(group, "ColumnParallelLinear")
        rows = _slice_index(out_features, rank, world, "out_features") if rows is None else rows.long().cpu()
        super().__init__(in_features, len(rows), bias=bias, device=device, dtype=dtype)
        self.full_out_features, self.rows, self.group, self.copy_input = out_features, rows, group, copy_input

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group: dist.ProcessGroup | None = None, rows: Tensor | None = None,
        copy_input: bool = True,
    ) -> ColumnParallelLinear:
        """This rank's slice of an existing full ``nn.Linear`` (same weights as the slice of it)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, rows, copy_input,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w[layer.rows.to(w.device)])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[layer.rows.to(w.device)])
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input:
            x = copy_to_parallel(x, self.group)  # f: the backward sums dL/dx over the ranks
        return F.linear(x, self.weight, self.bias)  # (..., out_features / p): this rank's features

    def gather(self, t: Tensor) -> Tensor:
        """The full tensor from every rank's slice of the weight or the bias (or their gradients); collective."""
        return _gather(t, self.rows, self.full_out_features, 0, self.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_out_features={self.full_out_features}"


class RowParallelLinear(nn.Linear):
    """A linear layer whose rank holds a slice of the *input* features: ``W_r`` = some columns of W.

    The input must already be split by features (the output of a
    column-parallel layer, or of attention heads): rank r multiplies its
    ``x_r`` by ``W_r`` and gets a *partial sum* of the output; g all-reduces
    the partial sums. The bias is added once, after the all-reduce: added
    before it, it would be counted p times. ``in_features`` is this rank's count.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group: dist.ProcessGroup | None = None,
        cols: Tensor | None = None, device=None, dtype=None,
    ):
        rank, world = _group_rank_size(group, "RowParallelLinear")
        cols = _slice_index(in_features, rank, world, "in_features") if cols is None else cols.long().cpu()
        super().__init__(len(cols), out_features, bias=bias, device=device, dtype=dtype)
        self.full_in_features, self.cols, self.group = in_features, cols, group

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group: dist.ProcessGroup | None = None, cols: Tensor | None = None
    ) -> RowParallelLinear:
        """This rank's slice of an existing full ``nn.Linear``; the bias is copied whole (it is replicated)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, cols,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w[:, layer.cols.to(w.device)])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        partial = F.linear(x, self.weight)  # (..., out_features): this rank's share of the sum
        y = reduce_from_parallel(partial, self.group)  # g: the sum over ranks, on every rank
        return y if self.bias is None else y + self.bias

    def gather(self, t: Tensor) -> Tensor:
        """The full weight from every rank's columns (collective); the bias is replicated and returned as is."""
        if t.dim() == 1:
            return t.clone()
        return _gather(t, self.cols, self.full_in_features, 1, self.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_in_features={self.full_in_features}"


# --- Attention split by heads -----------------------------------------------------------------------------------------


def split_attention_heads(attn: MultiHeadAttention, group: dist.ProcessGroup | None = None) -> MultiHeadAttention:
    """Keep only this rank's heads of ``attn``, in place: ``n_heads/p`` query heads and their ``n_kv_heads/p``.

    The module's own forward runs unchanged: q, k, v come out of ``qkv`` with
    this rank's heads, each head attends on its own (heads never mix inside
    attention, which is what makes the split free), and ``proj`` receives the
    rank's ``n_heads·head_dim`` features, a row-parallel layer whose
    all-reduce adds the ranks' parts. Its KV cache (``new_cache``) holds this
    rank's k/v heads only: the cache is split across ranks too.
    """
    rank, world = _group_rank_size(group, "split_attention_heads")
    rows = qkv_rows(attn.n_heads, attn.n_kv_heads, attn.head_dim, rank, world)
    attn.qkv = ColumnParallelLinear.from_linear(attn.qkv, group, rows=rows)
    attn.proj = RowParallelLinear.from_linear(attn.proj, group)  # its inputs are the heads side by side: contiguous
    attn.n_heads, attn.n_kv_heads = attn.n_heads // world, attn.n_kv_heads // world
    return attn


# --- The whole model --------------------------------------------------------------------------------------------------


def _copy_input_hook(group: dist.ProcessGroup | None, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: f applied once to a module's input (SwiGLU's gate and up both read it)."""
    return (copy_to_parallel(args[0], group), *args[1:])


def _parallelize_mlp(mlp: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Column-parallel up, row-parallel down, in place (names kept: ``fc``/``proj`` or ``gate``/``up``/``down``)."""
    if isinstance(mlp, MLP):
        mlp.fc = ColumnParallelLinear.from_linear(mlp.fc, group)  # GELU acts per feature: no communication
        mlp.proj = RowParallelLinear.from_linear(mlp.proj, group)
    elif isinstance(mlp, SwiGLU):
        # silu(gate) * up multiplies feature by feature, so gate and up split alike. Both read x: one f for both
        # (a hook on the MLP), so their gradients with respect to x add up locally and cross the network once
        mlp.gate = ColumnParallelLinear.from_linear(mlp.gate, group, copy_input=False)
        mlp.up = ColumnParallelLinear.from_linear(mlp.up, group, copy_input=False)
        mlp.down = RowParallelLinear.from_linear(mlp.down, group)
        mlp.register_forward_pre_hook(functools.partial(_copy_input_hook, group))
    else:
        raise TypeError(f"parallelize_gpt knows llmbook's MLP and SwiGLU, not {type(mlp).__name__}")


def parallelize_gpt(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Split an ``llmbook.model.GPT`` across the ranks of ``group`` in place, Megatron's way; returns the model.

    Every rank must call it with the same model (its weights are first
    broadcast from the group's rank 0, as DDP does). Afterwards every rank
    holds, per block, ``n_heads/p`` query heads with their ``n_kv_heads/p``
    key/value heads and ``d_ff/p`` MLP features; embeddings, norms and the
    LM head are replicated. Every rank feeds the *same* batch and gets the
    same logits and loss; the replicated parameters get the same gradients on
    every rank, so any optimizer keeps them equal without communication.
    Parameter names stay those of the unsharded model (``gather_state_dict``
    rebuilds its full state dict).
    """
    _, world = _group_rank_size(group, "parallelize_gpt")
    if not isinstance(model, GPT):
        raise TypeError(f"parallelize_gpt takes an llmbook.model.GPT, got {type(model).__name__}")
    if any(isinstance(b.attn.qkv, ColumnParallelLinear) for b in model.blocks):
        raise ValueError("this model is already tensor parallel; call parallelize_gpt once per model")
    cfg = model.cfg
    n_kv = cfg.n_kv_heads or cfg.n_heads
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", n_kv), ("the MLP width d_ff", cfg.ff_dim)):
        if n % world:
            raise ValueError(
                f"{name}={n} is not divisible by the tensor-parallel world size {world}; "
                f"use a world size that divides n_heads, n_kv_heads and d_ff"
            )
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():  # every rank starts from the same full model: rank 0's
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=src, group=group)
    for block in model.blocks:
        split_attention_heads(block.attn, group)
        _parallelize_mlp(block.mlp, group)
    return model


def _sharded(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(full name, parameter name, module)`` for every parameter of a parallel linear."""
    for mod_name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            for p_name, _ in module.named_parameters(recurse=False):
                yield f"{mod_name}.{p_name}", p_name, module


def _is_split(module: nn.Module, p_name: str) -> bool:
    """True for a parameter each rank holds a different slice of; a row-parallel bias is whole on every rank."""
    return isinstance(module, ColumnParallelLinear) or (isinstance(module, RowParallelLinear) and p_name == "weight")


def gather_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded model's state dict, on every rank (collective: every rank must call it).

    The keys and shapes are those of the model before ``parallelize_gpt``,
    so ``GPT(cfg).load_state_dict(gather_state_dict(tp_model))`` works.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for full_name, p_name, module in _sharded(model):
        state[full_name] = module.gather(getattr(module, p_name).detach())
    return state


def gather_grads(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter's full gradient by name, as the unsharded model would have it (collective)."""
    sharded = {name: (p_name, module) for name, p_name, module in _sharded(model)}
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name in sharded:
            grads[name] = sharded[name][1].gather(p.grad)
        else:
            grads[name] = p.grad.detach().clone()
    return grads


def clip_grad_norm(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """Clip a tensor-parallel model's gradients by their global norm, the unsharded model's; return that norm.

    ``llmbook.optim.clip_grad_norm`` on one rank would see only its slices of
    the split matrices. The squared norm is a sum over entries, so each rank
    sums the squares of its slices, one all-reduce adds the ranks' sums, and
    the replicated parameters (the same on every rank) are counted once.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}; to not clip, do not call clip_grad_norm")
    split = {id(getattr(m, n)) for _, n, m in _sharded(model) if _is_split(m, n)}
    grads = [(p.grad, id(p) in split) for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    zero = torch.zeros((), device=grads[0][0].device)
    local = sum((g.float().pow(2).sum() for g, is_split in grads if is_split), zero.clone())
    replicated = sum((g.float().pow(2).sum() for g, is_split in grads if not is_split), zero.clone())
    dist.all_reduce(local, group=group)  # the split parameters' squares, over all ranks
    total = torch.sqrt(local + replicated)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g, _ in grads:
        g.mul_(scale.to(g.device))
    return total


@dataclass
class TPCommunication:
    """What one transformer block sends under tensor parallelism, per training step (forward + backward)."""

    message_bytes: int  # one all-reduced activation: B·T·d_model values
    all_reduces_forward: int  # after attention, after the MLP
    all_reduces_backward: int  # the gradients with respect to the attention and MLP inputs
    bytes_sent_per_rank: float  # ring all-reduce: 2(p-1)/p of each message, for all four


def communication_per_block(
    batch_size: int, seq_len: int, d_model: int, world_size: int, bytes_per_value: int = 4
) -> TPCommunication:
    """Megatron's cost: 2 all-reduces of ``B·T·d`` values forward and 2 backward, per block.

    GPT-2 small's width (768) with 8 sequences of 1024 tokens in bf16 on 2
    ranks: each message is 12.6 MB, and each rank sends 50.3 MB per block
    and step, whatever the block's weights weigh: unlike data parallelism,
    the traffic grows with the batch, not with the model.

    >>> c = communication_per_block(8, 1024, 768, 2, bytes_per_value=2)
    >>> c.message_bytes / 1e6, c.bytes_sent_per_rank / 1e6
    (12.582912, 50.331648)
    """
    message = batch_size * seq_len * d_model * bytes_per_value
    return TPCommunication(message, 2, 2, 4 * all_reduce_bytes_per_rank(message, world_size))
