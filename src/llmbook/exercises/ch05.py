"""Checks for Chapter 5's exercises: RMSNorm, LayerNorm, top-k and top-p filtering, a GPT-2 block.

Every expected value comes from ``llmbook.layers``, ``llmbook.generate`` and ``llmbook.model``,
which the test suite checks against PyTorch and Hugging Face, so a check and
the chapter can never disagree. When an answer is wrong, the check tries to
name the usual mistake (a mean that RMSNorm does not subtract, the unbiased
variance, zeros instead of minus infinity, the token that crosses p left out,
...) by comparing it with the wrong answers that those mistakes produce.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from llmbook import generate, layers, model
from llmbook.exercises import exercise
from llmbook.exercises.tensors import close as _close
from llmbook.exercises.tensors import first_hint as _first_hint
from llmbook.exercises.tensors import random_tensor as _random
from llmbook.exercises.tensors import returned_tensor as _returned_tensor


def _unchanged(given: list[Tensor], original: list[Tensor], name: str) -> None:
    if any(not torch.equal(a, b) for a, b in zip(given, original, strict=True)):
        raise AssertionError(f"{name} changed its inputs; compute a new tensor instead (e.g. masked_fill, "
                             "not masked_fill_, and no `x -= ...`)")


def _max_error(got: Tensor, expected: Tensor) -> float:
    finite = torch.isfinite(expected) & torch.isfinite(got)
    if not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        return float("inf")
    return (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0


# test inputs with a clear nonzero mean, so that forgetting (or adding) the mean shows
_NORM_CASES = [  # (shape, eps)
    ((2, 3, 8), 1e-5),
    ((1, 5, 64), 1e-6),
    ((4, 16), 1e-5),
    ((2, 7, 32), 0.5),  # a large eps (and small inputs) tells eps inside the square root from eps outside
]


def _norm_inputs(shape: tuple[int, ...], eps: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    x = _random(*shape, seed=seed) * (0.3 if eps >= 0.1 else 2.0) + 1.5
    weight = 1 + 0.5 * _random(shape[-1], seed=seed + 100)
    bias = 0.5 * _random(shape[-1], seed=seed + 200)
    return x, weight, bias


# ---------------------------------------------------------------------------
# 5.1 RMSNorm
# ---------------------------------------------------------------------------


@exercise("5.1", solution="rms_norm")
def check_rms_norm(rms_norm):
    for seed, (shape, eps) in enumerate(_NORM_CASES):
        x, weight, _ = _norm_inputs(shape, eps, seed)
        given = [x.clone(), weight.clone()]
        what = f"x of shape {shape}, weight of shape {(shape[-1],)}, eps={eps}"
        got = _returned_tensor(rms_norm(*given, eps), "rms_norm", shape, what)
        _unchanged(given, [x, weight], "rms_norm")
        reference = layers.RMSNorm(shape[-1], eps=eps)
        with torch.no_grad():
            reference.weight.copy_(weight)
            expected = reference(x)
        if _close(got, expected):
            continue
        ms = x.pow(2).mean(-1, keepdim=True)
        centered = x - x.mean(-1, keepdim=True)
        hint = _first_hint(got, [
            (centered / (centered.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight,
             "RMSNorm does not subtract the mean: that is LayerNorm. Divide x itself by sqrt(mean(x²) + eps)"),
            (x / (ms + eps).sqrt(), "multiply the normalized x by `weight`, the learned scale"),
            (x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt() * weight,
             "divide by the root of the *mean* of the squares over the last dim, not of their sum"),
            (x / (ms.sqrt() + eps) * weight, "eps goes inside the square root: sqrt(mean(x²) + eps)"),
            (x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt() * weight,
             "take the mean over the last dim (the channels of each token), not over the batch"),
        ])
        raise AssertionError(f"rms_norm({what}) differs from llmbook.layers.RMSNorm by up to "
                             f"{_max_error(got, expected):.3g}{hint}")


# ---------------------------------------------------------------------------
# 5.2 LayerNorm
# ---------------------------------------------------------------------------


@exercise("5.2", solution="layer_norm")
def check_layer_norm(layer_norm):
    for seed, (shape, eps) in enumerate(_NORM_CASES):
        x, weight, bias = _norm_inputs(shape, eps, seed)
        given = [x.clone(), weight.clone(), bias.clone()]
        what = f"x of shape {shape}, weight and bias of shape {(shape[-1],)}, eps={eps}"
        got = _returned_tensor(layer_norm(*given, eps), "layer_norm", shape, what)
        _unchanged(given, [x, weight, bias], "layer_norm")
        reference = layers.LayerNorm(shape[-1], eps=eps)
        with torch.no_grad():
            reference.weight.copy_(weight)
            reference.bias.copy_(bias)
            expected = reference(x)
        assert _close(expected, torch.nn.functional.layer_norm(x, (shape[-1],), weight, bias, eps))
        if _close(got, expected):
            continue
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, correction=0)
        normed = (x - mean) / (var + eps).sqrt()
        hint = _first_hint(got, [
            ((x - mean) / (x.var(-1, keepdim=True, correction=1) + eps).sqrt() * weight + bias,
             "use the biased variance (divide by C, not C - 1): x.var(-1, correction=0), as PyTorch does"),
            (normed * weight, "add the learned shift `bias` after scaling by `weight`"),
            (normed + bias, "multiply by the learned scale `weight` before adding `bias`"),
            (normed, "scale by `weight` and shift by `bias` after normalizing"),
            ((x - mean) / (var.sqrt() + eps) * weight + bias, "eps goes inside the square root: sqrt(var + eps)"),
            (x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight + bias,
             "subtract the mean before dividing by the standard deviation"),
            ((x - x.mean(0, keepdim=True)) / (x.var(0, keepdim=True, correction=0) + eps).sqrt() * weight + bias,
             "normalize over the last dim (each token's channels), not over the batch: that is BatchNorm"),
        ])
        raise AssertionError(f"layer_norm({what}) differs from llmbook.layers.LayerNorm by up to "
                             f"{_max_error(got, expected):.3g}{hint}")


# ---------------------------------------------------------------------------
# 5.3 top-k
# ---------------------------------------------------------------------------


def _check_filter(fn, name: str, reference, cases, wrong_answers) -> None:
    """Shared loop of the top-k and top-p checks: shape, no in-place change, -inf pattern, values."""
    for seed, (shape, arg) in enumerate(cases):
        logits = _random(*shape, seed=seed) * 2
        given = logits.clone()
        what = f"logits of shape {shape}, {arg}"
        got = _returned_tensor(fn(given, arg), name, shape, what)
        _unchanged([given], [logits], name)
        expected = reference(logits, arg)
        if _close(got, expected):
            continue
        kept, should_keep = torch.isfinite(got), torch.isfinite(expected)
        if torch.equal(kept, should_keep):
            hint = "; the right tokens survive, but change their logits: keep the survivors' logits unchanged"
        elif kept.all():
            zeros = (got == 0) & ~should_keep
            hint = ("; no logit is -inf. Set the removed tokens' logits to float('-inf'): a logit of 0 still has "
                    "probability after the softmax" if zeros.any() else
                    "; nothing was removed: set the logits of the removed tokens to float('-inf')")
        else:
            hint = _first_hint(got, wrong_answers(logits, arg))
            if not hint:
                n_got, n_want = kept.sum(-1).flatten()[0].item(), should_keep.sum(-1).flatten()[0].item()
                hint = (f"; the first row keeps {n_got} tokens, it should keep {n_want}" if n_got != n_want else
                        "; the right number of tokens survive, but not the right ones")
        raise AssertionError(f"{name}({what}) differs from llmbook.generate.{reference.__name__}{hint}")


def _keep(logits: Tensor, keep: Tensor) -> Tensor:
    return logits.masked_fill(~keep, float("-inf"))


def _top_k_wrong(logits: Tensor, k: int) -> list[tuple[Tensor, str]]:
    order = logits.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of each logit, 0 = largest
    rank_asc = logits.argsort(dim=-1).argsort(dim=-1)
    return [
        (_keep(logits, rank_asc < k), "you kept the k *smallest* logits: keep the k largest (torch.topk)"),
        (_keep(logits, order < k + 1), "one token too many: keep exactly k tokens (kth largest value and up)"),
        (_keep(logits, order < k - 1), "one token too few: the kth largest logit itself must survive (use >=)"),
        (_keep(logits, logits.argsort(dim=0, descending=True).argsort(dim=0) < k),
         "filter along the last dim (the vocabulary), not the first"),
    ]


@exercise("5.3", solution="top_k_filter")
def check_top_k_filter(top_k_filter):
    cases = [((1, 10), 3), ((2, 3, 50), 1), ((4, 100), 10), ((3, 7), 7), ((20,), 5)]
    _check_filter(top_k_filter, "top_k_filter", generate.filter_top_k, cases, _top_k_wrong)


# ---------------------------------------------------------------------------
# 5.4 top-p
# ---------------------------------------------------------------------------


def _top_p_wrong(logits: Tensor, p: float) -> list[tuple[Tensor, str]]:
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(-1)

    def unsort(keep_sorted: Tensor) -> Tensor:
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

    return [
        (_keep(logits, unsort((cum <= p) | (torch.arange(cum.shape[-1]) == 0).expand_as(cum))),
         "the token whose probability carries the total past p must be kept too: remove a token only if the "
         "tokens ranked above it already reach p (cumulative minus its own probability >= p)"),
        (_keep(logits, unsort(cum < p)),
         "keep the token that crosses p, and always keep the most likely token"),
        (_keep(logits, cum - sorted_probs < p),
         "the mask is in sorted order: put it back in vocabulary order (scatter it with the sort's indices)"),
        (_keep(logits, unsort((logits.sort(-1, descending=True).values.cumsum(-1) - logits.sort(
            -1, descending=True).values) < p)),
         "accumulate probabilities (softmax of the logits), not the logits themselves"),
    ]


@exercise("5.4", solution="top_p_filter")
def check_top_p_filter(top_p_filter):
    cases = [((1, 10), 0.5), ((2, 3, 50), 0.9), ((4, 100), 0.3), ((3, 7), 0.999), ((20,), 0.05)]
    _check_filter(top_p_filter, "top_p_filter", generate.filter_top_p, cases, _top_p_wrong)


# ---------------------------------------------------------------------------
# 5.8 A whole GPT-2 block
# ---------------------------------------------------------------------------


def _block_variant(p: dict[str, Tensor], x: Tensor, n_heads: int, eps: float, *, mask: str = "causal",
                   scale: str = "head", gelu: str = "tanh", heads: str = "ok", order: str = "prenorm",
                   residual: bool = True, norm2: str = "norm2") -> Tensor:
    """GPT-2's pre-norm block from the weights ``p``, or the block that a typical mistake computes."""
    B, T, C = x.shape
    hs = C // n_heads

    def ln(t: Tensor, name: str) -> Tensor:
        return F.layer_norm(t, (C,), p[f"{name}.weight"], p[f"{name}.bias"], eps)

    def split(t: Tensor) -> Tensor:
        if heads == "interleaved":  # (B, T, hs, nh): each head takes every nh-th channel
            return t.view(B, T, hs, n_heads).permute(0, 3, 1, 2)
        return t.view(B, T, n_heads, hs).transpose(1, 2)

    def attn(t: Tensor) -> Tensor:
        q, k, v = (split(u) for u in F.linear(t, p["attn.qkv.weight"], p["attn.qkv.bias"]).split(C, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt({"head": hs, "model": C, "none": 1}[scale])
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        if mask == "causal":
            s = s.masked_fill(future, float("-inf"))
        elif mask == "zeros":
            s = s.masked_fill(future, 0.0)
        y = s.softmax(dim=-1) @ v
        if mask == "after":  # masked after the softmax: the rows no longer sum to 1
            y = (s.softmax(dim=-1).masked_fill(future, 0.0)) @ v
        y = y.reshape(B, T, C) if heads == "no-transpose" else y.transpose(1, 2).reshape(B, T, C)
        return F.linear(y, p["attn.proj.weight"], p["attn.proj.bias"])

    def mlp(t: Tensor) -> Tensor:
        h = F.linear(t, p["mlp.fc.weight"], p["mlp.fc.bias"])
        h = F.gelu(h, approximate=gelu) if gelu != "relu" else F.relu(h)
        return F.linear(h, p["mlp.proj.weight"], p["mlp.proj.bias"])

    if order == "postnorm":
        x = ln(x + attn(x), "norm1")
        return ln(x + mlp(x), "norm2")
    if order == "norm-stream":  # the residual stream itself normalized, as if x = norm(x) first
        x = ln(x, "norm1")
        x = x + attn(x)
        x = ln(x, "norm2")
        return x + mlp(x)
    if not residual:
        return mlp(ln(attn(ln(x, "norm1")), norm2))
    x = x + attn(ln(x, "norm1"))
    return x + mlp(ln(x, norm2))


_BLOCK_MISTAKES = [  # (keyword arguments of _block_variant, hint)
    (dict(mask="none"), "no causal mask: set the scores of future positions (j > i) to -inf before the softmax"),
    (dict(mask="zeros"), "masked scores must be -inf, not 0: exp(0) = 1 still gives the future tokens weight"),
    (dict(mask="after"), "mask before the softmax (scores of future positions = -inf), not its output"),
    (dict(scale="none"), "divide the scores q·k by sqrt(head_dim)"),
    (dict(scale="model"), "divide the scores by sqrt(head_dim) = sqrt(d_model / n_heads), not sqrt(d_model)"),
    (dict(gelu="none"), "GPT-2 uses the tanh approximation of GELU: F.gelu(h, approximate='tanh')"),
    (dict(gelu="relu"), "the MLP's activation is GELU (tanh approximation), not ReLU"),
    (dict(heads="interleaved"), "split the channels into heads with view(B, T, n_heads, head_dim): each head "
                                "takes a contiguous slice of head_dim channels"),
    (dict(heads="no-transpose"), "transpose the heads' outputs back to (B, T, n_heads, head_dim) before "
                                 "reshaping to (B, T, C); reshaping (B, n_heads, T, head_dim) directly mixes "
                                 "tokens"),
    (dict(order="postnorm"), "that is post-norm: normalize the input of each sub-layer, "
                             "x = x + attn(norm1(x)), and leave the residual stream itself unnormalized"),
    (dict(order="norm-stream"), "add the sub-layer's output to the unnormalized x: x = x + attn(norm1(x)), "
                                "not x = norm1(x); x = x + attn(x)"),
    (dict(residual=False), "add the residual connections: x = x + attn(norm1(x)), then x = x + mlp(norm2(x))"),
    (dict(norm2="norm1"), "use norm2 (its own weight and bias) before the MLP, not norm1 again"),
]


def _block_inputs(cfg: model.ModelConfig, batch: int, T: int, seed: int) -> tuple[model.Block, Tensor]:
    """A reference block with every parameter random (norm scales around 1) and an input x."""
    reference = model.Block(cfg, 0).eval()
    with torch.no_grad():
        for i, (name, param) in enumerate(reference.named_parameters()):
            r = _random(*param.shape, seed=1000 * seed + i)
            if name.startswith("norm"):
                param.copy_(1 + 0.3 * r if name.endswith("weight") else 0.3 * r)
            else:
                param.copy_(r / math.sqrt(param.shape[-1]))
    return reference, _random(batch, T, cfg.d_model, seed=seed) + 0.5


def _compare_parameter_grads(mine: nn.Module, ref: nn.Module, what: str, ref_name: str, atol: float) -> None:
    """After one backward through each: every parameter of the reader's module got the library's gradient."""
    ours = dict(mine.named_parameters())
    for name, param in ref.named_parameters():
        g = ours[name].grad
        if g is None:
            raise AssertionError(f"{what}: {name} got no gradient; is it used in forward, and not through "
                                 ".data or .detach()?")
        if not _close(g, param.grad, atol=atol):
            raise AssertionError(f"{what}: the gradient of {name} differs from {ref_name}'s by up to "
                                 f"{(g - param.grad).abs().max().item():.3g}")


def _load(block, reference: model.Block, what: str) -> None:
    expected = {n: p.shape for n, p in reference.named_parameters()}
    got = {n: p.shape for n, p in block.named_parameters()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "",
                 "wrong shapes: " + ", ".join(f"{n} {tuple(got[n])} instead of {tuple(expected[n])}" for n in wrong)
                 if wrong else ""]
        raise AssertionError(
            f"{what}: the block's parameters should be named and shaped as llmbook.model.Block's, "
            f"{', '.join(f'{n} {tuple(s)}' for n, s in expected.items())}; "
            f"{'; '.join(x for x in parts if x)}. Use submodules norm1, attn (with qkv and proj), norm2 and "
            "mlp (with fc and proj); nn.Linear(d, 4 * d) has a weight of shape (4d, d)")
    result = block.load_state_dict(reference.state_dict(), strict=False)
    not_loaded = [k for k in result.missing_keys if k in expected] + list(result.unexpected_keys)
    if not_loaded:
        raise AssertionError(f"{what}: load_state_dict did not load {not_loaded}")


@exercise("5.8", solution="gpt2_block")
def check_gpt2_block(gpt2_block):
    cases = [  # (config, batch, T)
        (model.ModelConfig.preset("gpt-tiny"), 2, 9),  # d_model 64, 4 heads of 16
        (model.ModelConfig.preset("gpt-tiny", d_model=48, n_heads=6), 1, 16),  # 6 heads of 8
        (model.ModelConfig.preset("gpt-tiny"), 3, 1),  # one token: attends to itself only
    ]
    for seed, (cfg, batch, T) in enumerate(cases):
        what = f"gpt2_block({cfg.d_model}, {cfg.n_heads}, eps={cfg.norm_eps})"
        block = gpt2_block(cfg.d_model, cfg.n_heads, cfg.norm_eps)
        if block is None:
            raise AssertionError(f"{what} returned None; did you forget `return`?")
        if not isinstance(block, nn.Module):
            raise AssertionError(f"{what} should return an nn.Module (an instance of your block class), "
                                 f"got {type(block).__name__}: {block!r:.60}")
        reference, x = _block_inputs(cfg, batch, T, seed)
        _load(block, reference, what)
        block.eval()
        shape = (batch, T, cfg.d_model)
        given = x.clone()
        with torch.no_grad():
            got = _returned_tensor(block(given), "your block", shape, f"x of shape {shape}")
        _unchanged([given], [x], "your block's forward")
        with torch.no_grad():
            expected = reference(x)
        params = {n: p.detach() for n, p in reference.named_parameters()}
        assert _close(expected, _block_variant(params, x, cfg.n_heads, cfg.norm_eps))
        if not _close(got, expected):
            hint = _first_hint(got, [(_block_variant(params, x, cfg.n_heads, cfg.norm_eps, **kw), h)
                                     for kw, h in _BLOCK_MISTAKES])
            raise AssertionError(f"{what}: on x of shape {shape} the output differs from "
                                 f"llmbook.model.Block's by up to {_max_error(got, expected):.3g}{hint}")

        # gradients: the same loss through both blocks must give the same gradient to x and every weight
        weights = _random(*shape, seed=seed + 50)
        x_mine, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        (block(x_mine) * weights).sum().backward()
        (reference(x_ref) * weights).sum().backward()
        if x_mine.grad is None or not _close(x_mine.grad, x_ref.grad):
            raise AssertionError(f"{what}: the gradient with respect to the input x differs from "
                                 "llmbook.model.Block's: does your forward detach something (.detach(), "
                                 ".data, torch.no_grad) or modify a tensor in place?")
        _compare_parameter_grads(block, reference, what, "llmbook.model.Block", atol=1e-4)

    # causality, directly: changing the last token must leave every earlier position's output unchanged
    cfg = cases[0][0]
    block = gpt2_block(cfg.d_model, cfg.n_heads, cfg.norm_eps).eval()
    x = _random(1, 6, cfg.d_model, seed=7)
    changed = x.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        if not _close(block(x)[:, :-1], block(changed)[:, :-1]):
            raise AssertionError("changing the last token changed the outputs at earlier positions: "
                                 "a position may only attend to itself and the positions before it")


# ---------------------------------------------------------------------------
# 5.9 Assemble it yourself: a block and the model's forward pass
# ---------------------------------------------------------------------------


def gpt_cases() -> list[tuple[str, model.ModelConfig, int, int]]:
    """(label, config, batch, T) of the 5.9 check: GPT-2 and Llama style (GQA, RoPE), short and full context."""
    return [
        ("GPT-2 style (gpt-tiny)", model.ModelConfig.preset("gpt-tiny", context_length=32), 2, 32),
        ("Llama style (llama-tiny)", model.ModelConfig.preset("llama-tiny", context_length=32), 2, 32),
        ("GPT-2 style, 3 layers", model.ModelConfig.preset("gpt-tiny", n_layers=3, context_length=32), 1, 11),
    ]


def random_gpt(cfg: model.ModelConfig, seed: int) -> model.GPT:
    """``llmbook.model.GPT`` with weights far from its init (norm scales around 1, matrices of unit gain).

    GPT's own init (std 0.02) makes attention nearly uniform, so leaving out RoPE
    or a norm would change the logits too little to see; these weights make every
    part of the model matter.
    """
    torch.manual_seed(seed)
    reference = model.GPT(cfg).eval()
    with torch.no_grad():
        for i, (name, param) in enumerate(reference.named_parameters()):
            r = _random(*param.shape, seed=1000 * seed + i)
            if "norm" in name:
                param.copy_(1 + 0.3 * r if name.endswith("weight") else 0.3 * r)
            elif name.endswith("bias"):
                param.copy_(0.1 * r)
            elif name.endswith("_emb.weight"):
                param.copy_(0.5 * r)
            else:
                param.copy_(r / math.sqrt(param.shape[-1]))
    return reference


def gpt_inputs(cfg: model.ModelConfig, batch: int, T: int, seed: int) -> tuple[Tensor, Tensor]:
    """Token ids ``idx`` (B, T) and their next tokens ``targets`` (B, T), two of them -100 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(cfg.vocab_size, (batch, T + 1), generator=g)
    idx, targets = seq[:, :-1], seq[:, 1:].clone()
    if T > 2:
        targets[0, 1] = targets[-1, T - 2] = -100
    return idx, targets


def gpt_variant(ref: model.GPT, idx: Tensor, *, order: str = "prenorm", residual: str = "both",
                final_norm: bool = True, positions: bool = True, rope: bool = True) -> Tensor:
    """The logits of ``ref``'s weights assembled correctly, or as a typical mistake assembles them."""
    cfg = ref.cfg
    x = ref.tok_emb(idx)
    if cfg.positions == "learned" and positions:
        x = x + ref.pos_emb(torch.arange(idx.shape[1]))
    for block in ref.blocks:
        saved = block.attn.rope
        if not rope:
            block.attn.rope = None
        try:
            if order == "postnorm":
                x = block.norm1(x + block.attn(x))
                x = block.norm2(x + block.mlp(x))
            else:
                a = block.attn(block.norm1(x))
                x = a if residual == "no-attn" else x + a
                m = block.mlp(block.norm2(x))
                x = m if residual == "no-mlp" else x + m
        finally:
            block.attn.rope = saved
    return ref.lm_head(ref.norm_f(x) if final_norm else x)


GPT_MISTAKES = [  # (keyword arguments of gpt_variant, hint)
    (dict(order="postnorm"), "that is post-norm: normalize each sub-layer's input, x = x + attn(norm1(x)), "
                             "and leave the residual stream itself unnormalized"),
    (dict(residual="no-attn"), "missing residual: add attention's output to the stream, x = x + attn(norm1(x))"),
    (dict(residual="no-mlp"), "missing residual: add the MLP's output to the stream, x = x + mlp(norm2(x))"),
    (dict(final_norm=False), "the final norm is missing: logits = lm_head(norm_f(x)) after the last block"),
    (dict(positions=False), "GPT-2 style adds the learned positions: x = tok_emb(idx) + pos_emb(arange(T))"),
    (dict(rope=False), "RoPE is missing: in Llama style build each block's attention with "
                       "rope=RotaryEmbedding(head_dim, ...), which rotates q and k by position"),
]


def loss_mistakes(logits: Tensor, idx: Tensor, targets: Tensor) -> list[tuple[Tensor, str]]:
    """The loss a typical mistake computes from the right logits, with its hint."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    keep = targets[:, 1:] != -100
    return [
        (F.cross_entropy(logits[:, :-1][keep], targets[:, 1:][keep]),
         "the loss is shifted twice: targets[:, t] is already the token after idx[:, t], so compare "
         "logits[:, t] with targets[:, t]"),
        (F.cross_entropy(flat, idx.reshape(-1)),
         "the loss is not shifted: compare the logits with targets (the next tokens), not with the input ids"),
        (F.cross_entropy(flat, targets.t().reshape(-1)),
         "wrong reshape: flatten logits (B, T, V) -> (B*T, V) and targets (B, T) -> (B*T,) in the same order "
         "(targets.reshape(-1), not targets.t())"),
        (F.cross_entropy(flat.softmax(-1), targets.reshape(-1)),
         "F.cross_entropy takes the logits and applies log-softmax itself; do not softmax them first"),
        (F.cross_entropy(flat, targets.reshape(-1), reduction="sum"),
         "the loss is the mean over the tokens (F.cross_entropy's default), not the sum"),
    ]


def _gpt_structure(mine: nn.Module, ref: model.GPT, what: str) -> None:
    """Name the structural mistakes (untied head, a position table in Llama) before the parameter names."""
    cfg = ref.cfg
    head, emb = getattr(mine, "lm_head", None), getattr(mine, "tok_emb", None)
    if isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding):
        tied = head.weight is emb.weight
        if cfg.tied_embeddings and not tied:
            raise AssertionError(f"{what}: the head is not tied to the embedding: GPT-2 style reuses the "
                                 "embedding matrix, self.lm_head.weight = self.tok_emb.weight")
        if not cfg.tied_embeddings and tied:
            raise AssertionError(f"{what}: the head is tied to the embedding, but this config has "
                                 "tied_embeddings=False (Llama): give lm_head its own matrix")
    if cfg.positions == "rope" and hasattr(mine, "pos_emb"):
        raise AssertionError(f"{what}: Llama style has no position table (pos_emb): positions enter through "
                             "RoPE inside attention; build pos_emb only when cfg.positions == 'learned'")
    expected = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in mine.state_dict().items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(f"{n} {got[n]} instead of {expected[n]}" for n in set(got) & set(expected)
                       if got[n] != expected[n])
        parts = [f"missing {missing[:6]}" if missing else "", f"unexpected {extra[:6]}" if extra else "",
                 f"wrong shapes: {wrong[:4]}" if wrong else ""]
        raise AssertionError(
            f"{what}: name and shape the parameters as llmbook.model.GPT's (tok_emb, pos_emb for learned "
            "positions, blocks.<i>.norm1/attn/norm2/mlp, norm_f, lm_head), using the library's "
            f"MultiHeadAttention, MLP or SwiGLU and LayerNorm or RMSNorm; {'; '.join(p for p in parts if p)}")
    mine.load_state_dict(ref.state_dict())


def _forward(mine: nn.Module, idx: Tensor, targets: Tensor | None, what: str, shape: tuple[int, ...]):
    out = mine(idx.clone(), targets=None if targets is None else targets.clone())
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError(f"{what}: forward should return a pair (logits, loss), got {type(out).__name__}")
    logits = _returned_tensor(out[0], "forward", shape, f"idx of shape {tuple(idx.shape)}")
    if targets is None and out[1] is not None:
        raise AssertionError(f"{what}: without targets, forward should return (logits, None)")
    return logits, out[1]


@exercise("5.9", solution="GPT")
def check_gpt_forward(GPT):  # noqa: N803  (the reader's class)
    for seed, (label, cfg, batch, T) in enumerate(gpt_cases()):
        what = f"GPT({label})"
        mine = GPT(cfg)
        if not isinstance(mine, nn.Module):
            raise AssertionError(f"{what} should be an nn.Module, got {type(mine).__name__}")
        ref = random_gpt(cfg, seed)
        _gpt_structure(mine, ref, what)
        mine.eval()
        idx, targets = gpt_inputs(cfg, batch, T, seed)
        shape = (batch, T, cfg.vocab_size)
        with torch.no_grad():
            logits, _ = _forward(mine, idx, None, what, shape)
            expected = ref(idx)[0]
            assert _close(expected, gpt_variant(ref, idx))
            if not _close(logits, expected):
                hint = _first_hint(logits, [(gpt_variant(ref, idx, **kw), h) for kw, h in GPT_MISTAKES])
                raise AssertionError(f"{what}: on idx of shape {tuple(idx.shape)} the logits differ from "
                                     f"llmbook.model.GPT's by up to {_max_error(logits, expected):.3g}{hint}")
        # the loss, and the gradients it gives every parameter
        mine.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        logits, loss = _forward(mine, idx, targets, what, shape)
        ref_logits, ref_loss = ref(idx, targets=targets)
        if not isinstance(loss, Tensor) or loss.shape != ():
            raise AssertionError(f"{what}: with targets, forward should return the loss as a 0-dim tensor, "
                                 f"got {loss!r:.60}")
        if not _close(loss.detach(), ref_loss.detach()):
            hint = _first_hint(loss.detach(), loss_mistakes(ref_logits.detach(), idx, targets))
            raise AssertionError(f"{what}: the loss is {loss.item():.4f}, llmbook.model.GPT's "
                                 f"{ref_loss.item():.4f}{hint}")
        loss.backward()
        ref_loss.backward()
        _compare_parameter_grads(mine, ref, what, "llmbook.model.GPT", atol=1e-5)
