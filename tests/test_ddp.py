"""From-scratch DDP against torch's DistributedDataParallel and against one process on the global batch (2 ranks)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from llmbook.distributed.ddp import DataParallel
from llmbook.distributed.launcher import spawn
from llmbook.model import GPT, ModelConfig
from llmbook.optim import AdamW

CFG = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
B, T, STEPS = 2, 16, 3  # per-rank batch, sequence length, optimizer steps
BUCKET_MB = 0.02  # 20 KB: the tiny GPT's ~40K parameters (160 KB) need several buckets


def global_batch(step: int, world_size: int) -> tuple[Tensor, Tensor]:
    """The whole step's batch ``(world_size·B, T)``; rank r trains on rows r·B .. (r+1)·B."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, CFG.vocab_size, (world_size * B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model: nn.Module, batches: list[tuple[Tensor, Tensor]], micro: int = 1, no_sync=None) -> nn.Module:
    """``STEPS`` AdamW steps; each batch split into ``micro`` micro-batches whose gradients add up."""
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for x, y in batches:
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
            ctx = no_sync() if (no_sync is not None and i < micro - 1) else contextlib.nullcontext()
            with ctx:
                _, loss = model(xm, ym)
                (loss / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp_rank(rank: int, world_size: int) -> dict:
    """Everything checked on one rank, in one spawn (a rank re-imports torch: seconds)."""
    torch.manual_seed(0)
    base = GPT(CFG)
    batches = [global_batch(s, world_size) for s in range(STEPS)]
    mine = [(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]) for x, y in batches]

    # single process on the global batch: the answer all the others must give
    single = train(copy.deepcopy(base), batches)

    # ours, from a copy rank 1 spoils first: the broadcast at construction must undo that
    start = copy.deepcopy(base)
    if rank == 1:
        with torch.no_grad():
            for p in start.parameters():
                p.add_(1.0)
    ours = DataParallel(start, bucket_mb=BUCKET_MB)
    train(ours, mine)

    theirs = train(DistributedDataParallel(copy.deepcopy(base)), mine)

    # accumulation: 2 micro-batches per step, the first inside no_sync
    accum = DataParallel(copy.deepcopy(base), bucket_mb=BUCKET_MB)
    train(accum, mine, micro=2, no_sync=accum.no_sync)

    return {
        "init": flat(base), "single": flat(single), "ours": flat(ours.module),
        "theirs": flat(theirs.module), "accum": flat(accum.module),
        "buckets": len(ours.buckets), "sent": ours.buckets_per_backward, "sent_accum": accum.buckets_per_backward,
        "overlapped": sum(b.hooks_left_at_launch > 0 for b in ours.buckets),
        "world": dist.get_world_size(),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn(_ddp_rank, 2)


def test_ddp_equals_torch_ddp_and_single_process(ranks):
    for r in ranks:
        assert r["world"] == 2
        torch.testing.assert_close(r["ours"], r["theirs"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["ours"], r["single"], atol=1e-5, rtol=1e-5)
    assert torch.equal(ranks[0]["ours"], ranks[1]["ours"])  # the replicas never drift apart
    assert (ranks[0]["ours"] - ranks[0]["init"]).abs().max() > 1e-3  # sanity: training moved the weights


def test_no_sync_accumulation_equals_single_process(ranks):
    for r in ranks:
        torch.testing.assert_close(r["accum"], r["single"], atol=1e-5, rtol=1e-5)
        # one synced backward per step: no_sync's backward sent nothing
        assert r["sent_accum"] == [r["buckets"]] * STEPS


def test_gradients_travel_in_several_overlapped_buckets(ranks):
    for r in ranks:
        assert r["buckets"] > 1
        assert r["sent"] == [r["buckets"]] * STEPS
        assert r["overlapped"] >= 1  # at least one bucket left while backward still had gradients to compute


def test_without_a_process_group_says_what_to_do():
    with pytest.raises(RuntimeError, match="needs a process group"):
        DataParallel(nn.Linear(2, 2))
