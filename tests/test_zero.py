"""ZeRO-1/2 from scratch against one process on the global batch and torch's ZeroRedundancyOptimizer (2 and 3 ranks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from llmbook.distributed.launcher import spawn
from llmbook.distributed.zero import ZeroOptimizer
from llmbook.model import GPT, ModelConfig
from llmbook.optim import AdamW, clip_grad_norm, param_groups

CFG = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
B, T, STEPS = 2, 16, 3  # per-rank batch, sequence length, optimizer steps
HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
WD = 0.1
MAX_NORM = 0.5  # below the tiny model's first gradient norms, so clipping acts
# Elementwise tolerance: 3% of one step of lr 1e-3. Adam divides by sqrt(v), so for a gradient near 0 the
# last-bit differences of another summation order (a sum over ranks vs one batch) become a visible part of a step.
TOL = dict(atol=3e-5, rtol=1e-5)


def global_batch(step: int, world_size: int) -> tuple[Tensor, Tensor]:
    """The whole step's batch ``(world_size·B, T)``; rank r trains on rows r·B .. (r+1)·B."""
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randint(0, CFG.vocab_size, (world_size * B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model: nn.Module, opt, batches: list[tuple[Tensor, Tensor]]) -> dict:
    """``STEPS`` clipped steps; returns the gradient norms and the optimizer's memory report after the last step."""
    report = {"norms": []}
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        if isinstance(opt, ZeroOptimizer):
            norm = opt.clip_grad_norm(MAX_NORM)  # the averaged gradient is only whole as shards
        else:
            norm = clip_grad_norm(list(model.parameters()), MAX_NORM)  # DDP: every rank has the averaged gradient
        report["norms"].append(float(norm))
        opt.step()
        if isinstance(opt, ZeroOptimizer):  # after step: stage 2 holds only its gradient shard
            report.update(opt.memory_report())
        opt.zero_grad(set_to_none=True)
    return report


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, Tensor))


def _zero_rank(rank: int, world_size: int, with_torch: bool) -> dict:
    """Single process, our stage 1 and stage 2 (and torch's ZeRO) on one rank, in one spawn."""
    torch.manual_seed(0)
    base = GPT(CFG)
    batches = [global_batch(s, world_size) for s in range(STEPS)]
    mine = [(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]) for x, y in batches]
    out = {"numel": sum(p.numel() for p in base.parameters())}

    single = copy.deepcopy(base)
    single_opt = AdamW(param_groups(single, WD), **HP, weight_decay=WD)
    out["single_norms"] = train(single, single_opt, batches)["norms"]
    out["single"], out["single_state_bytes"] = flat(single), state_bytes(single_opt)

    for stage in (1, 2):
        model = copy.deepcopy(base)
        opt = ZeroOptimizer(param_groups(model, WD), stage=stage, **HP, weight_decay=WD)
        out[f"zero{stage}_report"] = train(model, opt, mine)
        out[f"zero{stage}"] = flat(model)

    if with_torch:  # PyTorch's ZeRO-1: DDP averages the gradients, the optimizer shards whole tensors by size
        from torch.distributed.optim import ZeroRedundancyOptimizer  # here: its import warns about torch.jit

        model = DistributedDataParallel(copy.deepcopy(base))
        opt = ZeroRedundancyOptimizer(param_groups(model.module, WD), optimizer_class=torch.optim.AdamW,
                                      **HP, weight_decay=WD, foreach=False)
        out["torch_norms"] = train(model, opt, mine)["norms"]
        out["torch"], out["torch_state_bytes"] = flat(model.module), state_bytes(opt.optim)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn(_zero_rank, 2, True)


def test_zero_equals_single_process_and_torch_zero(two_ranks):
    for r in two_ranks:
        for stage in (1, 2):
            torch.testing.assert_close(r[f"zero{stage}"], r["single"], **TOL)
            torch.testing.assert_close(r[f"zero{stage}"], r["torch"], **TOL)
        for name in ("zero1_report", "zero2_report"):  # the sharded norm is the global one
            assert r[name]["norms"] == pytest.approx(r["single_norms"], rel=1e-5)
        assert max(r["single_norms"]) > MAX_NORM  # so clipping was tested
        assert torch.equal(r["zero1"], two_ranks[0]["zero1"])  # all-gather left every rank the same weights


def test_optimizer_state_and_gradient_are_sharded(two_ranks):
    p = 2
    for r in two_ranks:
        single = r["single_state_bytes"]  # 8 bytes per parameter (+ a few step counters)
        assert single >= 8 * r["numel"]
        for stage in (1, 2):
            report = r[f"zero{stage}_report"]
            assert report["state_bytes"] * p == pytest.approx(single, rel=0.01)
            assert report["param_bytes"] == pytest.approx(4 * r["numel"], rel=0.01)  # stage 1/2 keep all weights
        assert r["zero1_report"]["gradient_bytes"] == pytest.approx(4 * r["numel"], rel=0.01)  # all-reduced: whole
        assert r["zero2_report"]["gradient_bytes"] * p == pytest.approx(4 * r["numel"], rel=0.01)  # reduce-scattered
    # torch shards whole tensors, so its ranks hold unequal shares; ours are equal to the byte (up to padding)
    assert sum(r["torch_state_bytes"] for r in two_ranks) == pytest.approx(two_ranks[0]["single_state_bytes"], rel=0.01)


def test_zero_three_ranks():
    ranks = spawn(_zero_rank, 3, False)
    for r in ranks:
        for stage in (1, 2):
            torch.testing.assert_close(r[f"zero{stage}"], r["single"], **TOL)
            assert r[f"zero{stage}_report"]["state_bytes"] * 3 == pytest.approx(r["single_state_bytes"], rel=0.01)
        assert r["zero2_report"]["gradient_bytes"] * 3 == pytest.approx(4 * r["numel"], rel=0.01)


def _bucketed_rank(rank: int, world_size: int) -> dict:
    """Small buckets (10 KB), reduced during backward, with 2 micro-batches accumulated per step."""
    torch.manual_seed(0)
    base = GPT(CFG)
    batches = [global_batch(s, world_size) for s in range(STEPS)]
    out = {"numel": sum(p.numel() for p in base.parameters())}
    single = copy.deepcopy(base)
    train(single, AdamW(param_groups(single, WD), **HP, weight_decay=WD), batches)
    out["single"] = flat(single)
    for stage in (1, 2):
        model = copy.deepcopy(base)
        opt = ZeroOptimizer(param_groups(model, WD), stage=stage, **HP, weight_decay=WD, bucket_mb=0.01,
                            module=model)
        out[f"buckets{stage}"] = len(opt.buckets)
        for x, y in batches:
            for micro in range(2):  # rank r's rows of the global batch, in two halves of B/2
                rows = slice(rank * B + micro * B // 2, rank * B + (micro + 1) * B // 2)
                _, loss = model(x[rows], y[rows])
                (loss / 2).backward()
                assert all(p.grad is None for p in model.parameters()) or stage == 1
            opt.clip_grad_norm(MAX_NORM)
            opt.step()
            opt.zero_grad()
        out[f"zero{stage}"] = flat(model)
        out[f"report{stage}"] = opt.memory_report()
        out[f"early{stage}"] = opt.launched_in_backward
    return out


def test_buckets_are_reduced_during_backward_and_accumulate():
    for r in spawn(_bucketed_rank, 2):
        for stage in (1, 2):
            assert r[f"buckets{stage}"] > 3
            torch.testing.assert_close(r[f"zero{stage}"], r["single"], **TOL)  # 2 ranks x 2 micro = 1 x 4B
            # overlap: most buckets were sent while autograd still computed earlier layers' gradients
            assert len(r[f"early{stage}"]) == 2 * STEPS and min(r[f"early{stage}"]) >= r[f"buckets{stage}"] // 2
        # stage 2 never held the whole model's local gradient at once: full gradients go bucket by bucket
        assert r["report2"]["peak_full_gradient_bytes"] < 0.6 * 4 * r["numel"]


def test_bad_input_is_one_clear_line():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        ZeroOptimizer(model.parameters(), stage=3)
    with pytest.raises(ValueError, match="bucket_mb must be a positive"):
        ZeroOptimizer(model.parameters(), stage=2, bucket_mb=0)
    with pytest.raises(RuntimeError, match="needs a process group"):
        ZeroOptimizer(model.parameters(), stage=1)
