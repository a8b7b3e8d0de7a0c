"""Serve a model of the book over OpenAI's HTTP API: ``python -m llmbook.serve --model sft-full``.

``--model`` is a run folder holding ``model.pt`` (and ``tokenizer.json``), or
the name of one of the book's cached models: a pretrained preset
(``shakespeare``, ``english``), an SFT, DPO or GRPO preset (``sft-full``,
``dpo-task``, ``grpo``...), trained first if it is not in the cache. The server
listens on 127.0.0.1 only (pass ``--host 0.0.0.0`` to open it to the network,
knowing that it has no authentication) and runs the continuous-batching
scheduler behind ``/v1/completions`` and ``/v1/chat/completions``; any client of
OpenAI's API works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="sft-full", messages=[{"role": "user", "content": "Hi"}])

Ctrl-C stops it cleanly (uvicorn finishes, the engine thread stops).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from llmbook.errors import RunError, one_line


def _presets() -> dict[str, object]:
    """Every cached model name the book has, mapped to the module whose ``load(name)`` gives it."""
    from llmbook import pretrained
    from llmbook.posttrain import dpo, grpo, sft
    from llmbook.train import TRAIN_PRESETS

    out: dict[str, object] = dict.fromkeys(TRAIN_PRESETS, pretrained)
    out.update(dict.fromkeys(sft.SFT_PRESETS, sft))
    out.update(dict.fromkeys(dpo.DPO_PRESETS, dpo))
    out.update(dict.fromkeys(grpo.GRPO_PRESETS, grpo))
    return out


def check(model: str) -> None:
    """A one-line error unless ``model`` is a run folder (or model file) or one of the book's model names; cheap."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "model.pt").is_file() and not (path / "checkpoint.pt").is_file():
            raise RunError(f"{path} is not a run folder: it holds no model.pt or checkpoint.pt")
        return
    presets = _presets()
    if model not in presets:
        raise FileNotFoundError(f"--model {model!r} is neither a run folder (with model.pt) nor one of the book's "
                                f"models: {', '.join(presets)}")


def load(model: str):
    """``(model, tokenizer, name)`` for a run folder or a preset name; a one-line error for anything else."""
    check(model)
    path = Path(model).expanduser()
    if path.exists():
        from llmbook.train import load_model

        net, tokenizer = load_model(path)
        name = path.name if path.is_dir() else path.parent.name
        return net, tokenizer, name
    loaded = _presets()[model].load(model)  # trains it first if it is not cached (minutes)
    return loaded.model, loaded.tokenizer, model


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); one line if the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RunError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from None
    return sock


def banner(name: str, url: str, context: int, max_batch: int, chat: bool) -> str:
    """What the server prints at start: where it listens, and a curl and an openai-client line to try it."""
    if chat:  # a chat model (its tokenizer has ChatML's tokens): the snippet asks it something
        call = (f"c.chat.completions.create(model=\"{name}\", messages=[{{\"role\": \"user\", \"content\": "
                f"\"Hello\"}}], max_tokens=32).choices[0].message.content")
    else:  # a base model continues text
        call = f"c.completions.create(model=\"{name}\", prompt=\"ROMEO:\", max_tokens=32).choices[0].text"
    return (f"serving '{name}' ({context}-token context, batches of up to {max_batch}) at {url}\n"
            f"try:\n"
            f"  curl {url}/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{name}\", \"prompt\": \"ROMEO:\", \"max_tokens\": 32, \"temperature\": 0}}'\n"
            f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}\", api_key=\"none\"); "
            f"print({call})'\n"
            f"Ctrl-C stops the server.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmbook.serve",
                                     description="Serve a model of the book over OpenAI's HTTP API.")
    parser.add_argument("--model", required=True, metavar="RUN_DIR_OR_NAME",
                        help="a run folder (model.pt + tokenizer.json) or a cached model's name (e.g. sft-full)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together per step (default 8)")
    parser.add_argument("--template", default="chatml", help="chat template (default chatml, the book's SFT)")
    parser.add_argument("--name", default=None, help="the model name clients send (default: the folder or preset)")
    args = parser.parse_args(argv)
    sock = None
    try:
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        check(args.model)  # a wrong name fails at once, and
        sock = listen(args.host, args.port)  # a taken port before minutes of loading (or training) the model
        model, tokenizer, name = load(args.model)
        name = args.name or name
        import uvicorn

        from llmbook.inference.server import create_app

        app = create_app(model, tokenizer, name, template=args.template, max_batch=args.max_batch)
    except (OSError, ValueError, RunError, KeyError) as exc:
        if sock is not None:
            sock.close()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sock is not None:
            sock.close()
        print("interrupted", file=sys.stderr)
        return 130
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/v1"
    print(banner(name, url, model.cfg.context_length, args.max_batch, chat="<|im_start|>" in tokenizer.special_tokens),
          flush=True)
    config = uvicorn.Config(app, log_level="warning",
                            timeout_graceful_shutdown=5)  # streams still open after Ctrl-C get 5 s to finish
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])  # uvicorn handles Ctrl-C / SIGTERM: stops accepting, finishes, runs the shutdown
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has stopped
        pass
    finally:
        sock.close()
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
