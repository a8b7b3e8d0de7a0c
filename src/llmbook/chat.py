"""Chat with a fine-tuned model in a terminal: ``python -m llmbook.chat --model RUN_DIR``.

Each line you type is a user message; the reply streams as it is generated
and the conversation is kept (old turns are dropped when it outgrows the
model's context; see ``llmbook.posttrain.chat``). An empty line, ``/exit``,
end of input (Ctrl-D) or Ctrl-C ends the chat. The work is done by
``llmbook.posttrain.chat``; this file only reads lines and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llmbook.errors import RunError, one_line
from llmbook.posttrain.chat import check_tokenizer, stream_reply
from llmbook.posttrain.templates import TEMPLATES, Message
from llmbook.train import load_model


def _load(run_dir: str, template: str):
    """The model and tokenizer of a run folder, checked for the template; errors are one line."""
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the run folder of a trained model (it holds model.pt and "
                                "tokenizer.json)")
    if path.is_dir() and not any((path / name).exists() for name in ("model.pt", "checkpoint.pt", "tokenizer.json")):
        raise RunError(f"{path} is not a run folder: it holds no model.pt, checkpoint.pt or tokenizer.json")
    model, tokenizer = load_model(path)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise RunError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                       f"{model.cfg.vocab_size} rows; the tokenizer.json is not this model's")
    check_tokenizer(tokenizer, template)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmbook.chat", description="Chat with a fine-tuned model.")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a run folder (model.pt + tokenizer.json)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="chatml", help="default: chatml")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the rest of the context")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling, for reproducible replies")
    args = parser.parse_args(argv)
    try:
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
        model, tokenizer = _load(args.model, args.template)
    except (OSError, ValueError, RunError, KeyError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    messages = [Message("system", args.system)] if args.system else []
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            text = line.rstrip("\r\n")
            if not line or not text.strip() or text.strip() == "/exit":
                return 0
            messages.append(Message("user", text))
            pieces = []
            try:
                for piece in stream_reply(model, tokenizer, messages, args.template, args.max_new_tokens,
                                          args.temperature, args.top_k, args.top_p, generator):
                    pieces.append(piece)
                    print(piece, end="", flush=True)
            except ValueError as exc:  # a message too long for the context, a bad option: one line, chat goes on
                messages.pop()
                print(f"error: {one_line(exc)}", file=sys.stderr)
                continue
            print(flush=True)
            answer = "".join(pieces)
            for special in tokenizer.special_tokens:  # a stray special token the model wrote is not kept as text
                answer = answer.replace(special, "")
            messages.append(Message("assistant", answer))
    except KeyboardInterrupt:
        print("\ninterrupted; chat ended", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
