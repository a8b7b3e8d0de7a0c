"""Checks for Chapter 9's exercises: the loss mask of an SFT example, and a LoRA linear layer by hand.

The mask is compared with ``llmbook.posttrain.masking.tokenize_example`` on
conversations of both templates (ChatML with a system message and two replies,
Alpaca with and without an input), some padded. A wrong answer is diagnosed by
*where* it differs: a label on a prompt token, on the newline after
``<|im_end|>``, on a pad; an end token without loss; labels shifted by one; a
special token spelled as ordinary text. The check says which.

The LoRA layer is compared with two implementations at once: the library's
``llmbook.posttrain.lora.LoRALinear`` and Hugging Face ``peft``, loaded with the
same adapter weights, on a lone ``nn.Linear`` and on tiny GPT-2 and Llama style
``GPT``s: outputs, gradients of A and B, merged weights, the trainable count.
Wrong outputs are compared with what the usual mistakes compute (the scale
r / alpha, no scale, no frozen path, ...) and the mistake is named.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from llmbook.bpe import Tokenizer, train_bpe
from llmbook.exercises import exercise
from llmbook.model import GPT
from llmbook.posttrain.lora import LoRALinear, apply_lora, count_trainable, lora_modules
from llmbook.posttrain.masking import IGNORE_INDEX, tokenize_example
from llmbook.posttrain.templates import ALL_SPECIAL_TOKENS, ALPACA, CHATML, ENDOFTEXT, Message, Template
from llmbook.posttrain.vocab import add_special_tokens

# ---------------------------------------------------------------------------
# 9.1 ids and labels of a conversation
# ---------------------------------------------------------------------------

# A few sentences to train the checks' tokenizer on: the words of the test conversations get tokens of their
# own, the rest is spelled in smaller pieces (a BPE of 300 tokens from this little text).
_TOKENIZER_TEXT = """\
You are a helpful assistant. Answer in one short sentence.
Name a primary colour. Red is a primary colour. Blue is one too.
What is the capital of France? The capital of France is Paris.
Translate to French: good morning. Bonjour. Good night: bonne nuit.
Repeat the line in capitals: to be or not to be. TO BE OR NOT TO BE.
Write a sentence that contains the word garden. The garden was quiet in the rain.
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. Below is an instruction that describes a task.
"""


@functools.lru_cache(maxsize=1)
def chat_tokenizer() -> Tokenizer:
    """A 300-token BPE trained on a few sentences, plus ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.

    Small, so the checks take milliseconds; its special tokens are single ids,
    as in the chapter's tokenizer.
    """
    vocab, merges = train_bpe(_TOKENIZER_TEXT, 300)
    return add_special_tokens(Tokenizer(vocab, merges, name="bpe-300"), ALL_SPECIAL_TOKENS)


def reference_mask(tokenizer: Tokenizer, messages: Sequence[Message], template: Template,
                   pad_to: int | None = None) -> tuple[list[int], list[int]]:
    """What Exercise 9.1 asks for, from the library: ``tokenize_example``, then padded with ``<|endoftext|>``."""
    example = tokenize_example(tokenizer, messages, template, max_len=1_000_000)
    ids, labels = list(example.input_ids), list(example.labels)
    if pad_to is not None:
        n = pad_to - len(ids)
        ids += [tokenizer.special_tokens[ENDOFTEXT]] * n
        labels += [IGNORE_INDEX] * n
    return ids, labels


_SYSTEM = Message("system", "You are a helpful assistant. Answer in one short sentence.")
_MASK_CASES = [  # (what, template, messages, pads: pad_to = length + pads, or None for no padding)
    ("one ChatML exchange", CHATML,
     [Message("user", "Name a primary colour."), Message("assistant", "Red is a primary colour.")], None),
    ("a ChatML conversation with a system message and two replies", CHATML,
     [_SYSTEM, Message("user", "What is the capital of France?"),
      Message("assistant", "The capital of France is Paris."),
      Message("user", "Translate to French: good night."), Message("assistant", "Bonne nuit.")], None),
    ("a ChatML exchange padded with 5 pads", CHATML,
     [Message("user", "Repeat the line in capitals: to be or not to be."),
      Message("assistant", "TO BE OR NOT TO BE.")], 5),
    ("an Alpaca instruction", ALPACA,
     [Message("user", "Name a primary colour."), Message("assistant", "Blue is one.")], None),
    ("an Alpaca instruction with an input, padded with 4 pads", ALPACA,
     [Message("user", "Translate to French."), Message("user", "good morning"),
      Message("assistant", "Bonjour.")], 4),
    ("an Alpaca exchange with a system message, padded with 1 pad", ALPACA,
     [Message("system", "Answer in one short sentence."),
      Message("user", "Write a sentence that contains the word garden."),
      Message("assistant", "The garden was quiet in the rain.")], 1),
]


def _as_ints(values, name: str, what: str) -> list[int]:
    """A list of ints from a list, tuple or tensor of integers; anything else is one clear line."""
    if isinstance(values, Tensor):
        values = values.tolist()
    try:
        if not isinstance(values, (list, tuple)) or any(isinstance(v, bool) for v in values):
            raise TypeError
        return [operator.index(v) for v in values]  # ints, and NumPy's integers
    except TypeError:
        raise AssertionError(f"mask_labels({what}) should return two lists of ints (input_ids, labels); its "
                             f"{name} are {type(values).__name__}: {values!r:.60}") from None


def _token(tokenizer: Tokenizer, i: int) -> str:
    return "-100" if i == IGNORE_INDEX else repr(tokenizer.decode([i]))


def _ids_hint(got: list[int], expected: list[int], n_real: int, pad_to: int | None, tokenizer: Tokenizer,
              messages: Sequence[Message], template: Template) -> str:
    special_ids = set(tokenizer.special_tokens.values())
    n_special = sum(i in special_ids for i in expected[:n_real])
    if sum(i in special_ids for i in got) < n_special:
        return ("; the template's special tokens are missing: encoded as text, '<|im_start|>' becomes several "
                "ordinary tokens. Encode the markup segments with tokenizer.encode(text, "
                "allowed_special=set(template.special_tokens)), so each is its single id, and the messages' "
                "content with tokenizer.encode_ordinary(text)")
    if pad_to is not None and len(got) == n_real and got == expected[:n_real]:
        return f"; pad the example to pad_to={pad_to} tokens with the id of {ENDOFTEXT!r}"
    if pad_to is not None and len(got) == len(expected) and got[:n_real] == expected[:n_real]:
        return f"; pad with the id of {ENDOFTEXT!r} ({tokenizer.special_tokens[ENDOFTEXT]})"
    allowed = set(template.special_tokens)
    whole = tokenizer.encode(template.apply_template(messages), allowed_special=allowed)
    if got[:n_real] == whole and whole != expected[:n_real]:
        return ("; those are the ids of the whole rendered string, encoded at once: encode each segment on its "
                "own (a merge could otherwise join the end of a prompt and the start of a response)")
    if pad_to is None and len(got) > n_real:
        return "; without pad_to there is no padding: return exactly the conversation's tokens"
    return ""


def _labels_hint(got: list[int], ids: list[int], expected: list[int], n_real: int, tokenizer: Tokenizer,
                 template: Template) -> str:
    end_id = tokenizer.special_tokens[template.end_token]
    if got[:-1] == expected[1:] or got[1:] == expected[:-1]:
        return ("; the labels are shifted by one position: label i belongs under input id i (the Hugging Face "
                "convention); the shift that makes position t predict token t + 1 happens once, in the "
                "collator or the model")
    odd = [t for t, (g, i) in enumerate(zip(got, ids, strict=True)) if g not in (i, IGNORE_INDEX)]
    if odd:
        t = odd[0]
        return (f"; at position {t} the label is {got[t]}, neither the token's own id {ids[t]} nor -100: "
                "a label is the id under it (it carries loss) or -100 (it does not)")
    pads = [t for t in range(n_real, len(got)) if got[t] != IGNORE_INDEX]
    if pads:
        return (f"; the padding carries loss (label {got[pads[0]]} at position {pads[0]}): every pad's label "
                "is -100, or the model learns to predict padding")
    extra = [t for t in range(n_real) if expected[t] == IGNORE_INDEX and got[t] != IGNORE_INDEX]
    missing = [t for t in range(n_real) if expected[t] != IGNORE_INDEX and got[t] == IGNORE_INDEX]
    missing_words = [t for t in missing if ids[t] != end_id]
    if missing_words and any(got[u] != IGNORE_INDEX for u in range(missing_words[0] + 1, n_real)):
        t = missing_words[0]
        return (f"; a reply's tokens have label -100 (first at position {t}, {_token(tokenizer, ids[t])}) "
                "while a later reply carries loss: every assistant message carries loss, not only the last one")
    lost_end = [t for t in missing if ids[t] == end_id]
    if lost_end:
        hint = (f"; the response's end token {template.end_token!r} (position {lost_end[0]}) has label -100: it "
                "must carry loss, or the model never learns to stop and rambles on")
        if template.end_token == ENDOFTEXT:
            hint += (f". It has the same id as the padding ({end_id}): mask the pads by position (after the "
                     "real tokens), not with labels[ids == pad_id] = -100, which masks the real end token too")
        return hint
    if extra:
        after_end = [t for t in extra if t > 0 and ids[t - 1] == end_id]
        if after_end and len(after_end) == len(extra):
            return (f"; the newline after {template.end_token!r} (position {after_end[0]}) carries loss: it "
                    "belongs to the template's markup before the next turn. Generation stops at the end "
                    "token, so the model never writes it: -100")
        t = extra[0]
        return (f"; labels on the prompt: position {t} ({_token(tokenizer, ids[t])}) is part of the prompt "
                "(system or user text, or the template's markup such as the assistant header), which the "
                "model is given at inference: label -100. Only the assistant's replies and their end tokens "
                "carry loss")
    if missing:
        t = missing[0]
        return (f"; the response token {_token(tokenizer, ids[t])} at position {t} has label -100: every "
                "token of every assistant message carries loss (label = its own id)")
    return ""


@exercise("9.1", solution="mask_labels")
def check_mask_labels(mask_labels):
    tokenizer = chat_tokenizer()
    for what, template, messages, pads in _MASK_CASES:
        n_real = len(reference_mask(tokenizer, messages, template)[0])
        pad_to = None if pads is None else n_real + pads
        expected_ids, expected_labels = reference_mask(tokenizer, messages, template, pad_to)
        what = f"{what}{'' if pad_to is None else f', pad_to={pad_to}'}"
        try:
            result = mask_labels(tokenizer, list(messages), template, pad_to)
        except ValueError as exc:  # the tokenizer's refusal of special-token text: name where it comes from
            if "special token" not in str(exc):
                raise
            raise AssertionError(
                f"mask_labels({what}) raised ValueError: {str(exc).splitlines()[0]} The template's markup holds "
                "its special tokens on purpose: encode markup segments with tokenizer.encode(text, "
                "allowed_special=set(template.special_tokens)), content with tokenizer.encode_ordinary(text)"
            ) from None
        if result is None:
            raise AssertionError("mask_labels returned None; did you forget `return input_ids, labels`?")
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise AssertionError(f"mask_labels({what}) should return a pair (input_ids, labels), got "
                                 f"{type(result).__name__}: {result!r:.60}")
        ids, labels = _as_ints(result[0], "input_ids", what), _as_ints(result[1], "labels", what)
        if ids != expected_ids:
            t = next((t for t, (a, b) in enumerate(zip(ids, expected_ids, strict=False)) if a != b),
                     min(len(ids), len(expected_ids)))
            where = (f"at position {t}: {_token(tokenizer, ids[t]) if t < len(ids) else 'nothing'} instead of "
                     f"{_token(tokenizer, expected_ids[t]) if t < len(expected_ids) else 'nothing'}")
            hint = _ids_hint(ids, expected_ids, n_real, pad_to, tokenizer, messages, template)
            raise AssertionError(f"mask_labels({what}): input_ids differ from llmbook's tokenize_example "
                                 f"({len(ids)} ids, expected {len(expected_ids)}; first difference {where}){hint}")
        if len(labels) != len(ids):
            raise AssertionError(f"mask_labels({what}): {len(labels)} labels for {len(ids)} input ids; there is "
                                 "one label per input id")
        if labels != expected_labels:
            t = next(t for t, (a, b) in enumerate(zip(labels, expected_labels, strict=True)) if a != b)
            hint = _labels_hint(labels, ids, expected_labels, n_real, tokenizer, template)
            raise AssertionError(f"mask_labels({what}): labels differ from llmbook's tokenize_example at "
                                 f"position {t} (token {_token(tokenizer, ids[t])}: label {labels[t]}, expected "
                                 f"{expected_labels[t]}){hint}")


# ---------------------------------------------------------------------------
# 9.2 a LoRA linear layer, and applying it to a GPT
# ---------------------------------------------------------------------------

R, ALPHA = 4, 8.0  # scale alpha / r = 2; the mistaken r / alpha = 0.5 and "no scale" = 1 all differ
LORA_TARGETS = {"gpt-tiny": ("qkv", "proj", "fc"), "llama-tiny": ("qkv", "proj", "gate", "up", "down")}


def _close(a: Tensor, b: Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4))


def _max_error(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("inf")


def _tiny(preset: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset(preset).eval()


def _adapter_weights(r: int, n_in: int, n_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """Nonzero A (r, in) and B (out, r): B's zero init would hide every mistake in B's path."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g) * 0.1, torch.randn(n_out, r, generator=g) * 0.1


def _set(module: nn.Module, A: Tensor, B: Tensor) -> None:
    with torch.no_grad():
        module.lora_A.copy_(A)
        module.lora_B.copy_(B)


def _parts(module, name: str, r: int) -> tuple[nn.Linear, Tensor, Tensor]:
    """The reader's module's base linear, A and B, with one clear line when they are missing or misshapen."""
    base = getattr(module, "base", None)
    A, B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(base, nn.Linear) or not isinstance(A, nn.Parameter) or not isinstance(B, nn.Parameter):
        raise AssertionError(
            f"{name} ({type(module).__name__}) should keep the wrapped layer as self.base (an nn.Linear) and the "
            f"adapter as two nn.Parameters self.lora_A and self.lora_B; found base={type(base).__name__}, "
            f"lora_A={type(A).__name__}, lora_B={type(B).__name__}")
    n_in, n_out = base.in_features, base.out_features
    if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
        hint = ""
        if tuple(A.shape) == (n_in, r) and tuple(B.shape) == (r, n_out):
            hint = ("; A and B are transposed: like nn.Linear's weight (out, in), A projects in -> r and is "
                    "(r, in), B projects r -> out and is (out, r), as peft's lora_A.weight and lora_B.weight")
        raise AssertionError(f"{name}: lora_A has shape {tuple(A.shape)} and lora_B {tuple(B.shape)}; for a "
                             f"linear of {n_in} -> {n_out} with r={r} they should be ({r}, {n_in}) and "
                             f"({n_out}, {r}){hint}")
    return base, A, B


def _check_init(module, name: str, r: int) -> None:
    base, A, B = _parts(module, name, r)
    frozen = [p for p in ("weight", "bias") if getattr(base, p, None) is not None and getattr(base, p).requires_grad]
    if frozen:
        raise AssertionError(f"{name}: base.{frozen[0]} still requires a gradient: freeze the wrapped layer "
                             "(p.requires_grad_(False) for its weight and bias); only lora_A and lora_B train")
    if not (A.requires_grad and B.requires_grad):
        raise AssertionError(f"{name}: lora_A and lora_B must be trainable (requires_grad=True)")
    if torch.count_nonzero(B) != 0:
        raise AssertionError(f"{name}: lora_B is not zero after __init__: initialize B with zeros, so that "
                             "B A = 0 and the adapted model computes exactly what the base model did (a random "
                             "B changes the pretrained model before any training)")
    bound = 1 / math.sqrt(base.in_features)
    if torch.count_nonzero(A) == 0:
        raise AssertionError(f"{name}: lora_A is zero too: then dL/dB (which needs A) and dL/dA (which needs B) "
                             "are both zero forever. Initialize A randomly: nn.init.kaiming_uniform_(A, "
                             "a=math.sqrt(5)), as peft does")
    if A.abs().max() > bound * (1 + 1e-6) or A.std() < bound / 3:
        raise AssertionError(f"{name}: lora_A should be initialized as peft does, nn.init.kaiming_uniform_(A, "
                             f"a=math.sqrt(5)): uniform in ±1/sqrt(in) = ±{bound:.3f}; found values up to "
                             f"{A.abs().max().item():.3f} with standard deviation {A.std().item():.3f}")


def _forward_hint(got: Tensor, base: nn.Linear, x: Tensor, A: Tensor, B: Tensor, r: int, alpha: float) -> str:
    with torch.no_grad():
        low_rank = x @ A.T @ B.T
        frozen = base(x)
        no_bias = x @ base.weight.T
        candidates = [
            (frozen + low_rank * r / alpha, "the low-rank path is scaled by r / alpha: the scale is alpha / r"),
            (frozen + low_rank, "the low-rank path is not scaled: multiply it by alpha / r"),
            (frozen + low_rank * alpha, "the low-rank path is scaled by alpha: the scale is alpha / r"),
            (frozen + low_rank / r, "the low-rank path is scaled by 1 / r: the scale is alpha / r"),
            (low_rank * alpha / r, "only the low-rank path: add the frozen layer's output, base(x) + ..."),
            (frozen, "the output is base(x) alone: add the low-rank path, scale · x Aᵀ Bᵀ"),
            (no_bias + low_rank * alpha / r, "the base layer's bias is missing: call self.base(x), which adds it"),
            (frozen + 2 * low_rank * alpha / r, "the low-rank path is added twice"),
        ]
    return next((f"; {h}" for wrong, h in candidates if _close(got, wrong)), "")


def _merge_or_unmerge(module: nn.Module, method: str, name: str) -> None:
    """Call ``module.merge()`` or ``unmerge()``; autograd's complaint about changing a weight becomes the hint."""
    try:
        getattr(module, method)()
    except (RuntimeError, TypeError, ValueError) as exc:
        if "leaf" in str(exc) or "requires grad" in str(exc):
            raise AssertionError(f"{name}: {method}() failed with {type(exc).__name__}: {str(exc).splitlines()[0]} "
                                 f"Change the weight in place under torch.no_grad() (decorate {method} with "
                                 "@torch.no_grad()): the weight update is not part of any computation to "
                                 "differentiate") from None
        raise


def _check_module(cls, seed: int) -> None:
    """One LoRA layer on a lone nn.Linear: forward, gradients, merge and unmerge, dropout; against LoRALinear."""
    n_in, n_out = 24, 40
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out)
    name = f"{cls.__name__}(nn.Linear({n_in}, {n_out}), r={R}, alpha={ALPHA})"
    mine = cls(copy.deepcopy(linear), r=R, alpha=ALPHA, dropout=0.0)
    reference = LoRALinear(copy.deepcopy(linear), r=R, alpha=ALPHA, dropout=0.0)
    _check_init(mine, name, R)
    A, B = _adapter_weights(R, n_in, n_out, seed)
    _set(mine, A, B)
    _set(reference, A, B)
    mine.eval()
    g = torch.Generator().manual_seed(seed + 1)
    for shape in ((2, 5, n_in), (3, n_in)):
        x = torch.randn(shape, generator=g)
        got = mine(x)
        if not isinstance(got, Tensor) or got.shape != (*shape[:-1], n_out):
            raise AssertionError(f"{name} on x of shape {shape} returned {type(got).__name__} "
                                 f"{tuple(getattr(got, 'shape', ()))}; expected a tensor of shape "
                                 f"{(*shape[:-1], n_out)}")
        expected = reference(x)
        if not _close(got, expected):
            hint = _forward_hint(got.detach(), linear, x, A, B, R, ALPHA)
            raise AssertionError(f"{name}: on x of shape {shape} the output differs from llmbook's LoRALinear "
                                 f"(the same A and B) by up to {_max_error(got, expected):.3g}{hint}")
        # gradients of A and B (and none for the frozen base)
        w = torch.randn(expected.shape, generator=g)
        mine.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        (got * w).sum().backward()
        (expected * w).sum().backward()
        for part in ("lora_A", "lora_B"):
            mine_grad, ref_grad = getattr(mine, part).grad, getattr(reference, part).grad
            if mine_grad is None or not _close(mine_grad, ref_grad, atol=1e-4):
                by = "" if mine_grad is None else f" by up to {_max_error(mine_grad, ref_grad):.3g}"
                raise AssertionError(f"{name}: the gradient of {part} differs from llmbook's LoRALinear{by}: "
                                     f"does forward use self.{part} directly (not .data, .detach() or a copy)?")
        if mine.base.weight.grad is not None:
            raise AssertionError(f"{name}: base.weight got a gradient: the wrapped layer must be frozen")

    # merge: W' = W + (alpha / r) B A, and forward then adds nothing more
    x = torch.randn(4, n_in, generator=g)
    with torch.no_grad():
        before = reference(x)
        W = linear.weight.detach().clone()
        reference.merge()
        merged_W = reference.base.weight.detach().clone()
    _merge_or_unmerge(mine, "merge", name)  # it may return self or None
    got_W = mine.base.weight.detach()
    if not _close(got_W, merged_W):
        delta = B @ A
        hint = next((f"; {h}" for wrong, h in [
            (W, "merge() left base.weight unchanged: add ΔW into it in place (self.base.weight += ...)"),
            (W + delta, "merge() added B A without the scale: ΔW = (alpha / r) · B A"),
            (W + delta * R / ALPHA, "merge() scaled B A by r / alpha: ΔW = (alpha / r) · B A"),
            (W + (A.T @ B.T).T if A.shape[0] == B.shape[1] else W, "ΔW = (alpha / r) · B A has the shape of W"),
        ] if _close(got_W, wrong)), "")
        raise AssertionError(f"{name}: after merge() base.weight differs from W + (alpha / r) B A by up to "
                             f"{_max_error(got_W, merged_W):.3g}{hint}")
    if mine.base.weight.requires_grad:
        raise AssertionError(f"{name}: after merge() base.weight requires a gradient: change it in place under "
                             "torch.no_grad() (decorate merge and unmerge with @torch.no_grad())")
    with torch.no_grad():
        got = mine(x)
    if not _close(got, before):
        hint = ("; while merged, forward must not add the low-rank path again: the merged weight already holds it "
                "(keep a flag, self.merged)" if _close(got, before + (x @ A.T @ B.T) * ALPHA / R) else "")
        raise AssertionError(f"{name}: after merge() the output changed by up to {_max_error(got, before):.3g}; "
                             f"merging must not change what the layer computes{hint}")
    _merge_or_unmerge(mine, "merge", name)
    if not _close(mine.base.weight.detach(), merged_W):
        raise AssertionError(f"{name}: a second merge() changed base.weight again: it must do nothing when the "
                             "adapter is already merged (keep a flag, self.merged)")
    # unmerge: W back, up to float rounding
    _merge_or_unmerge(mine, "unmerge", name)
    got_W = mine.base.weight.detach()
    if _max_error(got_W, W) > 1e-6:
        hint = next((f"; {h}" for wrong, h in [
            (merged_W, "unmerge() left the merged weight: subtract ΔW = (alpha / r) · B A again"),
            (merged_W - B @ A, "unmerge() subtracted B A without the scale alpha / r"),
            (W - (merged_W - W), "unmerge() subtracted ΔW twice"),
        ] if _close(got_W, wrong)), "")
        raise AssertionError(f"{name}: after unmerge() base.weight differs from the original W by up to "
                             f"{_max_error(got_W, W):.3g}; it must be restored (up to float rounding){hint}")
    with torch.no_grad():
        got = mine(x)
    if not _close(got, before):
        raise AssertionError(f"{name}: after merge() and unmerge() the output differs from before by up to "
                             f"{_max_error(got, before):.3g}: once unmerged, forward adds the low-rank path again")
    _merge_or_unmerge(mine, "unmerge", name)
    if _max_error(mine.base.weight.detach(), W) > 1e-6:
        raise AssertionError(f"{name}: unmerge() of a layer that is not merged changed base.weight: it must do "
                             "nothing then")

    # dropout on the low-rank path's input, in training mode only
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out)
    mine = cls(copy.deepcopy(linear), r=R, alpha=ALPHA, dropout=0.25)
    reference = LoRALinear(copy.deepcopy(linear), r=R, alpha=ALPHA, dropout=0.25)
    _set(mine, A, B)
    _set(reference, A, B)
    x = torch.randn(6, n_in, generator=g)
    for training in (True, False):
        mine.train(training)
        reference.train(training)
        torch.manual_seed(seed + 2)
        got = mine(x)
        torch.manual_seed(seed + 2)
        expected = reference(x)
        if not _close(got, expected):
            mode = "training" if training else "eval"
            raise AssertionError(
                f"{name.replace(')', ', dropout=0.25)')} in {mode} mode differs from llmbook's LoRALinear (and "
                f"peft) by up to {_max_error(got, expected):.3g}: dropout applies to the low-rank path's input "
                "only, base(x) + scale · dropout(x) Aᵀ Bᵀ, with one nn.Dropout(p) call per forward (active in "
                "training mode, off in eval mode)")


def _load_same(model: nn.Module, names: Sequence[str], seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Random nonzero adapter weights into the reader's modules ``names``; returned to load them into peft too."""
    weights = {}
    for i, name in enumerate(sorted(names)):
        module = model.get_submodule(name)
        A, B = _adapter_weights(R, module.base.in_features, module.base.out_features, seed + i)
        _set(module, A, B)
        weights[name] = (A, B)
    return weights


def _peft_model(base: GPT, targets: Sequence[str], weights: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    import peft  # imported here: a few seconds, and only this check needs it

    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets))
    return _load_peft(peft.get_peft_model(copy.deepcopy(base), config), weights).eval()


def _load_peft(theirs: nn.Module, weights: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    with torch.no_grad():
        for name, (A, B) in weights.items():
            theirs.get_submodule(f"base_model.model.{name}.lora_A.default").weight.copy_(A)
            theirs.get_submodule(f"base_model.model.{name}.lora_B.default").weight.copy_(B)
    return theirs


def _check_model(my_apply_lora, preset: str, seed: int) -> None:
    """Apply the reader's LoRA to a tiny GPT; compare names, freezing, counts, outputs, gradients, merge with peft."""
    targets = LORA_TARGETS[preset]
    base = _tiny(preset, seed)
    what = f"my_apply_lora(GPT.from_preset({preset!r}), targets={targets}, r={R}, alpha={ALPHA})"
    expected_names = set(lora_modules(apply_lora(copy.deepcopy(base), targets, r=R, alpha=ALPHA)))
    model = copy.deepcopy(base)
    result = my_apply_lora(model, targets, r=R, alpha=ALPHA)
    if result is None:
        raise AssertionError(f"{what} returned None: return the model (changed in place), as peft's "
                             "get_peft_model and llmbook's apply_lora do")
    if result is not model:
        if not isinstance(result, nn.Module):
            raise AssertionError(f"{what} should return the model, got {type(result).__name__}: {result!r:.60}")
        model = result
    still_linear = sorted(n for n in expected_names if type(model.get_submodule(n)) is nn.Linear)
    if still_linear:
        raise AssertionError(f"{what}: {still_linear[0]} is still a plain nn.Linear; every linear whose name is a "
                             "target, or ends with '.' + a target, gets a LoRA layer ('proj' matches both "
                             "blocks.0.attn.proj and blocks.0.mlp.proj); replace it on its parent with setattr")
    cls = type(model.get_submodule(sorted(expected_names)[0]))
    replaced = {n for n, m in model.named_modules() if isinstance(m, cls)}
    if replaced != expected_names:
        extra, missing = sorted(replaced - expected_names), sorted(expected_names - replaced)
        raise AssertionError(f"{what} adapted {sorted(replaced)[:3]}...; expected {sorted(expected_names)[:3]}... "
                             f"(missing {missing[:3]}, unexpected {extra[:3]}). A target matches a module whose "
                             "full name is the target or ends with '.' + the target")
    for name in sorted(expected_names):
        _check_init(model.get_submodule(name), f"{what}: {name}", R)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    wrong = [n for n in trainable if not n.endswith((".lora_A", ".lora_B"))]
    if wrong:
        raise AssertionError(f"{what}: {len(wrong)} parameters outside the adapters still train ({wrong[0]}, ...): "
                             "freeze every parameter of the model (requires_grad_(False)) before adding the "
                             "adapters, so only lora_A and lora_B train")
    theirs = _peft_model(base, targets, {})
    count, count_peft = count_trainable(model), theirs.get_nb_trainable_parameters()
    if tuple(count) != tuple(count_peft):
        raise AssertionError(f"{what}: {count.trainable:,} trainable of {count.total:,} parameters; peft has "
                             f"{count_peft[0]:,} of {count_peft[1]:,} (r · (in + out) per adapted linear)")
    x = torch.randint(0, base.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if not torch.equal(model(x[:, :-1])[0], base(x[:, :-1])[0]):
            raise AssertionError(f"{what}: at initialization the adapted model's logits differ from the base "
                                 "model's; with B = 0 they must be exactly equal")

    # the same adapter weights into the reader's model and peft's: outputs, gradients, merged weights
    weights = _load_same(model, expected_names, seed + 100)
    _load_peft(theirs, weights)
    model.eval()
    logits, loss = model(x[:, :-1], x[:, 1:])
    logits_p, loss_p = theirs(x[:, :-1], x[:, 1:])
    if not _close(logits, logits_p):
        raise AssertionError(f"{what}: with the same A and B the logits differ from peft's by up to "
                             f"{_max_error(logits, logits_p):.3g}")
    model.zero_grad(set_to_none=True)
    loss.backward()
    loss_p.backward()
    for name in sorted(expected_names):
        for part in ("lora_A", "lora_B"):
            grad = getattr(model.get_submodule(name), part).grad
            grad_p = theirs.get_submodule(f"base_model.model.{name}.{part}.default").weight.grad
            if grad is None or not _close(grad, grad_p, atol=1e-6):
                raise AssertionError(f"{what}: the gradient of {name}.{part} differs from peft's"
                                     f"{'' if grad is None else f' by up to {_max_error(grad, grad_p):.3g}'}")
    with torch.no_grad():
        for name in expected_names:
            model.get_submodule(name).merge()
        merged_p = theirs.merge_and_unload().state_dict()
        for name in sorted(expected_names):
            got, want = model.get_submodule(name).base.weight, merged_p[f"{name}.weight"]
            if not _close(got, want, atol=1e-6):
                raise AssertionError(f"{what}: after merge() {name}.base.weight differs from peft's "
                                     f"merge_and_unload by up to {_max_error(got, want):.3g}")
        if not _close(model(x[:, :-1])[0], logits, atol=1e-5):
            raise AssertionError(f"{what}: merging every adapter changed the logits")


def _lora_class(my_apply_lora):
    """The reader's LoRA class, found where ``my_apply_lora`` put it (so the check takes one function)."""
    model = _tiny("gpt-tiny")
    result = my_apply_lora(model, ("qkv",), r=R, alpha=ALPHA)
    if result is None:
        raise AssertionError("my_apply_lora returned None: return the model (changed in place)")
    if not isinstance(result, nn.Module):
        raise AssertionError(f"my_apply_lora should return the model, got {type(result).__name__}: {result!r:.60}")
    module = result.get_submodule("blocks.0.attn.qkv")
    if type(module) is nn.Linear:
        raise AssertionError("my_apply_lora(model, ('qkv',), ...) left blocks.0.attn.qkv a plain nn.Linear: "
                             "replace every linear whose name ends with '.qkv' by MyLoRALinear(linear, r, alpha, "
                             "dropout) (setattr on its parent module)")
    return type(module)


@exercise("9.2", solution="my_apply_lora")
def check_my_apply_lora(my_apply_lora):
    cls = _lora_class(my_apply_lora)
    _check_module(cls, seed=9)
    for seed, preset in enumerate(LORA_TARGETS):
        _check_model(my_apply_lora, preset, seed)
