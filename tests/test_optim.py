"""AdamW step for step against torch.optim.AdamW, which parameters decay, and clipping against clip_grad_norm_."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from llmbook.model import GPT
from llmbook.optim import AdamW, ForeachAdamW, clip_grad_norm, param_groups
from llmbook.schedule import CosineSchedule, set_lr

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py

TIGHT = {"atol": 1e-7, "rtol": 1e-6}


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 10))


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 10, (4, 5), generator=g)
    return nn.functional.cross_entropy(net(idx).flatten(0, 1), idx.roll(1, dims=1).flatten())


def groups_of(net: nn.Module) -> list[dict]:
    """Three groups with different hyperparameters, one of them missing a gradient now and then."""
    emb, lin1, norm, _, lin2 = net
    return [
        {"params": [lin1.weight, lin2.weight], "weight_decay": 0.1},
        {"params": [lin1.bias, lin2.bias, *norm.parameters()], "weight_decay": 0.0, "betas": (0.8, 0.95)},
        {"params": [emb.weight], "lr": 3e-3, "eps": 1e-6},
    ]


def test_adamw_matches_torch_step_for_step():
    ours_net = tiny_net()
    ref_net = copy.deepcopy(ours_net)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours = AdamW(groups_of(ours_net), **hp)
    ref = torch.optim.AdamW(groups_of(ref_net), **hp, foreach=False)
    schedule = CosineSchedule(peak_lr=1e-2, warmup_steps=10, decay_steps=80)
    for step in range(100):
        for net, opt in ((ours_net, ours), (ref_net, ref)):
            if step % 2:  # the learning rate changes between steps (on odd steps only)
                set_lr(opt, schedule(step))
            loss_of(net, step).backward()
            if step % 7 == 3:
                net[0].weight.grad = None  # a step where one parameter got no gradient
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p, q in zip(ours_net.parameters(), ref_net.parameters(), strict=True):
            assert_close(p, q, **TIGHT)
    for p, q in zip(ours_net.parameters(), ref_net.parameters(), strict=True):
        s, r = ours.state[p], ref.state[q]
        assert float(s["step"]) == float(r["step"])
        assert_close(s["exp_avg"], r["exp_avg"], **TIGHT)
        assert_close(s["exp_avg_sq"], r["exp_avg_sq"], **TIGHT)
    assert float(ours.state[ours_net[0].weight]["step"]) == 100 - len([s for s in range(100) if s % 7 == 3])


def test_adamw_one_step_by_hand():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([0.3, -4.0])
    opt.step()
    # first step: m̂ = g, v̂ = g², so the Adam step is lr·sign(g) (up to eps); decay first shrinks p by lr·wd
    assert_close(p.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0]))


def test_state_dict_round_trip_with_weights_only():
    net = tiny_net()
    opt = AdamW(param_groups(net, 0.1), lr=1e-2)
    for step in range(3):
        loss_of(net, step).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    twin = tiny_net()
    twin.load_state_dict(saved["model"])
    twin_opt = AdamW(param_groups(twin, 0.1), lr=1e-2)
    twin_opt.load_state_dict(saved["optimizer"])
    assert [g["name"] for g in twin_opt.param_groups] == ["decay", "no_decay"]
    for step in range(3, 6):  # both continue identically
        for n, o in ((net, opt), (twin, twin_opt)):
            loss_of(n, step).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_adamw_validation():
    p = [nn.Parameter(torch.ones(1))]
    for kwargs in (dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1.0), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            AdamW(p, **kwargs)


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_param_groups_gpt_tied():
    model = GPT.from_preset("gpt-tiny")
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["name"], decay["weight_decay"], no_decay["name"], no_decay["weight_decay"]) == (
        "decay", 0.1, "no_decay", 0.0,
    )
    decay_names, no_decay_names = _names(model, decay["params"]), _names(model, no_decay["params"])
    assert decay_names == {n for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2} - {
        "tok_emb.weight", "pos_emb.weight",
    }
    assert {"tok_emb.weight", "pos_emb.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(".norm" not in n and not n.endswith("bias") for n in decay_names)
    # the tied lm_head is the embedding: listed once, and not decayed
    every = decay["params"] + no_decay["params"]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in no_decay["params"])
    assert sum(p.numel() for p in every) == model.num_params()


def test_param_groups_llama_untied():
    model = GPT.from_preset("llama-tiny")
    decay, no_decay = param_groups(model, 0.1)
    assert "lm_head.weight" in _names(model, decay["params"])  # its own matrix: a Linear weight like any other
    assert _names(model, no_decay["params"]) == {n for n, _ in model.named_parameters() if "norm" in n} | {
        "tok_emb.weight",
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    torch.optim.AdamW(param_groups(model, 0.1))  # torch accepts the extra "name" key


def test_param_groups_skip_frozen():
    net = tiny_net()
    net[1].weight.requires_grad_(False)
    decay, no_decay = param_groups(net, 0.1)
    assert [tuple(p.shape) for p in decay["params"]] == [(10, 16)]
    assert len(no_decay["params"]) == 5  # embedding, two biases, the norm's weight and bias


def _grads(seed: int, scale: float) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (5,), (2, 2, 2), (7,)]]
    for p in params[:-1]:  # the last has no gradient
        p.grad = scale * torch.randn(p.shape, generator=g)
    return params


@pytest.mark.parametrize("scale, max_norm", [(10.0, 1.0), (1.0, 1.0), (0.01, 1.0), (3.0, 0.5)])
def test_clip_grad_norm_matches_torch(scale, max_norm):
    ours, theirs = _grads(0, scale), _grads(0, scale)
    before = [p.grad.clone() for p in ours[:-1]]
    norm = clip_grad_norm(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert_close(norm, ref_norm, **TIGHT)
    for p, q in zip(ours[:-1], theirs[:-1], strict=True):
        assert_close(p.grad, q.grad, **TIGHT)
    assert ours[-1].grad is None
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:-1]]))
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    assert_close(norm, expected, **TIGHT)  # returns the norm before clipping
    if norm > max_norm:
        assert after == pytest.approx(max_norm, rel=1e-5)
    else:
        assert all(torch.equal(p.grad, g) for p, g in zip(ours[:-1], before, strict=True))  # untouched


def test_clip_grad_norm_worked_example_and_edges():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm(p, 1.0).item() == pytest.approx(5.0)  # a single tensor works too
    assert_close(p.grad, torch.tensor([0.6, 0.8]))
    assert clip_grad_norm([nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0  # no gradients at all
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], 0.0)


def test_foreach_adamw_equals_the_loop_exactly_and_torch_foreach():
    """The trainer's ForeachAdamW: the loop's numbers exactly, and torch's foreach=True within float error."""
    nets = [tiny_net()]
    nets += [copy.deepcopy(nets[0]) for _ in range(2)]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opts = [AdamW(groups_of(nets[0]), **hp), ForeachAdamW(groups_of(nets[1]), **hp),
            torch.optim.AdamW(groups_of(nets[2]), **hp, foreach=True)]
    schedule = CosineSchedule(peak_lr=1e-2, warmup_steps=10, decay_steps=80)
    for step in range(60):
        for net, opt in zip(nets, opts, strict=True):
            set_lr(opt, schedule(step))
            loss_of(net, step).backward()
            if step % 7 == 3:
                net[0].weight.grad = None  # the embedding's step count falls behind the others'
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q, r in zip(*(n.parameters() for n in nets), strict=True):
        assert torch.equal(p, q)
        assert_close(q, r, **TIGHT)
    assert opts[1].state_dict()["state"].keys() == opts[0].state_dict()["state"].keys()
