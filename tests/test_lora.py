"""posttrain.lora: LoRA by hand, proven equal to Hugging Face peft on the book's GPT-2 and Llama style models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmbook.model import GPT
from llmbook.posttrain.lora import (
    LoRALinear,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
)

peft = pytest.importorskip("peft")

# the same nn.Linear names for both libraries; lm_head only where it is not tied to the embedding
TARGETS = {"gpt-tiny": ("qkv", "proj", "fc"), "llama-tiny": ("qkv", "proj", "gate", "up", "down", "lm_head")}
R, ALPHA = 4, 8.0


def tiny(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset(preset).to(dtype).eval()


def batch(model: GPT, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def set_adapters(model: torch.nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    """Nonzero A and B (B is zero at init, which would hide any error in B's path), returned as a state dict."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in sorted(lora_state_dict(model).items())}
    load_lora_state_dict(model, state)
    return state


def ours_and_peft(preset: str, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    base = tiny(preset, dtype=dtype)
    ours = apply_lora(copy.deepcopy(base), TARGETS[preset], r=R, alpha=ALPHA, dropout=dropout)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(TARGETS[preset]))
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    state = set_adapters(ours)
    with torch.no_grad():  # the same adapter weights into peft's lora_A/lora_B nn.Linears
        for key, value in state.items():
            name, part = key.rsplit(".", 1)
            theirs.get_submodule(f"base_model.model.{name}.{part}.default").weight.copy_(value)
    return base, ours, theirs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# float32 (measured: bit for bit equal on CPU, max difference 0.0) and bfloat16, where both libraries keep
# the adapters in float32 (peft's autocast_adapter_dtype default); bf16 within one bf16 rounding step to allow
# for another matmul kernel, though measured 0.0 here too
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 2**-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_outputs_and_gradients_equal_peft(preset, dtype):
    _, ours, theirs = ours_and_peft(preset, dtype=dtype)
    x, y = batch(ours)
    logits, loss = ours(x, y)
    logits_p, loss_p = theirs(x, y)
    loss.backward()
    loss_p.backward()
    diffs = {"logits": max_diff(logits, logits_p)}
    scales = {"logits": logits_p.abs().max().item()}  # tolerances relative to the size of what is compared
    for name, m in lora_modules(ours).items():
        for part in ("lora_A", "lora_B"):
            grad_p = theirs.get_submodule(f"base_model.model.{name}.{part}.default").weight.grad
            diffs[f"{name}.{part}.grad"] = max_diff(getattr(m, part).grad, grad_p)
            scales[f"{name}.{part}.grad"] = grad_p.abs().max().item()
            assert getattr(m, part).dtype == torch.float32  # adapters in float32 even in a bf16 model
            assert getattr(m, part).grad.abs().sum() > 0  # both factors really get a gradient
    print(f"\n{preset} {dtype}: max |ours - peft| logits {diffs['logits']:.2e}, "
          f"gradients of A and B {max(v for k, v in diffs.items() if k != 'logits'):.2e}")
    assert max_diff(loss, loss_p) <= tolerance(dtype)
    assert all(v <= tolerance(dtype) * max(1.0, scales[k]) for k, v in diffs.items()), diffs
    # the frozen base gets no gradient in either library
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_merged_weights_equal_peft_merge_and_unload(preset, dtype):
    _, ours, theirs = ours_and_peft(preset, dtype=dtype)
    x, _ = batch(ours)
    with torch.no_grad():
        before = ours(x)[0]
    merged, merged_p = merge_lora(ours), theirs.merge_and_unload()
    assert type(merged) is GPT and type(merged_p) is GPT
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    sd, sd_p = merged.state_dict(), merged_p.state_dict()
    assert sd.keys() == sd_p.keys()
    worst = max(max_diff(sd[k], sd_p[k]) for k in sd)
    with torch.no_grad():
        after = merged(x)[0]
    print(f"\n{preset} {dtype}: merged weights max |ours - peft| {worst:.2e}; "
          f"logits merged vs adapter {max_diff(before, after):.2e}")
    assert worst <= tolerance(dtype)
    assert all(v.dtype == dtype for v in sd.values())  # merged into the base weights' precision
    if dtype == torch.float32:  # bf16: merging rounds W + ΔW to bf16, a different function by design
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())  # a plain GPT again


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_trainable_counts_equal_peft(preset):
    _, ours, theirs = ours_and_peft(preset)
    count = count_trainable(ours)
    assert tuple(count) == theirs.get_nb_trainable_parameters()
    # each adapted linear adds r·(in + out) numbers
    expected = sum(R * (m.in_features + m.out_features) for m in lora_modules(ours).values())
    assert count.trainable == expected and count.fraction < 0.15


def test_dropout_matches_peft_with_the_same_random_numbers():
    _, ours, theirs = ours_and_peft("llama-tiny", dropout=0.25)
    ours.train()
    theirs.train()
    x, y = batch(ours)
    torch.manual_seed(3)
    loss = ours(x, y)[1]
    torch.manual_seed(3)
    loss_p = theirs(x, y)[1]
    torch.testing.assert_close(loss, loss_p, rtol=0, atol=1e-6)
    torch.manual_seed(4)
    assert ours(x, y)[1] != loss  # dropout is really on in training mode
    ours.eval()  # ... and off in eval mode: deterministic
    assert torch.equal(ours(x)[0], ours(x)[0])


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_b_zero_at_init_leaves_the_model_unchanged(preset):
    base = tiny(preset)
    x, _ = batch(base)
    adapted = apply_lora(copy.deepcopy(base), TARGETS[preset], r=R, alpha=ALPHA)
    for m in lora_modules(adapted).values():
        assert torch.count_nonzero(m.lora_B) == 0
        bound = 1 / math.sqrt(m.in_features)  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
        assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 3
    with torch.no_grad():
        assert torch.equal(adapted(x)[0], base(x)[0])
    # on the first step only B gets a gradient (dL/dA has a factor B = 0); A follows once B has moved
    adapted(x, x)[1].backward()
    for m in lora_modules(adapted).values():
        assert torch.count_nonzero(m.lora_A.grad) == 0 and torch.count_nonzero(m.lora_B.grad) > 0


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_merge_unmerge_round_trip(preset):
    base = tiny(preset)
    adapted = apply_lora(copy.deepcopy(base), TARGETS[preset], r=R, alpha=ALPHA)
    set_adapters(adapted)
    x, _ = batch(adapted)
    modules = lora_modules(adapted).values()
    with torch.no_grad():
        before = adapted(x)[0]
        assert max_diff(before, base(x)[0]) > 1e-3  # the adapters really change the output
        for m in modules:
            m.merge().merge()  # a second merge does nothing
        merged = adapted(x)[0]
        for m in modules:
            m.unmerge()
        unmerged = adapted(x)[0]
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(unmerged, before, rtol=0, atol=1e-5)
    weight_err = max(max_diff(m.base.weight, base.get_submodule(n).weight) for n, m in lora_modules(adapted).items())
    print(f"\n{preset}: merge/unmerge: logits {max_diff(merged, before):.2e}, base weights back to {weight_err:.2e}")
    assert weight_err < 1e-6


def test_adapter_state_dict_is_small_and_round_trips(tmp_path):
    model = apply_lora(tiny("llama-tiny"), TARGETS["llama-tiny"], r=R, alpha=ALPHA)
    set_adapters(model)
    state = lora_state_dict(model)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in state)
    n_adapter = sum(v.numel() for v in state.values())
    assert n_adapter == count_trainable(model).trainable
    assert n_adapter < 0.15 * model.num_params()
    torch.save(state, tmp_path / "adapter.pt")
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert (tmp_path / "adapter.pt").stat().st_size < 0.2 * (tmp_path / "full.pt").stat().st_size

    fresh = apply_lora(tiny("llama-tiny"), TARGETS["llama-tiny"], r=R, alpha=ALPHA)
    load_lora_state_dict(fresh, torch.load(tmp_path / "adapter.pt"))
    x, _ = batch(model)
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], model(x)[0])
    other_rank = apply_lora(tiny("llama-tiny"), TARGETS["llama-tiny"], r=2, alpha=ALPHA)
    with pytest.raises(ValueError, match="another rank"):
        load_lora_state_dict(other_rank, state)
    fewer = apply_lora(tiny("llama-tiny"), ("qkv",), r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(fewer, state)


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_adamw_trains_only_the_adapters(preset):
    model = apply_lora(tiny(preset), TARGETS[preset], r=R, alpha=ALPHA).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = lora_state_dict(model)
    # all parameters handed to AdamW, weight decay on: frozen ones have no gradient, so AdamW skips them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = batch(model)
    losses = []
    for _ in range(5):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert all(not torch.equal(v, lora_state_dict(model)[k]) for k, v in adapters.items())
    # optimizer state only for the adapters: the memory LoRA saves
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == count_trainable(model).trainable


def test_bad_input_is_one_clear_line():
    with pytest.raises(ValueError, match=r"'q_proj' matches no nn.Linear.*attn.qkv.*mlp.fc") as err:
        apply_lora(tiny("gpt-tiny"), ("qkv", "q_proj"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="tied to tok_emb.weight"):
        apply_lora(tiny("gpt-tiny"), ("lm_head",))
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        apply_lora(tiny("gpt-tiny"), r=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(tiny("gpt-tiny"), dropout=1.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(tiny("gpt-tiny")))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(torch.nn.Embedding(3, 4))


def test_default_targets_are_attention_and_mlp():
    gpt = apply_lora(tiny("gpt-tiny"))
    llama = apply_lora(tiny("llama-tiny"))
    assert {n.split(".", 2)[-1] for n in lora_modules(gpt)} == {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}
    assert {n.split(".", 2)[-1] for n in lora_modules(llama)} == {
        "attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down"}
    assert "lm_head" not in lora_modules(llama)


def test_adapters_are_initialised_in_module_order():
    """Each adapter's A takes the next numbers of the seeded RNG, so the order of creation is part of the recipe:
    it must be the model's module order (a set's order changes with the process's hash seed)."""
    model = tiny("llama-tiny")
    torch.manual_seed(5)
    apply_lora(model, r=R, alpha=ALPHA)
    torch.manual_seed(5)
    for name, m in lora_modules(model).items():  # named_modules order
        expected = torch.empty_like(m.lora_A)
        torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
        assert torch.equal(m.lora_A, expected), name


def test_adapters_are_the_same_in_processes_with_different_hash_seeds():
    import os
    import subprocess
    import sys

    code = ("import hashlib, torch; from llmbook.model import GPT; from llmbook.posttrain.lora import apply_lora, "
            "lora_state_dict; torch.manual_seed(0); m = apply_lora(GPT.from_preset('llama-tiny'), r=2, alpha=4); "
            "torch.manual_seed(7); s = lora_state_dict(m); "
            "print(hashlib.sha256(b''.join(s[k].numpy().tobytes() for k in sorted(s))).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(digests) == 1, digests
