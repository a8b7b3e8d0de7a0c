"""Collectives: the hand-written ring all-reduce equals dist.all_reduce and sends 2(p-1)/p·N bytes; the α-β fit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmbook.distributed.collectives import (
    all_reduce_bytes_per_rank,
    collectives_demo,
    fit_alpha_beta,
    ring_all_reduce,
    ring_all_reduce_time,
    time_all_reduce,
)
from llmbook.distributed.launcher import spawn

# (shape, dtype): sizes divisible by 2 and 3, sizes that are not, and fewer elements than ranks
CASES = [((12,), torch.float32), ((1001,), torch.float32), ((7, 5), torch.float64), ((1,), torch.float32),
         ((2,), torch.int64), ((10,), torch.int64)]


def _ring_checks(rank: int, world_size: int) -> dict:
    """Every check that needs the ranks, in one spawn: ring vs dist.all_reduce, the demo, the timer."""
    out = {"max_error": [], "exact": [], "bytes": []}
    for i, (shape, dtype) in enumerate(CASES):
        g = torch.Generator().manual_seed(1000 * i + rank)  # different data on every rank
        if dtype.is_floating_point:
            x = torch.randn(shape, generator=g, dtype=dtype)
            whole = torch.randint(-50, 50, shape, generator=g).to(dtype)  # integer values: sums are exact
        else:
            x = torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
            whole = x.clone()
        for tensor, errors in ((x, out["max_error"]), (whole, out["exact"])):
            ours, theirs = tensor.clone(), tensor.clone()
            sent = ring_all_reduce(ours)
            dist.all_reduce(theirs)
            errors.append((ours - theirs).abs().max().item() if tensor is x else torch.equal(ours, theirs))
        out["bytes"].append(sent)
    base = torch.arange(12.0).reshape(3, 4).t()
    t = base * (rank + 1)  # non-contiguous: the sum is written back in place
    ring_all_reduce(t)
    out["non_contiguous"] = not t.is_contiguous() and torch.equal(t, base * sum(range(1, world_size + 1)))
    out["demo"] = collectives_demo(rank, world_size)
    out["times"] = time_all_reduce([64, 4096], repeats=3, warmup=1)
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_all_reduce_equals_dist_all_reduce_and_sends_the_formula_bytes(world_size):
    p = world_size
    results = spawn(_ring_checks, p)
    for r in results:
        assert max(r["max_error"]) < 1e-5  # random floats: only the order of additions differs
        assert all(r["exact"])  # integer-valued floats and int64: identical
        assert r["non_contiguous"]
    for i, (shape, dtype) in enumerate(CASES):
        n_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        sent = [r["bytes"][i] for r in results]
        assert sum(sent) == 2 * (p - 1) * n_bytes  # each ring step moves every element once, twice over
        itemsize = n_bytes // torch.Size(shape).numel()
        for s in sent:  # uneven chunks: a rank is off the formula by at most one element per step
            assert abs(s - all_reduce_bytes_per_rank(n_bytes, p)) <= 2 * (p - 1) * itemsize
        if torch.Size(shape).numel() % p == 0:
            assert sent == [all_reduce_bytes_per_rank(n_bytes, p)] * p

    demo = [r["demo"] for r in results]
    inputs = torch.tensor([d["input"] for d in demo])
    total = inputs.sum(0)
    for rank, d in enumerate(demo):
        assert d["broadcast"] == inputs[0].tolist()
        assert d["all_reduce"] == total.tolist()
        assert d["reduce_scatter"] == [total[rank].item()]
        assert d["all_gather"] == inputs.reshape(-1).tolist()
    assert results[0]["times"] == results[-1]["times"]  # every rank reports the slowest rank's medians
    assert all(t > 0 for t in results[0]["times"])


def test_all_reduce_formulas():
    assert all_reduce_bytes_per_rank(1000, 1) == 0
    assert all_reduce_bytes_per_rank(1000, 2) == 1000
    assert all_reduce_bytes_per_rank(1000, 4) == 1500  # tends to 2N as p grows
    assert ring_all_reduce_time(8e6, 4, alpha_s=1e-5, beta_s_per_byte=1e-9) == pytest.approx(6e-5 + 6 * 2e6 * 1e-9)
    with pytest.raises(ValueError, match="world_size"):
        all_reduce_bytes_per_rank(1000, 0)


def test_fit_alpha_beta_recovers_a_known_line():
    alpha, beta = 40e-6, 2.5e-10  # 40 µs latency, 4 GB/s
    sizes = [2**k for k in range(4, 25, 2)]
    exact = [alpha + beta * n for n in sizes]
    a, b = fit_alpha_beta(sizes, exact)
    assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(beta, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    noisy = [t * (1 + 0.02 * torch.randn((), generator=g).item()) for t in exact]  # 2% timing noise
    a, b = fit_alpha_beta(sizes, noisy)
    assert b == pytest.approx(beta, rel=0.05)
    for bad_sizes, bad_times, pattern in [([1, 2], [1.0], "one time per size"), ([8, 8], [1.0, 2.0], "two different")]:
        with pytest.raises(ValueError, match=pattern):
            fit_alpha_beta(bad_sizes, bad_times)
