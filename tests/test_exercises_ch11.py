"""Chapter 11's exercise checks: each passes the solution, reports the starter as not attempted, names typical mistakes.

The solutions below are those of solutions/11_evaluation_inference.md,
written out again with one typical mistake switched on by name; the check must
name each in a one-line message. The references the checks compare with are
proven equal to the libraries here: lm-eval's own ``process_results`` for
multiple choice, and ``torch.quantize_per_channel`` for the int8 codes. Tiny
inputs and ~100k-parameter models: seconds.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import passes_and_starter_not_attempted as _passes_and_starter_not_attempted
from exercise_helpers import starter as _starter

from llmbook.exercises import ch11
from llmbook.generate import generate

# ---------------------------------------------------------------------------------------------- references


def _lm_eval_multiple_choice(lls, choices, gold):
    """lm-eval's own ConfigurableTask.process_results for a multiple_choice doc (its code, our inputs)."""
    from lm_eval.api.task import ConfigurableTask

    task = SimpleNamespace(
        config=SimpleNamespace(process_results=None), OUTPUT_TYPE="multiple_choice",
        _metric_fn_list={"acc": None, "acc_norm": None}, multiple_input=False, multiple_target=False,
        doc_to_choice=lambda doc: list(choices), doc_to_target=lambda doc: gold,
    )
    return ConfigurableTask.process_results(task, {}, [(ll, False) for ll in lls])


def test_mc_reference_is_lm_eval():
    """On every item of the check (ties, non-ASCII choices), our pred/pred_norm give lm-eval's acc and acc_norm."""
    for case in ch11.mc_cases():
        pred, pred_norm = ch11.reference_mc(case.loglikelihoods, case.choices)
        for gold in range(len(case.choices)):
            got = _lm_eval_multiple_choice(case.loglikelihoods, case.choices, gold)
            assert got == {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}, (case, gold)


def test_mc_mistakes_are_all_distinguishable():
    """Each mistake changes some answer of the check's items, and no two mistakes give the same answers."""
    cases = ch11.mc_cases()
    want = [ch11.reference_mc(c.loglikelihoods, c.choices) for c in cases]
    seen = [want]
    for mistake in ch11.MC_MISTAKES:
        got = [ch11._mc_mistake(np.array(c.loglikelihoods), c.choices, c.tokens, mistake) for c in cases]
        assert got not in seen, mistake
        seen.append(got)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated in torch, still exact
def test_int8_reference_is_torch_quantize_per_channel():
    w = ch11.int8_weight()
    scales = ch11.reference_scales(w)
    for s in (scales, scales / 2):
        q = torch.quantize_per_channel(w, s.flatten().double(), torch.zeros(w.shape[0], dtype=torch.long), axis=0,
                                       dtype=torch.qint8)
        torch_codes = torch.clamp(q.int_repr(), -127, 127)  # torch's range is -128..127; symmetric stops at -127
        assert torch.equal(ch11.reference_quantize(w, s), torch_codes)
        assert torch.allclose(ch11.reference_dequantize(ch11.reference_quantize(w, scales), scales),
                              torch.quantize_per_channel(w, scales.flatten().double(),
                                                         torch.zeros(w.shape[0], dtype=torch.long), 0,
                                                         torch.qint8).dequantize(), atol=1e-7)


def test_reference_rule_samples_from_p():
    """The check's reference rule, by its own profile and by 20,000 seeded samples (chi-square), outputs p."""
    for p, q in ch11.spec_cases():
        profile = ch11._profile(ch11.reference_accept, p, q)
        assert torch.allclose(ch11.output_distribution(profile, q), p, atol=2 / ch11.GRID)
        counts = ch11.speculative_samples(ch11.reference_accept, p, q, n=20_000, seed=1)
        assert ch11.chi_square_pvalue(counts, p) > 0.001
    p, q = ch11.spec_cases()[0]  # and a wrong rule fails the statistical test
    counts = ch11.speculative_samples(functools.partial(_accept, mistake="from_p"), p, q, n=20_000, seed=1)
    assert ch11.chi_square_pvalue(counts, p) < 1e-6


def test_decode_cases_exercise_every_feature():
    for preset in ("gpt-tiny", "llama-tiny"):
        model = ch11.tiny_decoder(preset)
        cases = ch11.decode_cases(model)
        stopped = [c for c in cases if c.stop_tokens]
        assert stopped and all(len(c.want) < c.max_new_tokens and c.want[-1] in c.stop_tokens for c in stopped)
        limited = [c for c in cases if c.vocab_size]
        assert limited and all(max(c.want) < c.vocab_size for c in limited)
        unmasked = generate(model, [limited[0].prompt], limited[0].max_new_tokens, temperature=0)[0]
        assert max(unmasked) >= limited[0].vocab_size  # the mask matters for this case
        assert any(len(c.prompt) + c.max_new_tokens == model.cfg.context_length for c in cases)
        assert all(len(set(c.want)) > 3 for c in cases)  # no degenerate repetition


# ---------------------------------------------------------------------------------------------- 11.1


def _mc(loglikelihoods, choices, continuation_tokens, mistake=None):
    lls = np.array(loglikelihoods, dtype=float)
    n = np.array([len(c) for c in choices], dtype=float)
    if mistake == "tokens":
        n = np.array([len(t) for t in continuation_tokens], dtype=float)
    elif mistake == "delimiter":
        n = np.array([len(" " + c) for c in choices], dtype=float)
    elif mistake == "bytes":
        n = np.array([len(c.encode()) for c in choices], dtype=float)
    best = np.argmin if mistake == "argmin" else np.argmax
    pred = int(best(lls))
    if mistake == "no_norm":
        return pred, pred
    if mistake == "mean_prob":
        return pred, int(np.argmax(np.exp(lls) / n))
    if mistake == "ties_last":  # max(range, key) with >= : the last of equal scores
        pick = lambda s: max(range(len(s)), key=lambda i: (s[i], i))  # noqa: E731
        return pick(lls), pick(lls / n)
    return pred, int(best(lls / n))


def test_mc_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch11.check_mc_predictions, "11.1", (_mc,), (_starter,))


@pytest.mark.parametrize(("mistake", "hint"), [
    ("argmin", "argmin instead of argmax"),
    ("no_norm", "the normalization is missing"),
    ("tokens", "normalized by the number of tokens"),
    ("mean_prob", "normalized the probability exp(ll) / len"),
    ("delimiter", "without the delimiter"),
    ("bytes", "that is lm-eval's acc_bytes"),
    ("ties_last", "np.argmax (and lm-eval) picks the first"),
])
def test_mc_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch11.check_mc_predictions, functools.partial(_mc, mistake=mistake))
    assert hint in message, message


# ---------------------------------------------------------------------------------------------- 11.2


def _scales(w, mistake=None):
    if mistake == "per_tensor":
        return w.abs().max() / 127
    if mistake == "per_tensor_broadcast":
        return (w.abs().max() / 127).expand(w.shape[0], 1)
    if mistake == "wrong_axis":
        return w.abs().amax(dim=0, keepdim=True) / 127
    if mistake == "asymmetric":
        return (w.amax(dim=1, keepdim=True) - w.amin(dim=1, keepdim=True)) / 255
    absmax = w.abs().amax(dim=1, keepdim=True)
    if mistake == "zero_row":
        return absmax / 127
    absmax = absmax.clamp(min=1e-8)
    return absmax if mistake == "max_not_over_127" else absmax / 127


def _quantize(w, scales, mistake=None):
    x = w / scales
    if mistake == "truncation":
        return x.to(torch.int8)
    if mistake == "no_clamp":
        return torch.round(x).to(torch.int8)
    if mistake == "no_clamp_int32":
        return torch.round(x).to(torch.int32)
    if mistake == "clamp_128":
        return torch.clamp(torch.round(x), -128, 127).to(torch.int8)
    if mistake == "zero_point":  # an asymmetric scheme's offset with the symmetric scale
        return torch.clamp(torch.round(x) + 3, -127, 127).to(torch.int8)
    return torch.clamp(torch.round(x), -127, 127).to(torch.int8)


def _dequantize(q, scales, mistake=None):
    return q.float() / scales if mistake == "divide" else q.float() * scales


def test_int8_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch11.check_int8, "11.2", (_scales, _quantize, _dequantize),
                                      (_starter, _starter, _starter))


@pytest.mark.parametrize(("mistake", "hint"), [
    ("per_tensor", "one scale for the whole tensor"),
    ("per_tensor_broadcast", "one scale for the whole tensor"),
    ("wrong_axis", "one scale per input channel"),
    ("asymmetric", "is asymmetric quantization's"),
    ("max_not_over_127", "divide it by 127"),
    ("zero_row", "a row of zeros (row 3)"),
])
def test_int8_scale_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch11.check_int8, functools.partial(_scales, mistake=mistake), _quantize, _dequantize)
    assert hint in message, message


@pytest.mark.parametrize(("mistake", "hint"), [
    ("truncation", "truncated towards zero"),
    ("no_clamp", "no clamping"),
    ("no_clamp_int32", "return int8 codes"),
    ("clamp_128", "clamped to -128..127"),
    ("zero_point", "has no zero point"),
])
def test_int8_quantize_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch11.check_int8, _scales, functools.partial(_quantize, mistake=mistake), _dequantize)
    assert hint in message, message


def test_int8_dequantize_divided_is_named():
    message = _one_line_error(ch11.check_int8, _scales, _quantize, functools.partial(_dequantize, mistake="divide"))
    assert "divides by the scale" in message, message


# ---------------------------------------------------------------------------------------------- 11.3


def _accept(p, q, x, r, u, mistake=None):
    if mistake == "deterministic":
        if p[x] >= q[x]:
            return True, x
    elif mistake == "ratio_upside_down":
        if r < min(1.0, float(q[x] / p[x]) if p[x] > 0 else 1.0):
            return True, x
    elif r < min(1.0, float(p[x] / q[x])):
        return True, x
    residual = {"from_p": p, "from_q": q, "reversed": torch.clamp(q - p, min=0)}.get(mistake,
                                                                                  torch.clamp(p - q, min=0))
    if mistake not in ("unnormalized", "unnormalized_unclamped"):
        residual = residual / residual.sum()
    y = int(torch.searchsorted(residual.cumsum(0), torch.tensor([u], dtype=residual.dtype), right=True)[0])
    return False, y if mistake == "unnormalized_unclamped" else min(y, len(p) - 1)


def test_speculative_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch11.check_speculative_accept, "11.3", (_accept,), (_starter,))


@pytest.mark.parametrize(("mistake", "hint"), [
    ("deterministic", "you accept exactly when p[x] >= q[x]"),
    ("ratio_upside_down", "the ratio is upside down"),
    ("from_p", "on rejection you resample from p"),
    ("from_q", "on rejection you resample from q"),
    ("reversed", "the residual is reversed"),
    ("unnormalized", "the residual is not normalized"),
    ("unnormalized_unclamped", "the residual was not normalized"),
])
def test_speculative_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch11.check_speculative_accept, functools.partial(_accept, mistake=mistake))
    assert hint in message, message


def test_speculative_accepting_a_different_token_is_named():
    def rule(p, q, x, r, u):
        accepted, y = _accept(p, q, x, r, u)
        return accepted, (x + 1) % len(p) if accepted else y

    assert "an accepted draft token is the output" in _one_line_error(ch11.check_speculative_accept, rule)


# ---------------------------------------------------------------------------------------------- 11.4


def _greedy(model, prompt, max_new_tokens, stop_tokens=(), vocab_size=None, mistake=None):
    """The solution's greedy_decode, with one typical mistake switched on by name."""
    prompt = list(prompt)
    if not prompt and mistake != "no_empty_check":
        raise ValueError("empty prompt")
    total = len(prompt) + max_new_tokens
    limit = model.cfg.context_length
    too_long = total >= limit if mistake == "context_off_by_one" else total > limit
    if too_long and mistake != "late_context_check":
        raise ValueError(f"{total} tokens do not fit in the context of {limit}")
    if max_new_tokens == 0:
        return []
    size = max_new_tokens if mistake == "cache_too_small" else total  # forgot the prompt's tokens
    out = []
    with torch.no_grad():
        if mistake == "no_cache":
            caches = None
        elif mistake == "late_context_check":  # no check, caches for the whole context: fails mid-decoding
            caches = model.new_caches(1)
        else:
            caches = model.new_caches(1, size)
        logits, _ = model(torch.tensor([prompt]), caches=caches)
        n = max_new_tokens + 1 if mistake == "one_too_many" else max_new_tokens
        while True:
            scores = logits[0, -1].clone()
            if vocab_size is not None and mistake != "no_vocab_mask":
                scores[vocab_size:] = float("-inf")
            token = int(scores.argmax())
            if token in stop_tokens and mistake == "stop_excluded":
                break
            out.append(token)
            if (token in stop_tokens and mistake != "no_stop") or len(out) == n:
                break
            if mistake == "no_cache":
                logits, _ = model(torch.tensor([prompt + out]))
            elif mistake == "whole_sequence":
                logits, _ = model(torch.tensor([prompt + out]), caches=caches)
            elif mistake == "position_off_by_one":
                position = caches[0].length + 1
                logits, _ = model(torch.tensor([[token]]), caches=caches, positions=torch.tensor([position]))
            else:
                logits, _ = model(torch.tensor([[token]]), caches=caches)
    return out


def test_greedy_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch11.check_greedy_decode, "11.4", (_greedy,), (_starter,))


def test_greedy_check_restores_the_thread_count():
    threads = torch.get_num_threads()
    ch11.check_greedy_decode(_starter)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_cache", "no KV cache: every step runs the model over the whole sequence again"),
    ("whole_sequence", "with the KV cache feed only the new token"),
    ("position_off_by_one", "the new token's position is the cache length"),
    ("cache_too_small", "the cache is too small"),
    ("no_stop", "it went on after writing stop token"),
    ("stop_excluded", "the stop token"),
    ("one_too_many", "write max_new_tokens new tokens"),
    ("no_vocab_mask", ">= vocab_size"),
    ("context_off_by_one", "exactly fills the context"),
    ("late_context_check", "returned without an error"),
    ("no_empty_check", "with an empty prompt raised RuntimeError"),
])
def test_greedy_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch11.check_greedy_decode, functools.partial(_greedy, mistake=mistake))
    assert hint in message, message


def test_greedy_refusal_after_running_the_model_is_named():
    def late(model, prompt, max_new_tokens, **kwargs):
        if prompt:
            model(torch.tensor([prompt[:1]]))  # runs the model first
        return _greedy(model, prompt, max_new_tokens, **kwargs)

    assert "only after 1 model call" in _one_line_error(ch11.check_greedy_decode, late)


def test_greedy_right_tokens_with_extra_calls_are_caught():
    """Tokens equal to generate's, but the prompt prefilled twice into a second cache: too much work."""
    def wasteful(model, prompt, max_new_tokens, **kwargs):
        if prompt and len(prompt) + max_new_tokens <= model.cfg.context_length:
            with torch.no_grad():
                model(torch.tensor([prompt]), caches=model.new_caches(1, len(prompt)))
        return _greedy(model, prompt, max_new_tokens, **kwargs)

    message = _one_line_error(ch11.check_greedy_decode, wasteful)
    assert "prefilled a second set of empty caches" in message, message


@pytest.mark.parametrize("check", [ch11.check_mc_predictions, ch11.check_speculative_accept,
                                   ch11.check_greedy_decode])
def test_a_constant_answer_fails_in_one_line(check):
    _one_line_error(check, lambda *args, **kwargs: 0)


def test_constant_int8_answers_fail_in_one_line():
    _one_line_error(ch11.check_int8, lambda *args: 0, _quantize, _dequantize)
    _one_line_error(ch11.check_int8, _scales, lambda *args: torch.zeros(6, 10, dtype=torch.int8), _dequantize)
    _one_line_error(ch11.check_int8, _scales, _quantize, lambda *args: torch.zeros(6, 10))


def test_the_starter_is_generated_from_the_solutions():
    """exercises/11 is build_pdf's starter of solutions/11 (the build's own test covers chapters in book.toml)."""
    starter = _fresh_starter("11_evaluation_inference")
    assert starter.count('raise NotImplementedError("your solution') == 6
    assert "tags=[\"answer\"]" not in starter and "tags=[\"solution\"]" not in starter


def _split_prefill(model, prompt, max_new_tokens, stop_tokens=(), vocab_size=None):
    """A correct variant: the prompt's last token fed as the first decode step, explicit positions, a full cache."""
    prompt = list(prompt)
    if not prompt or len(prompt) + max_new_tokens > model.cfg.context_length:
        raise ValueError("an empty prompt, or more tokens than the context holds")
    out = []
    with torch.no_grad():
        caches = model.new_caches(1)
        if len(prompt) > 1:
            model(torch.tensor([prompt[:-1]]), caches=caches)
        token = prompt[-1]
        while len(out) < max_new_tokens:
            position = torch.tensor([caches[0].length])
            scores = model(torch.tensor([[token]]), caches=caches, positions=position)[0][0, -1]
            if vocab_size is not None:
                scores[vocab_size:] = float("-inf")
            token = int(scores.argmax())
            out.append(token)
            if token in stop_tokens:
                break
    return out


def test_greedy_check_accepts_other_correct_loops():
    """The check is about the tokens and the work, not one way of writing the loop."""
    ch11.check_greedy_decode.strict(_split_prefill)
