"""ZeRO stages 1 and 2 from scratch: each rank keeps the optimizer state (and gradient) of only 1/p of the model.

With plain data parallelism every rank holds the same AdamW states: for
fp32 training that is 8 bytes per parameter (``exp_avg`` and ``exp_avg_sq``),
twice the weights themselves, repeated p times for nothing. ZeRO
(Rajbhandari et al. 2020) notices that AdamW is *elementwise*: the update of
element i needs only element i's weight, gradient and states. So each rank
can own a 1/p slice of all the parameters, keep states for that slice only,
and update only it:

- **stage 1** (optimizer states sharded): all-reduce the gradients as DDP
  does, each rank steps its own slice, then an all-gather gives every rank
  all the updated weights again.
- **stage 2** (gradients sharded too): a rank only needs the *averaged
  gradient of its slice*, which is what a reduce-scatter delivers; it moves
  half the bytes of an all-reduce and leaves 1/p of the gradient per rank.

The slices are cut from the *flattened* parameters, as ZeRO does: all of a
parameter group's tensors laid end to end in one buffer, padded to a multiple
of p and cut into p equal pieces. Giving whole tensors to ranks (round-robin or
by size, as PyTorch's ``ZeroRedundancyOptimizer`` does) needs no flattening,
but balances badly when one tensor (the embedding) is a large share of the
model, and it cannot be cut finer than a tensor.

The slice is stepped with the book's ``llmbook.optim.AdamW`` from Chapter 7,
unchanged: it is elementwise, so a shard is just a shorter tensor to it. The
tests check the result against single-process AdamW and against
``ZeroRedundancyOptimizer(torch.optim.AdamW)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from llmbook.optim import AdamW


class ZeroOptimizer:
    """AdamW over ``params`` with optimizer states (stage 1) and gradients (stage 2) sharded over the ranks.

    Build it on every rank after the model, then per step: ``loss.backward()``
    (on a plain model, no DDP: this class does the gradient averaging),
    ``opt.step()``, ``opt.zero_grad()``. It rewires every parameter's
    ``.data`` to a view of a flat buffer, so the all-gather after the step
    writes the new weights straight into the model; every rank starts from
    rank 0's weights. So build it after the model is on its device and in
    its dtype: a later ``model.to(...)`` or ``deepcopy`` would make new
    tensors that are no longer views of the buffer the optimizer updates.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        stage: int = 1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        group: dist.ProcessGroup | None = None,
    ):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}; stage 3 (parameters sharded too) is FSDP")
        if not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs a process group: run it under torchrun or llmbook's spawn")
        self.stage, self.group = stage, group
        self._reduced = False  # True once this step's gradients are averaged into the shards
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        params = list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]

        self.flat_params: list[Tensor] = []  # one (padded_numel,) buffer per group; the model's weights are views
        self.shards: list[Tensor] = []  # this rank's (padded_numel / p,) slice of each buffer
        self.model_params: list[list[Tensor]] = []
        inner_groups = []
        for g in groups:
            ps = [p for p in g.pop("params") if p.requires_grad]
            if len({(p.dtype, p.device) for p in ps}) > 1:
                raise ValueError("a parameter group mixes dtypes or devices; give each its own group")
            numel = sum(p.numel() for p in ps)
            padded = -(-numel // self.world_size) * self.world_size  # round up to a multiple of p
            like = ps[0] if ps else torch.empty(0)
            flat = torch.zeros(padded, dtype=like.dtype, device=like.device)  # (padded,)
            offset = 0
            with torch.no_grad():
                for p in ps:
                    n = p.numel()
                    flat[offset:offset + n].copy_(p.reshape(-1))
                    p.data = flat[offset:offset + n].view_as(p)  # the model now reads its weight from flat
                    offset += n
                dist.broadcast(flat, src=0, group=group)  # every rank starts from rank 0's weights
            size = padded // self.world_size
            shard = flat[self.rank * size:(self.rank + 1) * size]  # (size,): the elements this rank updates
            self.flat_params.append(flat)
            self.shards.append(shard)
            self.model_params.append(ps)
            inner_groups.append({"params": [shard], **g})
        # the Chapter 7 AdamW, over this rank's shards only: its states are 1/p of a single process's
        self.optimizer = AdamW(inner_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups, so ``set_lr`` and schedules work as on any optimizer."""
        return self.optimizer.param_groups

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the ranks' gradients into each shard's ``.grad``: all-reduce (stage 1) or reduce-scatter (stage 2).

        ``step`` calls this itself; call it first only to clip (``clip_grad_norm``),
        which must see the averaged gradient, not this rank's.
        """
        if self._reduced:
            return
        for flat, shard, ps in zip(self.flat_params, self.shards, self.model_params, strict=True):
            grad = torch.zeros_like(flat)  # (padded,): this rank's local gradient, laid out like flat
            offset = 0
            for p in ps:
                if p.grad is not None:
                    grad[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None  # the local full gradient is not needed any more
                offset += p.numel()
            grad.div_(self.world_size)  # sum of grad/p = mean over ranks
            if self.stage == 1:
                dist.all_reduce(grad, group=self.group)  # every rank gets the whole averaged gradient ...
                size = shard.numel()
                shard.grad = grad[self.rank * size:(self.rank + 1) * size]  # ... and uses 1/p of it
            else:
                shard.grad = torch.empty_like(shard)  # (padded / p,): the only gradient this rank keeps
                dist.reduce_scatter(shard.grad, list(grad.chunk(self.world_size)), group=self.group)
                del grad  # the full local gradient goes; ZeRO-2 proper frees it bucket by bucket in backward
        self._reduced = True

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Scale the averaged gradient to global L2 norm <= ``max_norm``; returns the norm before.

        No rank holds the whole (stage 2) or needs it: each sums the squares of
        its shard, one all-reduce adds the p partial sums (the zero padding adds nothing).
        """
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}; to not clip, do not call clip_grad_norm")
        self.reduce_gradients()
        squares = torch.stack([shard.grad.square().sum() for shard in self.shards]).sum()  # this rank's part
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for shard in self.shards:
            shard.grad.mul_(scale)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """Average the gradients (if not yet), step this rank's shard with AdamW, all-gather the weights."""
        self.reduce_gradients()
        self.optimizer.step()
        for flat, shard in zip(self.flat_params, self.shards, strict=True):
            # every rank sends its updated slice and receives the others': flat is whole again on all ranks
            dist.all_gather(list(flat.chunk(self.world_size)), shard.clone(), group=self.group)
        self._reduced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop all gradients (``set_to_none`` is accepted for the optimizer interface; they always go)."""
        self._reduced = False
        for shard, ps in zip(self.shards, self.model_params, strict=True):
            shard.grad = None
            for p in ps:
                p.grad = None

    # ------------------------------------------------------------------ memory, measured from the tensors

    def state_bytes(self) -> int:
        """Bytes of AdamW state on this rank (``exp_avg``, ``exp_avg_sq``, ``step``): about 1/p of one process."""
        return sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if isinstance(t, Tensor))

    def gradient_bytes(self) -> int:
        """Bytes of gradient storage the step holds on this rank (after ``step``, before ``zero_grad``).

        Measured from the storage behind each shard's gradient: in stage 1 that
        is the whole all-reduced buffer (the shard is a view of it), in stage 2
        only the shard.
        """
        storages = {id(s.grad.untyped_storage()): s.grad.untyped_storage().nbytes()
                    for s in self.shards if s.grad is not None}
        return sum(storages.values())

    def param_bytes(self) -> int:
        """Bytes of weights on this rank: all of them, in ZeRO-1 and ZeRO-2 (only stage 3 shards these)."""
        return sum(f.nbytes for f in self.flat_params)

    def memory_report(self) -> dict:
        """This rank's bytes of weights, gradients and optimizer states, for the chapter's memory table."""
        return {"stage": self.stage, "rank": self.rank, "world_size": self.world_size,
                "param_bytes": self.param_bytes(), "gradient_bytes": self.gradient_bytes(),
                "state_bytes": self.state_bytes()}

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state (a sharded checkpoint saves one per rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
