"""Distributed data parallelism (DDP) from scratch: every rank holds the whole model, gradients are averaged.

Each of the p ranks runs the same model on its own slice of the global batch.
After the backward pass the ranks' gradients differ; averaging them gives the
gradient of the whole global batch (the loss is a mean over equal slices), so
every rank then takes the same optimizer step and the copies stay identical.

Three ideas make this fast, and all three are here as in PyTorch's
``DistributedDataParallel``:

- **Buckets.** One all-reduce per parameter pays the fixed latency (α) of a
  collective hundreds of times; one all-reduce of everything waits for the
  whole backward pass. Gradients are packed into buckets of about
  ``bucket_mb`` MB, each all-reduced as one flat tensor.
- **Overlap.** A bucket is sent as soon as the last of its gradients is
  ready (a hook on each parameter), with ``async_op=True``, so the network
  works while autograd computes the gradients of earlier layers. Buckets
  hold the parameters in *reverse* order because backward produces the last
  layer's gradients first.
- **No sync while accumulating.** Inside ``no_sync()`` gradients only add up
  locally; the next backward outside it all-reduces the accumulated sum once.

PyTorch's DDP adds what this version leaves out for clarity: it re-forms the
buckets after the first step in the order gradients actually arrived, can
make ``.grad`` a view into the bucket (``gradient_as_bucket_view``) instead of
copying in and out, finds parameters a forward did not use, and sends a
smaller first bucket (1 MB, then ``bucket_cap_mb=25``) so the network starts early.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Bucket:
    """Parameters whose gradients travel together as one flat tensor of ``numel`` elements."""

    params: list[nn.Parameter]
    numel: int
    ready: int = 0  # how many of ``params`` have their gradient for this backward
    buffer: Tensor | None = None  # the flat gradients while the all-reduce is in flight
    work: dist.Work | None = None  # the handle of the asynchronous all-reduce
    hooks_left_at_launch: int = 0  # gradients still to come when it was sent: > 0 means it overlapped backward


class DataParallel(nn.Module):
    """Wraps ``module`` so that ``loss.backward()`` leaves every rank with the gradient averaged over all ranks.

    Use it like ``torch.nn.parallel.DistributedDataParallel``: build it on
    every rank, call it as the model, and step any optimizer after
    ``backward()``. The waiting for the last buckets is queued on the autograd
    engine (``queue_callback``), the way PyTorch's DDP and FSDP do it: when
    ``backward()`` returns, gradients are averaged, so the optimizer and the
    trainer need no extra call (an explicit ``finish_gradient_sync()`` would
    be one more thing to forget, and gradient clipping must see the averaged
    gradients).
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, group: dist.ProcessGroup | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs a process group: run it under torchrun or llmbook's spawn")
        self.module, self.group = module, group
        self.world_size = dist.get_world_size(group)
        self._sync = True  # False inside no_sync(): gradients accumulate locally
        self._callback_queued = False
        self.buckets_per_backward: list[int] = []  # how many all-reduces each synced backward sent
        self._launched = 0

        # every rank starts from rank 0's weights (and buffers), whatever its own seed gave it
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0, group=group)

        # buckets in reverse registration order: roughly the order backward produces the gradients
        params = [p for p in module.parameters() if p.requires_grad]  # a shared (tied) parameter once
        cap = int(bucket_mb * 2**20)  # bytes
        self.buckets: list[Bucket] = []
        current: list[nn.Parameter] = []
        for p in reversed(params):
            current.append(p)
            if sum(q.nbytes for q in current) >= cap:  # full: close it (a big tensor makes a bucket alone)
                self.buckets.append(Bucket(current, sum(q.numel() for q in current)))
                current = []
        if current:
            self.buckets.append(Bucket(current, sum(q.numel() for q in current)))
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._next = 0  # the next bucket to send: all ranks must send buckets in the same order
        for p in params:
            # fires once per backward, after p.grad holds this backward's whole gradient (tied weights too)
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes in here only accumulate ``.grad`` locally; the next one outside all-reduces the sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # ------------------------------------------------------------------ during backward

    def _grad_ready(self, p: nn.Parameter) -> None:
        """Called by autograd when ``p.grad`` is final for this backward: send its bucket once it is full."""
        if not self._sync:
            return
        if not self._callback_queued:  # the first hook of this backward: wait for everything at its end
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_gradient_sync)
            self._callback_queued = True
        bucket = self._bucket_of[p]
        bucket.ready += 1
        # Send every complete bucket in order. Collectives are matched by their order on each rank, so
        # bucket 3 may not overtake bucket 2 even if its gradients happen to be ready first.
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: Bucket) -> None:
        """Pack the bucket's gradients into one flat tensor and start its all-reduce without waiting."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (bucket.numel,)
        flat.div_(self.world_size)  # divide first, as PyTorch does: the sum of p fp16 gradients may overflow
        bucket.buffer = flat
        bucket.work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        bucket.hooks_left_at_launch = sum(len(b.params) - b.ready for b in self.buckets)
        self._launched += 1

    def finish_gradient_sync(self) -> None:
        """Wait for every bucket and write the averaged gradients back into ``.grad`` (end of backward).

        A bucket whose parameters got no gradient on this rank (an unused
        branch) is sent here with zeros, so that every rank still makes the
        same sequence of collectives.
        """
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for bucket in self.buckets:
            bucket.work.wait()
            offset = 0
            for p in bucket.params:
                averaged = bucket.buffer[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = averaged.clone()
                else:
                    p.grad.copy_(averaged)
                offset += p.numel()
            bucket.ready, bucket.buffer, bucket.work = 0, None, None
        self.buckets_per_backward.append(self._launched)
        self._next, self._launched, self._callback_queued = 0, 0, False
