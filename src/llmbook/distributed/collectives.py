"""Collectives: what broadcast, all-reduce, reduce-scatter and all-gather do, a ring all-reduce by hand, and its cost.

Data parallelism needs one operation above all: every rank holds a gradient
tensor of N numbers, and every rank must end with their sum (all-reduce).
Sending everything to one rank and back makes that rank's link carry
``2 (p-1) N`` numbers. The *ring* algorithm splits the tensor into ``p``
chunks and passes chunks around a ring twice: ``p-1`` steps of
reduce-scatter (each rank ends owning the full sum of one chunk), then
``p-1`` steps of all-gather (each rank copies the owned chunks of the
others). Every rank sends ``2 (p-1)/p * N`` numbers, almost independent of
``p``: that is why all-reduce bandwidth does not fall as a cluster grows.

The cost of one collective is modelled as ``t = alpha + beta * n``: a fixed
latency ``alpha`` per call and a time ``beta`` per byte (1/bandwidth).
:func:`time_all_reduce` measures ``t`` for several sizes and
:func:`fit_alpha_beta` fits the two numbers.

Every function that communicates runs inside a process group (see
``llmbook.distributed.launcher.spawn``); the formulas need none.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist


def all_reduce_bytes_per_rank(n_bytes: float, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of an ``n_bytes`` tensor over ``world_size`` ranks: 2(p-1)/p * N."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    return 2 * (world_size - 1) / world_size * n_bytes


def ring_all_reduce_time(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float) -> float:
    """Modelled time of a ring all-reduce: 2(p-1) messages, each paying ``alpha`` plus ``N/p`` bytes at ``beta``."""
    steps = 2 * (world_size - 1)
    return steps * alpha_s + steps * (n_bytes / world_size) * beta_s_per_byte


def _exchange(send: torch.Tensor, recv: torch.Tensor, dst: int, src: int) -> int:
    """Send ``send`` to ``dst`` while receiving ``recv`` from ``src``; return the bytes sent.

    The send is posted asynchronously first: if every rank of the ring did a
    blocking send before its receive, each could wait for its neighbour forever.
    Empty chunks (a tensor with fewer elements than ranks) are neither sent nor
    received; sender and receiver agree, as both index the same chunk.
    """
    request = dist.isend(send, dst) if send.numel() else None
    if recv.numel():
        dist.recv(recv, src)
    if request is not None:
        request.wait()
    return send.numel() * send.element_size()


def ring_reduce_scatter(chunks: Sequence[torch.Tensor]) -> int:
    """Leave this rank holding chunk ``(rank + 1) % p`` summed over all ranks (p - 1 ring steps); return bytes sent.

    At step ``s`` rank ``r`` sends its partial sum of chunk ``(r - s) % p`` to
    rank ``r + 1`` and adds what rank ``r - 1`` sends of chunk ``(r - s - 1) % p``.
    The other chunks are left holding partial sums.
    """
    rank, p = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % p, (rank - 1) % p
    sent = 0
    for step in range(p - 1):
        send, receive_into = chunks[(rank - step) % p], chunks[(rank - step - 1) % p]
        buffer = torch.empty_like(receive_into)
        sent += _exchange(send, buffer, right, left)
        receive_into.add_(buffer)
    return sent


def ring_all_gather(chunks: Sequence[torch.Tensor]) -> int:
    """Copy every rank's owned chunk ``(rank + 1) % p`` to all ranks, in ``p - 1`` ring steps; return bytes sent."""
    rank, p = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % p, (rank - 1) % p
    sent = 0
    for step in range(p - 1):
        send, receive_into = chunks[(rank + 1 - step) % p], chunks[(rank - step) % p]
        buffer = torch.empty_like(receive_into)
        sent += _exchange(send, buffer, right, left)
        receive_into.copy_(buffer)
    return sent


def ring_all_reduce(tensor: torch.Tensor) -> int:
    """Sum ``tensor`` over all ranks in place, like ``dist.all_reduce(tensor)``, with send/recv; return bytes sent.

    The tensor is cut into ``p`` chunks (sizes differ by at most one element
    when ``p`` does not divide it), reduce-scattered and then all-gathered
    around the ring. The result equals ``dist.all_reduce`` up to the order of
    floating-point additions; summed over the ranks, the bytes sent are exactly
    ``2 (p-1) N * itemsize`` (each rank's share is :func:`all_reduce_bytes_per_rank`,
    give or take a few elements when chunks are uneven).
    """
    p = dist.get_world_size()
    if p == 1:
        return 0
    flat = tensor.reshape(-1)  # a view when contiguous, else a copy written back below
    chunks = torch.tensor_split(flat, p)
    sent = ring_reduce_scatter(chunks) + ring_all_gather(chunks)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view_as(tensor))
    return sent


def collectives_demo(rank: int, world_size: int) -> dict[str, list[float]]:
    """Run the four collectives on tiny tensors and return what this rank holds after each (for a table).

    Rank ``r`` starts with ``[10 r, 10 r + 1, ..., 10 r + p - 1]`` so every
    number shows where it came from.
    """
    p = world_size
    mine = torch.arange(p, dtype=torch.float32) + 10 * rank
    broadcast = mine.clone()
    dist.broadcast(broadcast, src=0)  # everyone gets rank 0's tensor
    reduced = mine.clone()
    dist.all_reduce(reduced)  # everyone gets the elementwise sum
    scattered = torch.zeros(1)
    dist.reduce_scatter_single(scattered, mine.clone())  # rank r gets element r of the sum
    gathered = torch.zeros(p * p)
    dist.all_gather_single(gathered, mine)  # everyone gets all tensors, concatenated in rank order
    return {"input": mine.tolist(), "broadcast": broadcast.tolist(), "all_reduce": reduced.tolist(),
            "reduce_scatter": scattered.tolist(), "all_gather": gathered.tolist()}


def time_all_reduce(sizes: Sequence[int], repeats: int = 10, warmup: int = 2,
                    dtype: torch.dtype = torch.float32) -> list[float]:
    """Median seconds of one ``dist.all_reduce`` of a tensor of each size in bytes, on the current group.

    Ranks line up with a barrier, then time a burst of back-to-back calls
    (up to 16 for small messages, whose single call is too short to time and
    too easily skewed by a rank that left the barrier late) and divide. Every
    rank returns the same list: the slowest rank's medians (a collective is
    done when its last rank is).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    itemsize = torch.empty((), dtype=dtype).element_size()
    medians = []
    for n_bytes in sizes:
        tensor = torch.ones(max(1, int(n_bytes) // itemsize), dtype=dtype)
        calls = max(1, min(16, 2**20 // max(1, int(n_bytes))))  # about 1 MB of traffic per timing, at most 16 calls
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                dist.all_reduce(tensor)
            if i >= warmup:
                times.append((time.perf_counter() - start) / calls)
        medians.append(statistics.median(times))
    slowest = torch.tensor(medians, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of ``t = alpha + beta * n``; return ``(alpha_s, beta_s_per_byte)``.

    ``alpha`` is the latency of one call, ``1 / beta`` the bandwidth in bytes
    per second. Needs at least two different sizes.
    """
    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} sizes but {len(seconds)} times; give one time per size")
    if len(set(sizes)) < 2:
        raise ValueError("fit_alpha_beta needs at least two different sizes to separate latency from bandwidth")
    n = torch.tensor(sizes, dtype=torch.float64)
    t = torch.tensor(seconds, dtype=torch.float64)
    n_mean, t_mean = n.mean(), t.mean()
    beta = ((n - n_mean) * (t - t_mean)).sum() / ((n - n_mean) ** 2).sum()
    alpha = t_mean - beta * n_mean
    return float(alpha), float(beta)
