"""Chapter 8's exercise checks: each passes the solution, reports the starter as not attempted, names typical mistakes.

The ring all-reduce variants run on real ranks (``spawn``), as the check does;
each mistake below is one a reader makes, and the check must name it.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from exercise_helpers import starter as _starter

from llmbook.distributed.sharding_memory import per_rank_memory
from llmbook.exercises import ch08
from llmbook.planning import PRECISIONS

# ---------------------------------------------------------------------------------------------- 8.1


def _ring(tensor, average=False, mistake=None):
    """The solution's ring all-reduce, with one typical mistake switched on by name."""
    rank, p = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % p, (rank - 1) % p
    if mistake == "neighbour":  # send left, receive from the right
        right, left = left, right
    if mistake == "collective":
        dist.all_reduce(tensor)
        return tensor
    if mistake == "copy":
        flat = tensor.reshape(-1).clone()
    elif mistake == "view" or tensor.is_contiguous():
        flat = tensor.view(-1)  # fails on a tensor that is not contiguous
    else:
        flat = tensor.contiguous().view(-1)
    chunks = torch.tensor_split(flat, p)

    def exchange(send, receive_into):
        buffer = torch.empty_like(receive_into)
        if mistake == "blocking":
            dist.send(send.contiguous(), right)
            dist.recv(buffer, left)
            return buffer
        request = dist.isend(send.contiguous(), right)
        dist.recv(buffer, left)
        request.wait()
        return buffer

    for step in range(p - 1):
        i, j = (rank - step) % p, (rank - step - 1) % p
        chunks[j].add_(exchange(chunks[i], chunks[j]))
    gather_shift = 0 if mistake == "gather_index" else 1  # the all-gather sends chunk (r + 1 - s) % p
    for step in range(p - 1):
        i, j = (rank + gather_shift - step) % p, (rank - step) % p
        chunks[j].copy_(exchange(chunks[i], chunks[j]))
    if not tensor.is_contiguous() and mistake != "copy":
        tensor.copy_(flat.view(tensor.shape))
    if average and mistake != "no_average":
        tensor.div_(p)
    return tensor


def _ring_not_started(tensor, average=False):
    raise NotImplementedError("your solution goes here")


def test_ring_solution_passes_on_2_and_4_ranks(capsys):
    ch08.check_ring_all_reduce(_ring)
    assert "Exercise 8.1: all checks passed" in capsys.readouterr().out


def test_ring_starter_is_not_attempted(capsys):
    ch08.check_ring_all_reduce(_ring_not_started)  # raises inside the ranks: still "not attempted"
    assert "Exercise 8.1: not attempted yet" in capsys.readouterr().out
    with pytest.raises(NotImplementedError):
        ch08.check_ring_all_reduce.strict(_ring_not_started)


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_average", "divide the result by the world size"),
    ("copy", "still holds this rank's own values"),
    ("gather_index", "hold the sum"),
    ("neighbour", "(r + 1) % p"),
    ("collective", "called dist.all_reduce"),
    ("view", "not contiguous"),
])
def test_ring_mistakes_are_named(mistake, hint):
    with pytest.raises(AssertionError, match=None) as info:
        ch08.check_ring_all_reduce.strict(functools.partial(_ring, mistake=mistake))
    assert hint in str(info.value), str(info.value)


def test_ring_deadlock_is_named():
    with pytest.raises(AssertionError) as info:
        ch08.check_ring_all_reduce.strict(functools.partial(_ring, mistake="blocking"), timeout_s=3)
    assert "isend" in str(info.value) and "did not finish" in str(info.value)


# ---------------------------------------------------------------------------------------------- 8.2


def _zero_bytes(n, p, strategy, precision="mixed", mistake=None):
    b = PRECISIONS[precision]
    stage = ["ddp", "zero1", "zero2", "fsdp"].index(strategy)
    master_stage = 99 if mistake == "master_whole" else 1
    grads_stage = 1 if mistake == "grads_in_stage1" else 2
    return (n * b.weights / (p if stage >= 3 else 1) + n * b.grads / (p if stage >= grads_stage else 1)
            + n * b.optimizer / (p if stage >= 1 else 1) + n * b.master / (p if stage >= master_stage else 1))


def test_zero_solution_passes_and_starter_is_not_attempted(capsys):
    ch08.check_zero_bytes_per_rank(_zero_bytes)
    ch08.check_zero_bytes_per_rank(_starter)
    out = capsys.readouterr().out
    assert "Exercise 8.2: all checks passed" in out and "Exercise 8.2: not attempted yet" in out
    assert _zero_bytes(7e9, 8, "zero2") == per_rank_memory(7e9, 8, "zero2", "mixed").states


@pytest.mark.parametrize(("fn", "hint"), [
    (functools.partial(_zero_bytes, mistake="master_whole"), "master weights are optimizer state"),
    (functools.partial(_zero_bytes, mistake="grads_in_stage1"), "gradients are sharded from stage 2 on"),
    (lambda n, p, strategy, precision="mixed": _zero_bytes(n, p, strategy, "fp32"), "precision"),
    (lambda n, p, strategy, precision="mixed": n * PRECISIONS[precision].total, "unsharded total"),
])
def test_zero_mistakes_are_named(fn, hint):
    with pytest.raises(AssertionError) as info:
        ch08.check_zero_bytes_per_rank.strict(fn)
    assert hint in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------- 8.3, 8.4


def test_finish_solution_passes_and_equals_the_reference(capsys):
    ch08.check_all_reduce_finish(ch08.finish_time)  # the reference (solutions/08 executes the reader's)
    ch08.check_all_reduce_finish(_starter)
    out = capsys.readouterr().out
    assert "Exercise 8.3: all checks passed" in out and "Exercise 8.3: not attempted yet" in out
    assert ch08.finish_time(40e6, [10e6] * 20, [5e-3 * (i + 1) for i in range(20)], 10e-3, 0.1e-9) == \
        pytest.approx(0.114)  # 5 buckets of 14 ms, one every 20 ms: only the last one after backward


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_wait", "one link carries one at a time"),
    ("no_alpha", "pays the latency alpha"),
    ("first", "*last* gradient"),
    ("strict", ">=, not >"),
])
def test_finish_mistakes_are_named(mistake, hint):
    with pytest.raises(AssertionError) as info:
        ch08.check_all_reduce_finish.strict(functools.partial(ch08.finish_time, mistake=mistake))
    assert hint in str(info.value), str(info.value)


def test_finish_one_bucket_mistake_is_named():
    def one_bucket(bucket, sizes, ready, alpha, beta):
        return ready[-1] + alpha + beta * sum(sizes)

    with pytest.raises(AssertionError, match="one bucket of everything"):
        ch08.check_all_reduce_finish.strict(one_bucket)


def _pick(candidates, sizes, ready, alpha, beta):
    return min(candidates, key=lambda c: (ch08.finish_time(c, sizes, ready, alpha, beta), c))


def test_pick_solution_passes_and_extremes_fail(capsys):
    ch08.check_pick_bucket_size(_pick)
    ch08.check_pick_bucket_size(_starter)
    out = capsys.readouterr().out
    assert "Exercise 8.4: all checks passed" in out and "Exercise 8.4: not attempted yet" in out
    with pytest.raises(AssertionError, match="waits for the end of backward"):
        ch08.check_pick_bucket_size.strict(lambda candidates, *args: max(candidates))
    with pytest.raises(AssertionError, match="pay the latency alpha once per bucket"):
        ch08.check_pick_bucket_size.strict(lambda candidates, *args: min(candidates))
