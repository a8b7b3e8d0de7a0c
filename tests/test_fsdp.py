"""From-scratch FSDP (ZeRO-3) against one process on the global batch and PyTorch's FSDP2 ``fully_shard`` (2 ranks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmbook.distributed.fsdp import FullyShardedModel
from llmbook.distributed.launcher import spawn
from llmbook.model import GPT, ModelConfig
from llmbook.optim import AdamW, clip_grad_norm

CONFIGS = {
    "gpt": ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0),
    "llama": ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=88, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False,
                         tied_embeddings=False, dropout=0.0),
}
B, T, STEPS = 2, 16, 3  # per-rank batch, sequence length, optimizer steps
HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # one group: a flat shard mixes matrices and gains
# As in test_zero: 3% of one step of lr 1e-3. Adam divides by sqrt(v), so for a gradient near 0 the last-bit
# differences of another summation order (a sum over ranks vs one batch) become a visible part of a step.
TOL = dict(atol=3e-5, rtol=1e-5)


def global_batch(cfg: ModelConfig, step: int, world_size: int) -> tuple[Tensor, Tensor]:
    """The whole step's batch ``(world_size·B, T)``; rank r trains on rows r·B .. (r+1)·B."""
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randint(0, cfg.vocab_size, (world_size * B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, world_size: int = 1) -> list[float]:
    """``STEPS`` steps; returns the losses averaged over the ranks (the global batch's loss)."""
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / world_size)
    return losses


def full_tensors(state: dict) -> dict[str, Tensor]:
    """A state dict with FSDP2's sharded DTensors made whole (an all-gather each)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def _fsdp_rank(rank: int, world_size: int) -> dict:
    """Single process, ours and FSDP2 for both model styles, on one rank, in one spawn."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for style, cfg in CONFIGS.items():
        torch.manual_seed(0)
        base = GPT(cfg)
        batches = [global_batch(cfg, s, world_size) for s in range(STEPS)]
        mine = [(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]) for x, y in batches]
        r = out[style] = {"keys": list(base.state_dict())}

        single = copy.deepcopy(base)
        r["single_losses"] = train(single, AdamW(single.parameters(), **HP), batches)
        r["single"] = {k: v.clone() for k, v in single.state_dict().items()}

        ours = FullyShardedModel(copy.deepcopy(base))
        # (c) inside every block's forward, only the root and that block are gathered
        seen = []
        for block in ours.module.blocks:
            block.attn.register_forward_hook(
                lambda *_, fsdp=ours, seen=seen: seen.append((fsdp.gathered_units(), fsdp.gathered_bytes())))
        opt = AdamW(ours.parameters(), **HP)
        ours.trace = []
        r["ours_losses"] = train(ours, opt, mine, world_size)
        r["trace"], ours.trace = ours.trace, None  # stop recording
        r["ours"] = ours.full_state_dict()
        r["seen"] = seen
        r["unit_bytes"] = {u.name: u.full_bytes for u in ours.units}
        r["peak"] = ours.peak_gathered_bytes
        r["after_step_gathered"] = ours.gathered_bytes()
        r["shard_numels"] = [p.numel() for p in ours.parameters()]
        r["numel"] = base.num_params()
        # (d) the full state dict loads into an ordinary GPT, which then computes what single computes
        plain = GPT(cfg)
        plain.load_state_dict(r["ours"])
        x, y = batches[0]
        with torch.no_grad():  # an evaluation forward frees every unit, root included
            r["reloaded_loss"], r["single_loss_after"] = float(plain(x, y)[1]), float(single(x, y)[1])
            r["eval_loss"] = float(ours(mine[0][0], mine[0][1])[1])
            r["eval_loss_plain"] = float(plain(mine[0][0], mine[0][1])[1])
        r["eval_gathered"] = ours.gathered_bytes()
        again = FullyShardedModel(GPT(cfg))  # loading the single process's weights gives its weights back
        again.load_full_state_dict(r["single"])
        r["loaded"] = again.full_state_dict()
        again.module.activation_checkpointing = True
        with pytest.raises(ValueError, match="does not support activation checkpointing"):
            again(*mine[0])

        # (b) FSDP2: fully_shard on every Block, then on the root; the same AdamW arithmetic, torch's loop
        theirs = copy.deepcopy(base)
        for block in theirs.blocks:
            fully_shard(block)
        fully_shard(theirs)
        opt = torch.optim.AdamW(theirs.parameters(), **HP, foreach=False)
        r["torch_losses"] = train(theirs, opt, mine, world_size)
        r["torch"] = full_tensors(theirs.state_dict())
    shared = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    shared[1].weight = shared[0].weight
    with pytest.raises(ValueError, match="shared by two units"):
        FullyShardedModel(shared, unit_types=(nn.Linear,))
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn(_fsdp_rank, 2)


@pytest.mark.parametrize("style", CONFIGS)
def test_fsdp_equals_single_process_and_fsdp2(two_ranks, style):
    for ranks in two_ranks:
        r = ranks[style]
        assert r["ours_losses"] == pytest.approx(r["single_losses"], rel=1e-5)
        assert r["torch_losses"] == pytest.approx(r["single_losses"], rel=1e-5)
        assert list(r["ours"]) == r["keys"]  # the unsharded model's keys, in its order
        for k in r["keys"]:
            torch.testing.assert_close(r["ours"][k], r["single"][k], **TOL)
            torch.testing.assert_close(r["ours"][k], r["torch"][k], **TOL)
        assert r["ours"]["tok_emb.weight"].sum() != 0
        for k in r["keys"]:  # every rank ends with the same weights
            assert torch.equal(r["ours"][k], two_ranks[0][style]["ours"][k])
    if style == "gpt":  # the tied head stays one tensor
        assert torch.equal(two_ranks[0]["gpt"]["ours"]["lm_head.weight"], two_ranks[0]["gpt"]["ours"]["tok_emb.weight"])


@pytest.mark.parametrize("style", CONFIGS)
def test_one_block_materialised_at_a_time(two_ranks, style):
    r = two_ranks[0][style]
    n_blocks = CONFIGS[style].n_layers
    units = r["unit_bytes"]
    assert set(units) == {"", *(f"blocks.{i}" for i in range(n_blocks))}
    assert len(r["seen"]) == n_blocks * STEPS + n_blocks  # every forward, the no_grad one included
    for i, (gathered, nbytes) in enumerate(r["seen"]):
        block = f"blocks.{i % n_blocks}"
        assert gathered == sorted(["", block])  # the root and this block, no other
        assert nbytes == units[""] + units[block]
    biggest = units[""] + max(v for k, v in units.items() if k)
    assert r["peak"]["forward"] == biggest and r["peak"]["backward"] == biggest  # backward too, one block
    assert r["after_step_gathered"] == 0 and r["eval_gathered"] == 0  # nothing full survives a step or an eval
    # one step's timeline: root, then each block gathered and freed in forward; in backward the blocks in
    # reverse, each freed once its gradients are reduce-scattered, the root last
    blocks = [f"blocks.{i}" for i in range(n_blocks)]
    step = [(event, unit) for event, unit, _ in r["trace"][:len(r["trace"]) // STEPS]]
    assert step == ([("gather for forward", "root")] + [(e, b) for b in blocks for e in ("gather for forward", "free")]
                    + [(e, b) for b in reversed(blocks) for e in ("gather for backward", "free")] + [("free", "root")])


@pytest.mark.parametrize("style", CONFIGS)
def test_full_state_dict_reloads_and_shards_are_halves(two_ranks, style):
    r = two_ranks[0][style]
    assert r["reloaded_loss"] == pytest.approx(r["single_loss_after"], rel=1e-5)
    assert r["eval_loss"] == pytest.approx(r["eval_loss_plain"], rel=1e-5)  # a no_grad forward computes the same
    for k, v in r["single"].items():
        assert torch.equal(r["loaded"][k], v)
    n_units = CONFIGS[style].n_layers + 1
    assert sum(r["shard_numels"]) * 2 == pytest.approx(r["numel"], abs=2 * n_units)  # 1/2 of the model, + padding


MAX_NORM = 0.5  # below the tiny model's first gradient norms, so clipping acts


def _accumulate_and_clip_rank(rank: int, world_size: int) -> dict:
    """3 ranks (every unit padded), 2 micro-batches per step, clipped: against one process on the global batch."""
    cfg = CONFIGS["gpt"]
    torch.manual_seed(0)
    base = GPT(cfg)
    batches = [global_batch(cfg, s, world_size) for s in range(STEPS)]
    single = copy.deepcopy(base)
    opt = AdamW(single.parameters(), **HP)
    out = {"single_norms": [], "ours_norms": []}
    for x, y in batches:
        single(x, y)[1].backward()
        out["single_norms"].append(float(clip_grad_norm(list(single.parameters()), MAX_NORM)))
        opt.step()
        opt.zero_grad()
    ours = FullyShardedModel(copy.deepcopy(base))
    opt = AdamW(ours.parameters(), **HP)
    out["padding"] = [u.padded - u.numel for u in ours.units]
    for x, y in batches:
        mine = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        for xm, ym in zip(*(t.chunk(2) for t in mine), strict=True):  # the shards' .grad add up the micro-batches
            (ours(xm, ym)[1] / 2).backward()
        out["ours_norms"].append(float(ours.clip_grad_norm(MAX_NORM)))
        opt.step()
        opt.zero_grad()
    out["single"], out["ours"] = single.state_dict(), ours.full_state_dict()
    return out


def test_three_ranks_padding_accumulation_and_clipping():
    ranks = spawn(_accumulate_and_clip_rank, 3)
    for r in ranks:
        assert all(pad > 0 for pad in r["padding"])  # no unit's size divides by 3: the padding is exercised
        assert r["ours_norms"] == pytest.approx(r["single_norms"], rel=1e-5)
        assert max(r["single_norms"]) > MAX_NORM  # so clipping acted
        for k, v in r["single"].items():
            torch.testing.assert_close(r["ours"][k], v, **TOL)


def test_no_process_group_is_one_clear_line():
    with pytest.raises(RuntimeError, match="needs a process group"):
        FullyShardedModel(GPT(CONFIGS["gpt"]))
