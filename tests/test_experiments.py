"""llmbook.experiments: short runs, divergence, the sweeps and parameter matching (seconds)."""

import dataclasses
import math

import pytest
import torch

from llmbook import experiments as ex
from llmbook.model import GPT


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # a short run sets one thread


def tiny(**changes):
    return ex.short_config(**{"batch_size": 4, "context_length": 32, "max_steps": 15, "eval_batches": 2, **changes})


def result(losses, lr=1e-3):
    return ex.RunResult("r", tiny(lr=lr), list(losses), None, None, 1.0, 1.0, 10)


def test_short_config_is_quiet():
    cfg = ex.short_config()
    assert cfg.sample_tokens == 0 and cfg.eval_interval == 0 and cfg.checkpoint_interval == 0 and cfg.threads == 1
    assert ex.short_config(cfg, lr=0.5).lr == 0.5


def test_run_learns_and_is_reproducible():
    a, b = ex.run(tiny(lr=3e-3)), ex.run(tiny(lr=3e-3))
    assert len(a.losses) == 15 and a.losses == b.losses  # same seed: same weights, same batches
    assert not a.diverged and a.final_loss < a.initial_loss
    assert abs(a.initial_loss - math.log(256)) < 0.2  # untrained: about uniform over the bytes
    assert a.val_loss is not None and a.val_bpb is not None and a.params == GPT(a.cfg.model_config(256)).num_params()
    assert a.seconds > 0 and a.cpu_seconds > 0 and a.tokens_per_s > 0


def test_seeds_differ():
    s0, s1 = ex.seed_runs(tiny(max_steps=3), [0, 1])
    assert s0.losses != s1.losses and "seed 1" in s1.label


def test_a_huge_learning_rate_diverges_and_stops_early():
    r = ex.run(tiny(lr=3.0, max_steps=60))
    assert r.diverged and r.val_loss is None
    assert len(r.losses) < 60  # stopped once it was worse than the untrained model


@pytest.mark.parametrize("losses, diverged", [
    ([5.0] + [4.0] * 10, False),
    ([5.0] + [6.0] * 10, True),  # ends above the start
    ([5.0, 4.0, float("nan")], True),
    ([5.0, float("inf")], True),
])
def test_divergence_rule(losses, diverged):
    assert result(losses).diverged == diverged


def test_best_and_first_divergence():
    runs = [result([5, 4], 1e-3), result([5, 3], 1e-2), result([5, 3.5], 1e-1), result([5, 9], 1.0),
            result([5, float("nan")], 10.0)]
    assert ex.best_run(runs).cfg.lr == 1e-2
    assert ex.first_divergence(runs).cfg.lr == 1.0
    assert ex.first_divergence(runs[:3]) is None
    with pytest.raises(ValueError, match="every run diverged"):
        ex.best_run(runs[3:])


def test_lr_sweep_sorts_and_stops_after_divergence():
    runs = ex.lr_sweep(tiny(max_steps=12), [3.0, 1e-3, 10.0, 1e-2])
    assert [r.cfg.lr for r in runs] == [1e-3, 1e-2, 3.0]  # sorted; 10 never ran: 3 diverged
    assert runs[-1].diverged and not runs[0].diverged


def test_steps_for_tokens():
    assert ex.steps_for_tokens(65_536, 16, 64) == 64
    assert ex.steps_for_tokens(65_537, 16, 64) == 64
    with pytest.raises(ValueError, match="do not fill one batch"):
        ex.steps_for_tokens(100, 16, 64)


def test_batch_sweep_spends_the_same_tokens():
    runs = ex.batch_sweep(tiny(), [2, 8], token_budget=8 * 32 * 4)
    assert [len(r.losses) for r in runs] == [16, 4]
    assert {len(r.losses) * r.cfg.tokens_per_step for r in runs} == {8 * 32 * 4}


@pytest.mark.parametrize("base", ["gpt-tiny", "llama-tiny"])
def test_matched_d_ff_matches_gelu(base):
    gelu = dataclasses.replace(tiny(model=base).model_config(256), mlp="gelu", d_ff=None)
    target = ex.count_params(gelu)
    swiglu = dataclasses.replace(gelu, mlp="swiglu")
    d_ff = ex.matched_d_ff(swiglu, target)
    matched = dataclasses.replace(swiglu, d_ff=d_ff)
    assert abs(ex.count_params(matched) - target) / target < 0.01
    for cfg in (gelu, matched):  # the planner counts what the model holds
        assert ex.count_params(cfg) == GPT(cfg).num_params()
    best = abs(ex.count_params(matched) - target)
    for other in (d_ff - 1, d_ff + 1):
        assert abs(ex.count_params(dataclasses.replace(swiglu, d_ff=other)) - target) >= best
    assert abs(d_ff - 8 * gelu.d_model / 3) < 0.1 * gelu.d_model  # about 8/3 d


def test_mean_and_spread():
    assert ex.mean_and_spread([2.0, 2.2]) == pytest.approx((2.1, 0.1))
    assert ex.mean_and_spread([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        ex.mean_and_spread([])


def test_cpu_matmul_flops_is_a_plausible_rate():
    torch.set_num_threads(1)
    rate = ex.cpu_matmul_flops(256, repeats=3)
    assert 1e8 < rate < 1e13  # between a very old core and far beyond any CPU thread
