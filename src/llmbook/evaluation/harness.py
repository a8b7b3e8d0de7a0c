"""The field's harness: any llmbook model as an lm-evaluation-harness (``lm_eval``) model, and a local task run.

lm-eval turns every task into three kinds of request, and a model class
answers them:

- ``loglikelihood``: ``(context, continuation)`` strings -> ``(log p(continuation | context), is_greedy)``;
  multiple choice asks one per choice, with ``continuation = target_delimiter + choice``;
- ``loglikelihood_rolling``: a whole document -> its log-likelihood (perplexity tasks);
- ``generate_until``: a prompt and ``{"until": [...], "max_gen_toks": N}`` -> the generated text.

``LlmbookLM`` subclasses lm-eval's ``TemplateLM``, so the *strings* become
token ids by lm-eval's own code (its ``_encode_pair``: trailing spaces of the
context move to the continuation, the pair is encoded whole and split at the
context's length), and only the scoring of ids is ours
(``likelihood.loglikelihoods``). That makes "lm-eval and our from-scratch
scorer agree" a real check of ``multiple_choice.score_items``' tokenization
and metrics against the library's, not of one function against itself.

    >>> per_item, metrics = run_task(model, tokenizer, "tasks", "book_next_line")   # doctest: +SKIP
    >>> metrics["acc"], metrics["acc_norm"]                                       # doctest: +SKIP

Offline: ``datasets`` reads ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` when
it is imported, so this module sets both to "1" (unless already set) before it
imports ``lm_eval``: a local YAML + JSONL task then never touches the network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported (by lm_eval): no hub look-ups
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from llmbook.bpe.tokenizer import Tokenizer  # noqa: E402
from llmbook.evaluation.likelihood import default_prefix_id, loglikelihoods, rolling_loglikelihood  # noqa: E402
from llmbook.generate import stream  # noqa: E402
from llmbook.model import GPT  # noqa: E402

prefix_id = default_prefix_id  # one rule for both scorers: <|endoftext|>, else the newline (likelihood.py)


class LlmbookLM(TemplateLM):
    """An llmbook ``GPT`` and its ``Tokenizer`` as an lm-eval model: ``simple_evaluate(model=LlmbookLM(m, tok), ...)``.

    Text is encoded with ``encode_ordinary`` (a "<|endoftext|>" typed in a
    task is text, not a control token). Generation is greedy whatever the
    task asks: the book's evaluations are deterministic.
    """

    def __init__(self, model: GPT | None = None, tokenizer: Tokenizer | None = None, batch_size: int = 32,
                 run_dir: str | None = None) -> None:
        super().__init__()
        if model is None or tokenizer is None:
            if run_dir is None:
                raise ValueError("LlmbookLM needs a model and its tokenizer, or run_dir=<a training run's folder>")
            from llmbook.train import load_model

            model, tokenizer = load_model(run_dir)
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlmbookLM:
        """For lm-eval's ``--model llmbook --model_args run_dir=<folder>[,batch_size=16]``."""
        args = dict(part.split("=", 1) for part in arg_string.split(",") if part)
        return cls(run_dir=args.get("run_dir"), batch_size=int(args.get("batch_size", 32)))

    @property
    def eot_token_id(self) -> int:
        return prefix_id(self.tok)

    @property
    def max_length(self) -> int:
        return self.model.cfg.context_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode_ordinary(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests: ((context, continuation), context_ids, continuation_ids), tokenized by lm-eval's _encode_pair
        pairs = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        results = loglikelihoods(self.model, pairs, self.batch_size)
        for (string_pair, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", string_pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ll = rolling_loglikelihood(self.model, self.tok_encode(text), self.eot_token_id, batch_size=self.batch_size)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            out.append(ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            out.append(self.greedy_until(context, gen_kwargs.get("until"), int(gen_kwargs.get("max_gen_toks", 256))))
            self.cache_hook.add_partial("generate_until", request.args, out[-1])
        return out

    @torch.no_grad()
    def greedy_until(self, context: str, until: str | Sequence[str] | None, max_gen_toks: int = 256) -> str:
        """Greedy text after ``context``, cut before the first ``until`` string (or ``<|endoftext|>``).

        A context too long for the window keeps its last ``context_length -
        max_gen_toks`` tokens (lm-eval's HF model does the same).
        """
        stops = [until] if isinstance(until, str) else list(until or [])
        stop_tokens = [self.tok.special_tokens["<|endoftext|>"]] if "<|endoftext|>" in self.tok.special_tokens else []
        max_gen_toks = max(1, min(max_gen_toks, self.max_length - 1))
        ids = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.eot_token_id]
        new: list[int] = []
        text = ""
        for token in stream(self.model, ids, max_gen_toks, temperature=0.0, stop_tokens=stop_tokens,
                            vocab_size=self.tok.vocab_size):
            if token in stop_tokens:
                break
            new.append(token)
            text = self.tok_decode(new)
            if any(s and s in text for s in stops):
                break
        for s in stops:
            if s:
                text = text.split(s, 1)[0]
        return text


try:  # lm-eval's CLI name: lm_eval --model llmbook --model_args run_dir=<folder> (with this module imported)
    register_model("llmbook")(LlmbookLM)
except ValueError:  # registered already: this module was reloaded (a notebook's autoreload)
    pass


def _task_manager(task_dir: str | Path, name: str):
    from lm_eval.tasks import TaskManager

    folder = Path(task_dir)
    if not folder.is_dir():
        raise ValueError(f"task folder {folder} does not exist: write the task there first (book_tasks.write_task)")
    manager = TaskManager(include_path=str(folder.resolve()), include_defaults=False)
    if name not in manager.all_tasks:
        known = ", ".join(sorted(manager.all_tasks)) or "none"
        raise ValueError(f"no task named {name!r} in {folder} (tasks there: {known})")
    return manager


def run_task(model: GPT, tokenizer: Tokenizer, task_dir: str | Path, name: str, limit: int | None = None,
             batch_size: int = 32) -> tuple[list[dict], dict]:
    """Run the local task ``name`` (a YAML in ``task_dir``) through ``lm_eval.evaluator.evaluate``; zero-shot.

    Returns ``(per_item, metrics)``: per item (in the JSONL's order) ``doc_id``,
    ``id`` (the item's own), ``gold``, ``loglikelihoods`` (one per choice, nats),
    ``greedy``, ``acc`` and ``acc_norm`` as lm-eval logged them; and lm-eval's
    aggregate ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr`` and ``n``.
    """
    from lm_eval.evaluator import evaluate

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items or None (all), got {limit}")
    manager = _task_manager(task_dir, name)
    for logger in ("lm-eval", "lm_eval"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    # the datasets builder and lm-eval draw progress bars on stderr for a few hundred items: noise in a notebook
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = manager.load([name])
    for task in loaded["tasks"].values():  # what simple_evaluate does for a zero-shot run
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    lm = LlmbookLM(model, tokenizer, batch_size=batch_size)
    # evaluator.evaluate, not simple_evaluate: the latter also records the environment (pip, git, a subprocess
    # per tool), ~4 s of bookkeeping per call that a table of five models cannot afford
    with contextlib.redirect_stderr(io.StringIO()):
        results = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=1000,
                           verbosity="WARNING")
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    per_item = []
    for s in samples:
        responses = [r[0] if isinstance(r, (list, tuple)) and isinstance(r[0], (list, tuple)) else r
                     for r in s["resps"]]  # one (loglikelihood, is_greedy) per choice
        per_item.append({
            "doc_id": s["doc_id"], "id": s["doc"].get("id"), "gold": s["target"],
            "loglikelihoods": [float(ll) for ll, _ in responses], "greedy": [bool(g) for _, g in responses],
            "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"]),
        })
    raw = results["results"][name]
    metrics = {key: float(raw[f"{key},none"]) for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
               if isinstance(raw.get(f"{key},none"), (int, float))}
    metrics["n"] = len(per_item)
    return per_item, metrics
