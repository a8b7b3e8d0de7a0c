"""``python -m llmbook.pipeline``: run a pipeline config, list the stages, print an example config.

    python -m llmbook.pipeline example > pipeline.toml
    python -m llmbook.pipeline run pipeline.toml --workers 2
    python -m llmbook.pipeline stages
    python -m llmbook.pipeline verify pipeline-out/tokens

A mistake in the config (an unknown stage, a missing input, an option of the
wrong type) prints one line, ``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmbook.errors import RunError, one_line


def main(argv: list[str] | None = None) -> int:
    from llmbook.pipeline import runner

    parser = argparse.ArgumentParser(prog="python -m llmbook.pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the pipeline a TOML config describes")
    run.add_argument("config", help="the pipeline's .toml file")
    run.add_argument("--workers", type=int, default=None, help="processes (default: the config's workers)")
    run.add_argument("--force", action="store_true", help="replace an output folder that holds another config's run")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or summary line")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("stages", help="list the stage names a config can use")
    sub.add_parser("example", help="print the chapter's pipeline config (TOML)")
    verify = sub.add_parser("verify", help="check a token shard folder (headers, sizes, SHA-256) and print its totals")
    verify.add_argument("folder")
    args = parser.parse_args(argv)

    if args.command == "stages":
        for name in runner.known_stages():
            print(f"{name:<12} {runner.REGISTRY.get(name, 'registered at run time')}")
        return 0
    if args.command == "example":
        print(runner.EXAMPLE, end="")
        return 0
    if args.command == "verify":
        from llmbook.pipeline import shards

        try:
            n = shards.verify(args.folder)
            manifest = shards.read_manifest(args.folder)
        except (ValueError, OSError) as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        totals = ", ".join(f"{split} {t['tokens']:,} tokens / {t['documents']:,} documents"
                           for split, t in manifest["totals"].items())
        print(f"{args.folder}: {n} shards OK ({manifest['tokenizer']['name']}, {manifest['dtype']}): {totals}")
        return 0
    try:
        report = runner.run(args.config, force=args.force, workers=args.workers, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, RunError, KeyError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    elif not args.no_progress:
        print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
