"""Checks for Chapter 8's exercises: a ring all-reduce by hand, ZeRO's bytes per rank, bucket sizing.

The ring all-reduce is checked where it must run: on 2 and 4 ranks started
with ``llmbook.distributed.launcher.spawn``, against ``dist.all_reduce``, with
the library's collectives switched off while the reader's function runs (so a
call to ``dist.all_reduce`` inside it is caught). A rank that waits forever
(every rank in a blocking ``send``) shows up as a timeout, which the check
turns into the hint about ``isend``. The memory arithmetic is compared with
``llmbook.distributed.sharding_memory.per_rank_memory``, the formulas the
chapter prints. The bucket timeline has its reference here (``finish_time``):
the library's DDP measures real buckets but does not simulate a timeline.
As in the other chapters, a wrong answer is compared with the answers the
usual mistakes give, and the check names the mistake it recognises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from llmbook.exercises import exercise

# ---------------------------------------------------------------------------
# 8.1 the ring all-reduce, by the reader, on 2 and 4 ranks
# ---------------------------------------------------------------------------

_RING_CASES = [  # (what, shape, average); a shape (rows, cols, "T") is the transpose of a (cols, rows) tensor
    ("12 values (divisible by p)", (12,), False),
    ("10 values (uneven chunks on 4 ranks)", (10,), False),
    ("a 3 x 5 matrix", (3, 5), False),
    ("1,001 values", (1001,), False),
    ("12 values with average=True", (12,), True),
    ("10 values with average=True", (10,), True),
    ("a transposed 6 x 4 matrix (not contiguous: .view(-1) fails)", (4, 6, "T"), False),
]
_BLOCKED = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather",
            "all_gather_into_tensor", "all_gather_single",
            "broadcast", "reduce", "all_to_all", "all_to_all_single")


def _ring_hint(got: torch.Tensor, mine: torch.Tensor, inputs: list[torch.Tensor], average: bool,
               rank: int, p: int) -> str:
    total = torch.stack(inputs).sum(0)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    if close(got, mine):
        return ("; the tensor still holds this rank's own values: write the result into `tensor` in place "
                "(work on views such as torch.tensor_split(tensor.view(-1), p), or finish with tensor.copy_(...))")
    if average and close(got, total):
        return "; that is the sum: with average=True divide the result by the world size p"
    if not average and close(got, total / p):
        return "; that is the average: divide by p only when average=True"
    flat_got, flat_total = got.reshape(-1), total.reshape(-1)
    chunks_got, chunks_total = torch.tensor_split(flat_got, p), torch.tensor_split(flat_total, p)
    right = [close(a, b / (p if average else 1)) for a, b in zip(chunks_got, chunks_total, strict=True)]
    if any(right) and not all(right):
        return (f"; only chunks {[i for i, ok in enumerate(right) if ok]} of {p} hold the sum on rank {rank}: after "
                "the reduce-scatter's p - 1 steps rank r owns the sum of chunk (r + 1) % p, and the all-gather's "
                "p - 1 steps must pass each owned chunk on: at step s send chunk (r + 1 - s) % p and overwrite "
                "chunk (r - s) % p with what arrives (a chunk index off by one breaks this)")
    left = inputs[(rank - 1) % p]
    if close(got, mine + left) or close(got, (mine + left) / p):
        return "; only the left neighbour's values were added: the reduce-scatter needs p - 1 steps, not one"
    return ("; check the neighbours and the chunk indices: rank r sends to (r + 1) % p and receives from "
            "(r - 1) % p; in reduce-scatter step s it sends chunk (r - s) % p and adds the received values "
            "into chunk (r - s - 1) % p")


def _ring_rank(rank: int, world_size: int, ring_all_reduce) -> dict:
    """Run the reader's ring on every case; return the first failure as text (a rank cannot raise cleanly)."""
    p = world_size
    for i, (what, shape, average) in enumerate(_RING_CASES):
        g = torch.Generator().manual_seed(8100 + 97 * i + rank)
        mine = torch.randn(shape[:2], generator=g).t() if "T" in shape else torch.randn(shape, generator=g)
        gathered = [torch.empty_like(mine) for _ in range(p)]
        dist.all_gather(gathered, mine)  # every rank's input, to build the answers of the usual mistakes
        expected = mine.clone()
        dist.all_reduce(expected)
        if average:
            expected /= p
        tensor = mine.clone().t().contiguous().t() if "T" in shape else mine.clone()  # clone keeps the strides
        saved = {name: getattr(dist, name) for name in _BLOCKED if hasattr(dist, name)}

        def refuse(*args, _name="", **kwargs):
            raise AssertionError(f"ring_all_reduce called dist.{_name}: build it from point-to-point "
                                 "dist.isend / dist.irecv (or send / recv) only")

        for name in saved:
            setattr(dist, name, lambda *a, _name=name, **k: refuse(*a, _name=_name, **k))
        try:
            returned = ring_all_reduce(tensor, average=average)
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        got = tensor
        if returned is not None and returned is not tensor:
            return {"error": f"ring_all_reduce({what}) returned {type(returned).__name__} {returned!r:.40}; it must "
                             "sum in place into its argument, like dist.all_reduce (return nothing, or that tensor)"}
        if got.shape != expected.shape:
            return {"error": f"ring_all_reduce({what}) changed the tensor's shape to {tuple(got.shape)}"}
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
            err = (got - expected).abs().max().item()
            return {"error": f"ring_all_reduce({what}) on {p} ranks: rank {rank} differs from dist.all_reduce by "
                             f"up to {err:.3g}{_ring_hint(got, mine, gathered, average, rank, p)}"}
    return {"error": None}


@exercise("8.1", solution="ring_all_reduce")
def check_ring_all_reduce(ring_all_reduce, timeout_s: float = 60.0):
    from llmbook.distributed.launcher import RankError, spawn

    for p in (2, 4):
        try:
            results = spawn(_ring_rank, p, ring_all_reduce, timeout_s=timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"ring_all_reduce on {p} ranks did not finish within {timeout_s:.0f} s: the ranks wait for each "
                "other. If every rank calls a blocking dist.send before its dist.recv, each waits for its right "
                "neighbour to receive, forever. Post the send without waiting (req = dist.isend(...)), then "
                "receive (dist.recv or dist.irecv(...).wait()), then req.wait()") from None
        except RankError as exc:
            if exc.error_type == "NotImplementedError":
                raise NotImplementedError from None
            hint = ""
            if "view size is not compatible" in exc.rank_traceback:
                hint = ("\nHint: a tensor that is not contiguous (a transposed matrix) has no flat view; work on "
                        "tensor.contiguous() and copy the result back into tensor at the end\n")
            raise AssertionError(f"ring_all_reduce failed on rank {exc.rank} of {p}: {exc.error_type}{hint}\n"
                                 f"{exc.rank_traceback}") from None
        for r in results:
            if r["error"]:
                raise AssertionError(r["error"])


# ---------------------------------------------------------------------------
# 8.2 ZeRO: bytes per rank
# ---------------------------------------------------------------------------

_MEMORY_CASES = [  # (n_params, world_size, precision)
    (7e9, 8, "mixed"),
    (6_738_415_616, 64, "mixed"),
    (1_840_256, 2, "fp32"),
    (70e9, 16, "bf16"),
    (1e6, 1, "mixed"),
]


def _zero_mistakes(n: float, p: int, strategy: str, precision: str) -> list[tuple[float, str]]:
    from llmbook.planning import PRECISIONS

    b = PRECISIONS[precision]
    stage = ("ddp", "zero1", "zero2", "fsdp").index(strategy)
    mistakes = [(n * b.total, "that is the unsharded total (DDP): each stage shards more of the states")]
    if stage >= 1:
        mistakes.append((n * (b.weights + b.grads + b.master) + n * b.optimizer / p,
                         "the fp32 master weights are optimizer state (part of ZeRO's K = 12): stage 1 shards "
                         "them with AdamW's moments"))
        mistakes.append((n * b.total / p, "only stage 3 (FSDP) shards everything; this stage keeps some roles whole"))
    if stage == 1:
        mistakes.append((n * b.weights + n * (b.grads + b.optimizer + b.master) / p,
                         "stage 1 shards only the optimizer states; the gradients are sharded from stage 2 on"))
    if stage == 2:
        mistakes.append((n * (b.weights + b.grads) + n * (b.optimizer + b.master) / p,
                         "stage 2 shards the gradients too (a reduce-scatter leaves each rank 1/p of them)"))
    if stage >= 1 and p > 1:
        for other in ("fp32", "mixed", "bf16"):
            if other != precision and PRECISIONS[other] != b:
                from llmbook.distributed.sharding_memory import per_rank_memory

                mistakes.append((per_rank_memory(n, p, strategy, other).states,
                                 f"those are the bytes of precision {other!r}: read the bytes per role from "
                                 "llmbook.planning.PRECISIONS[precision]"))
    return mistakes


@exercise("8.2", solution="zero_bytes_per_rank")
def check_zero_bytes_per_rank(zero_bytes_per_rank):
    from llmbook.distributed.sharding_memory import STRATEGIES, per_rank_memory

    for n, p, precision in _MEMORY_CASES:
        for strategy in STRATEGIES:
            expected = per_rank_memory(n, p, strategy, precision).states
            got = zero_bytes_per_rank(n, p, strategy, precision)
            what = f"zero_bytes_per_rank({n:g}, {p}, {strategy!r}, {precision!r})"
            if got is None:
                raise AssertionError(f"{what} returned None; did you forget `return`?")
            if abs(got - expected) <= 1e-6 * expected:
                continue
            # several mistakes can give the same number (fp32's 4 + 4 + 8 equals mixed precision's 2 + 2 + 4 + 8
            # with the master copy left whole, in stage 1): name every one that matches
            hints = [h for value, h in _zero_mistakes(n, p, strategy, precision) if abs(got - value) <= 1e-6 * value]
            hint = "".join(f"; {'or ' if i else ''}{h}" for i, h in enumerate(hints))
            raise AssertionError(f"{what} = {got!r}, expected {expected!r} bytes{hint}")


# ---------------------------------------------------------------------------
# 8.3 and 8.4 buckets on a backward timeline
# ---------------------------------------------------------------------------


def finish_time(bucket_bytes: float, grad_bytes: Sequence[float], ready_s: Sequence[float],
                alpha: float, beta: float, mistake: str | None = None) -> float:
    """When the last bucket's all-reduce ends (the reference for 8.3).

    Gradients arrive in order; a bucket closes once it holds at least
    ``bucket_bytes`` (or at the last gradient), is sent when its last gradient
    is ready and the link is free (one all-reduce at a time, in order), and
    takes ``alpha + beta * bytes``.

        >>> finish_time(10, [10, 10], [1.0, 2.0], alpha=0.5, beta=0.1)  # 1 + 1.5 = 2.5, then max(2, 2.5) + 1.5
        4.0

    ``mistake`` gives the time a usual mistake gives instead, for the hints:
    ``"no_wait"`` (all-reduces overlap as if each had a link of its own),
    ``"no_alpha"`` (no latency), ``"first"`` (sent at the bucket's first
    gradient), ``"strict"`` (closed at ``>`` instead of ``>=``).
    """
    link_free, size, first = 0.0, 0.0, None
    for i, (nbytes, ready) in enumerate(zip(grad_bytes, ready_s, strict=True)):
        first = ready if first is None else first
        size += nbytes
        full = size > bucket_bytes if mistake == "strict" else size >= bucket_bytes
        if full or i == len(grad_bytes) - 1:
            cost = (0.0 if mistake == "no_alpha" else alpha) + beta * size
            if mistake == "no_wait":
                link_free = max(link_free, ready + cost)
            else:
                link_free = max(link_free, first if mistake == "first" else ready) + cost
            size, first = 0.0, None
    return link_free


def _timeline(layers: int, layer_bytes: float, step_s: float) -> tuple[list[float], list[float]]:
    """Backward of ``layers`` equal layers, one gradient per layer every ``step_s`` seconds."""
    return [layer_bytes] * layers, [step_s * (i + 1) for i in range(layers)]


def _finish_cases() -> list[tuple[str, float, list[float], list[float], float, float]]:
    g = torch.Generator().manual_seed(8300)
    sizes = (torch.rand(30, generator=g) * 8e6 + 1e5).tolist()  # uneven layers, 0.1 to 8 MB
    ready = torch.cumsum(torch.rand(30, generator=g) * 2e-3, 0).tolist()
    g20, r20 = _timeline(20, 10e6, 5e-3)
    return [
        ("20 layers of 10 MB, 5 ms apart, 40 MB buckets", 40e6, g20, r20, 10e-3, 0.1e-9),
        ("20 layers of 10 MB, one bucket per layer (link backlog)", 10e6, g20, r20, 10e-3, 0.1e-9),
        ("20 layers of 10 MB, one bucket of everything", 1e12, g20, r20, 10e-3, 0.1e-9),
        ("30 uneven layers, 16 MB buckets", 16e6, sizes, ready, 50e-6, 1 / 20e9),
        ("30 uneven layers, 1-byte buckets (one per layer)", 1, sizes, ready, 50e-6, 1 / 20e9),
        ("3 layers of exactly one bucket each", 4e6, [4e6, 4e6, 4e6], [1e-3, 2e-3, 3e-3], 1e-4, 1e-10),
    ]


def _finish_hint(got: float, bucket: float, sizes: list[float], ready: list[float], alpha: float,
                 beta: float) -> str:
    def variant(mistake: str) -> float:
        return finish_time(bucket, sizes, ready, alpha, beta, mistake)

    total = sum(sizes)
    candidates = [
        (ready[-1] + alpha + beta * total, "that is one bucket of everything sent after backward: close a bucket "
         "once it holds at least bucket_bytes and send it when its last gradient is ready"),
        (variant("no_wait"), "the all-reduces overlap each other: one link carries one at a time, so a bucket "
         "starts at max(its last gradient's ready time, the end of the previous all-reduce)"),
        (variant("no_alpha"), "every all-reduce pays the latency alpha, in addition to beta per byte"),
        (variant("first"), "a bucket can leave only when its *last* gradient is ready, not its first"),
        (variant("strict"), "close the bucket as soon as it holds at least bucket_bytes (>=, not >)"),
    ]
    return next((f"; {h}" for value, h in candidates if math.isclose(got, value, rel_tol=1e-9)), "")


@exercise("8.3", solution="all_reduce_finish")
def check_all_reduce_finish(all_reduce_finish):
    for what, bucket, sizes, ready, alpha, beta in _finish_cases():
        expected = finish_time(bucket, sizes, ready, alpha, beta)
        got = all_reduce_finish(bucket, list(sizes), list(ready), alpha, beta)
        if got is None:
            raise AssertionError("all_reduce_finish returned None; did you forget `return`?")
        if not math.isclose(got, expected, rel_tol=1e-9):
            hint = _finish_hint(got, bucket, sizes, ready, alpha, beta)
            raise AssertionError(f"all_reduce_finish on {what}: got {got * 1e3:.4f} ms, expected "
                                 f"{expected * 1e3:.4f} ms{hint}")


def _pick_cases() -> list[tuple[str, list[float], list[float], list[float], float, float]]:
    g20, r20 = _timeline(20, 10e6, 5e-3)
    g40, r40 = _timeline(40, 2e6, 1e-3)
    mb = 1e6
    return [
        ("20 layers of 10 MB, 5 ms apart, alpha 10 ms, 10 GB/s", [10 * mb, 20 * mb, 40 * mb, 100 * mb, 200 * mb],
         g20, r20, 10e-3, 0.1e-9),
        ("40 layers of 2 MB, 1 ms apart, alpha 50 µs, 20 GB/s", [1 * mb, 4 * mb, 16 * mb, 80 * mb], g40, r40,
         50e-6, 1 / 20e9),
        ("40 layers of 2 MB, 1 ms apart, alpha 5 ms, 1 GB/s", [2 * mb, 8 * mb, 20 * mb, 80 * mb], g40, r40,
         5e-3, 1e-9),
    ]


@exercise("8.4", solution="pick_bucket_size")
def check_pick_bucket_size(pick_bucket_size):
    for what, candidates, sizes, ready, alpha, beta in _pick_cases():
        times = [finish_time(c, sizes, ready, alpha, beta) for c in candidates]
        best = candidates[min(range(len(times)), key=lambda i: (times[i], candidates[i]))]
        got = pick_bucket_size(list(candidates), list(sizes), list(ready), alpha, beta)
        if got is None:
            raise AssertionError("pick_bucket_size returned None; did you forget `return`?")
        if got not in candidates:
            raise AssertionError(f"pick_bucket_size on {what} returned {got!r}, which is not one of the "
                                 f"candidates {candidates}")
        if got != best:
            i = candidates.index(got)
            hint = ""
            if got == min(candidates):
                hint = "; the smallest buckets pay the latency alpha once per bucket, and the link falls behind"
            elif got == max(candidates):
                hint = "; the largest bucket waits for the end of backward before anything is sent"
            raise AssertionError(f"pick_bucket_size on {what} chose {got / 1e6:g} MB (finish "
                                 f"{times[i] * 1e3:.2f} ms), but {best / 1e6:g} MB finishes at "
                                 f"{min(times) * 1e3:.2f} ms{hint}")
