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

The slices are cut from *flattened* parameters, as ZeRO does: the tensors of
a bucket (about ``bucket_mb`` MB of one parameter group) laid end to end in
one buffer, padded to a multiple of p and cut into p equal pieces; a rank
owns its piece of every bucket. Giving whole tensors to ranks (round-robin or
by size, as PyTorch's ``ZeroRedundancyOptimizer`` does) needs no flattening,
but balances badly when one tensor (the embedding) is a large share of the
model, and it cannot be cut finer than a tensor.

Gradients are reduced *during* the backward pass, bucket by bucket, as in
DDP (Chapter 8's ``ddp.DataParallel``): a hook on each parameter notes when
its gradient is final, and once a bucket is complete its reduce-scatter (stage
2) or all-reduce (stage 1) starts asynchronously while autograd goes on with
earlier layers. In stage 2 the bucket's full local gradients are dropped as
soon as they are packed, so a rank never holds the whole model's gradient at
once: at most the buckets still in flight, which ``peak_full_gradient_bytes``
measures. With gradient accumulation every backward reduces its micro-batch
and the shards add up (DeepSpeed's ZeRO-2 does the same; stage 2 cannot wait
with a local full gradient, the very thing it saves).

The slice is stepped with the book's ``llmbook.optim.AdamW`` from Chapter 7,
unchanged: it is elementwise, so a shard is just a shorter tensor to it. The
tests check the result against single-process AdamW and against
``ZeroRedundancyOptimizer(torch.optim.AdamW)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmbook.optim import AdamW


@dataclass
class ZeroBucket:
    """One parameter group's tensors laid end to end: the weights are views of ``flat``; a rank owns ``shard``."""

    params: list[Tensor]
    flat: Tensor  # (padded,): the weights, laid end to end and zero-padded to a multiple of p
    shard: Tensor  # (padded / p,): the slice of ``flat`` this rank updates
    ready: int = 0  # how many of ``params`` have their gradient for this backward
    reduced: Tensor | None = None  # stage 2: the shard's averaged gradient; stage 1: the whole averaged bucket
    work: dist.Work | None = None  # the collective in flight

    @property
    def grad_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)


class ZeroOptimizer:
    """AdamW over ``params`` with optimizer states (stage 1) and gradients (stage 2) sharded over the ranks.

    Build it on every rank after the model, then per step: ``loss.backward()``
    (on a plain model, no DDP: this class averages the gradients, during the
    backward pass), ``opt.step()``, ``opt.zero_grad()``. It rewires every
    parameter's ``.data`` to a view of a flat buffer, so the all-gather after
    the step writes the new weights straight into the model; every rank
    starts from rank 0's weights. So build it after the model is on its
    device and in its dtype: a later ``model.to(...)`` or ``deepcopy`` would
    make new tensors that are no longer views of the buffer the optimizer
    updates. In stage 2 the parameters' ``.grad`` are ``None`` after
    backward: the averaged gradient exists only as this rank's shards.

    Pass ``module=model`` with parameter groups: groups list the decayed and
    the undecayed tensors apart, and the buckets should follow the model's
    order, which is (reversed) the order backward finishes gradients in;
    without it, a bucket may wait for a gradient that comes last.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        stage: int = 1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        bucket_mb: float = 25.0,
        group: dist.ProcessGroup | None = None,
        module: nn.Module | None = None,
    ):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}; stage 3 (parameters sharded too) is FSDP")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a positive number of megabytes, got {bucket_mb!r}")
        if not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs a process group: run it under torchrun or llmbook's spawn")
        self.stage, self.group = stage, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        params = list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
        group_params = [[p for p in g.pop("params") if p.requires_grad] for g in groups]
        for ps in group_params:
            if len({(p.dtype, p.device) for p in ps}) > 1:
                raise ValueError("a parameter group mixes dtypes or devices; give each its own group")

        # Buckets in reverse order of the parameters (backward's order), each within one group (its shard is
        # stepped with that group's hyperparameters). ``self.buckets`` is the order in which they are sent,
        # by their last parameter: that is when backward completes them (a group of small tensors, the
        # norms and biases, spreads over the whole model and completes last). Collectives are matched by
        # order, so every rank must send the same buckets in the same sequence: this one, on every rank.
        cap = bucket_mb * 2**20
        group_of = {p: i for i, ps in enumerate(group_params) for p in ps}
        ordered = [p for ps in group_params for p in ps]
        if module is not None:  # parameter groups lose the model's order; the module has it
            rank_of = {p: i for i, p in enumerate(module.parameters())}
            ordered.sort(key=lambda p: rank_of.get(p, len(rank_of)))
        ordered.reverse()
        open_: dict[int, list[Tensor]] = {}
        runs: list[tuple[int, int, list[Tensor]]] = []  # (position of the last parameter, group, params)
        for position, p in enumerate(ordered):
            i = group_of[p]
            open_.setdefault(i, []).append(p)
            if sum(q.nbytes for q in open_[i]) >= cap:  # full: close it (a big tensor makes a bucket alone)
                runs.append((position, i, open_.pop(i)))
        runs += [(len(ordered), i, ps) for i, ps in open_.items()]
        runs.sort(key=lambda run: run[0])
        self.buckets = [self._flatten(ps) for _, _, ps in runs]
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        shards_of_group: list[list[Tensor]] = [[] for _ in groups]
        for (_, i, _), bucket in zip(runs, self.buckets, strict=True):
            shards_of_group[i].append(bucket.shard)
        # the Chapter 7 AdamW, over this rank's shards only: its states are 1/p of a single process's
        inner = [{"params": shards, **g} for shards, g in zip(shards_of_group, groups, strict=True) if shards]
        self.optimizer = AdamW(inner, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

        self._next = 0  # the next bucket to send in this backward
        self._callback_queued = False
        self._full_grad_bytes = 0  # local full gradients alive now (measured as hooks fire)
        self.peak_full_gradient_bytes = 0  # ... and the most at once during a backward
        self.launched_in_backward: list[int] = []  # per backward: buckets sent before the last gradient arrived
        for p in self._bucket_of:
            # fires once per backward, after p.grad holds this backward's whole gradient (tied weights too)
            p.register_post_accumulate_grad_hook(self._grad_ready)

    @torch.no_grad()
    def _flatten(self, ps: list[Tensor]) -> ZeroBucket:
        numel = sum(p.numel() for p in ps)
        padded = -(-numel // self.world_size) * self.world_size  # round up to a multiple of p
        flat = torch.zeros(padded, dtype=ps[0].dtype, device=ps[0].device)  # (padded,)
        offset = 0
        for p in ps:
            n = p.numel()
            flat[offset:offset + n].copy_(p.reshape(-1))
            p.data = flat[offset:offset + n].view_as(p)  # the model now reads its weight from flat
            offset += n
        dist.broadcast(flat, src=0, group=self.group)  # every rank starts from rank 0's weights
        size = padded // self.world_size
        return ZeroBucket(ps, flat, flat[self.rank * size:(self.rank + 1) * size])

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups, so ``set_lr`` and schedules work as on any optimizer."""
        return self.optimizer.param_groups

    # ------------------------------------------------------------------ during backward

    def _grad_ready(self, p: Tensor) -> None:
        """Autograd's call when ``p.grad`` is final for this backward: send every complete bucket, in order."""
        if not self._callback_queued:  # the first hook of this backward: finish everything at its end
            torch.autograd.Variable._execution_engine.queue_callback(self.reduce_gradients)
            self._callback_queued = True
        self._full_grad_bytes += p.grad.nbytes
        self.peak_full_gradient_bytes = max(self.peak_full_gradient_bytes, self._full_grad_bytes)
        self._bucket_of[p].ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    @torch.no_grad()
    def _launch(self, bucket: ZeroBucket) -> None:
        """Pack the bucket's local gradients (zeros where a parameter got none) and start its collective."""
        grad = torch.zeros_like(bucket.flat)  # (padded,)
        offset = 0
        for p in bucket.params:
            if p.grad is not None:
                grad[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                self._full_grad_bytes -= p.grad.nbytes
            p.grad = None  # packed: the local full gradient goes now, not at the end of backward
            offset += p.numel()
        grad.div_(self.world_size)  # sum of grad/p = mean over ranks
        if self.stage == 1:  # every rank gets the whole averaged bucket, and will use 1/p of it
            bucket.reduced, bucket.work = grad, dist.all_reduce(grad, group=self.group, async_op=True)
        else:  # only the averaged slice this rank owns comes back: half the bytes of an all-reduce
            bucket.reduced = torch.empty_like(bucket.shard)
            bucket.work = dist.reduce_scatter(bucket.reduced, list(grad.chunk(self.world_size)), group=self.group,
                                              async_op=True)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Finish this backward's reductions: send the buckets not sent yet, wait, add into each shard's ``.grad``.

        Autograd calls it at the end of every backward; calling it again is
        harmless. A bucket whose parameters got no gradient on this rank is
        still sent (as zeros), so that every rank makes the same collectives.
        """
        if self._next == 0 and not any(p.grad is not None for p in self._bucket_of):
            self._callback_queued = False
            return  # nothing in flight: already reduced, or no backward since the last step
        launched_early = self._next
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for bucket in self.buckets:
            bucket.work.wait()
            if self.stage == 1:
                size = bucket.shard.numel()
                reduced = bucket.reduced[self.rank * size:(self.rank + 1) * size]  # a view: the bucket stays whole
                if bucket.shard.grad is None:
                    bucket.shard.grad = reduced
                else:  # accumulation: add this micro-batch's average into the whole bucket the view reads
                    bucket.shard.grad._base.add_(bucket.reduced)
            else:
                if bucket.shard.grad is None:
                    bucket.shard.grad = bucket.reduced
                else:
                    bucket.shard.grad.add_(bucket.reduced)
            bucket.ready, bucket.reduced, bucket.work = 0, None, None
        self.launched_in_backward.append(launched_early)
        self._next, self._callback_queued = 0, False

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Scale the averaged gradient to global L2 norm <= ``max_norm``; returns the norm before.

        No rank holds the whole (stage 2) or needs it: each sums the squares of
        its shards, one all-reduce adds the p partial sums (the zero padding adds nothing).
        """
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}; to not clip, do not call clip_grad_norm")
        self.reduce_gradients()
        squares = torch.stack([b.shard.grad.square().sum() for b in self.buckets if b.shard.grad is not None]).sum()
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for bucket in self.buckets:
            if bucket.shard.grad is not None:
                bucket.shard.grad.mul_(scale)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's shards with AdamW, then all-gather the weights so every rank has all of them."""
        self.reduce_gradients()
        self.optimizer.step()
        for bucket in self.buckets:
            # every rank sends its updated slice and receives the others': flat is whole again on all ranks
            dist.all_gather(list(bucket.flat.chunk(self.world_size)), bucket.shard.clone(), group=self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop all gradients (``set_to_none`` is accepted for the optimizer interface; they always go)."""
        for bucket in self.buckets:
            bucket.shard.grad = None
            for p in bucket.params:
                p.grad = None
        self._full_grad_bytes = 0

    # ------------------------------------------------------------------ memory, measured from the tensors

    def state_bytes(self) -> int:
        """Bytes of AdamW state on this rank (``exp_avg``, ``exp_avg_sq``, ``step``): about 1/p of one process."""
        return sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if isinstance(t, Tensor))

    def gradient_bytes(self) -> int:
        """Bytes of gradient storage the step holds on this rank (after ``backward``, before ``zero_grad``).

        Measured from the storage behind each shard's gradient: in stage 1 that
        is the whole all-reduced bucket (the shard is a view of it), in stage 2
        only the shard.
        """
        storages = {id(b.shard.grad.untyped_storage()): b.shard.grad.untyped_storage().nbytes()
                    for b in self.buckets if b.shard.grad is not None}
        return sum(storages.values())

    def param_bytes(self) -> int:
        """Bytes of weights on this rank: all of them, in ZeRO-1 and ZeRO-2 (only stage 3 shards these)."""
        return sum(b.flat.nbytes for b in self.buckets)

    def memory_report(self) -> dict:
        """This rank's bytes of weights, gradients and optimizer states, for the chapter's memory table."""
        return {"stage": self.stage, "rank": self.rank, "world_size": self.world_size,
                "param_bytes": self.param_bytes(), "gradient_bytes": self.gradient_bytes(),
                "state_bytes": self.state_bytes(), "peak_full_gradient_bytes": self.peak_full_gradient_bytes}

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state (a sharded checkpoint saves one per rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
