"""The pipeline runner: ``python -m llmbook.pipeline run <config.toml>`` chains the stages, reports and resumes.

A config names the input (a JSONL file, or the chapter's dirty corpus), an
output folder and the stages in order. The runner cuts the input into *input
shards* of ``shard_docs`` documents, the unit of work. A run of consecutive
per-document stages (filters, PII masking) is one map over the shards: each
shard is read, passed through those stages in memory, and written back, with
the ids and reasons of what was dropped and a small ``.done.json`` written
last, so with ``workers`` processes the shards run side by side. A
corpus-wide stage (deduplication, a classifier trained on the corpus) first
reads every shard of the previous step (``fit``), then decides shard by shard.
The tokenizer writes the kept documents into token shards (``shards.py``).

This is how datatrove and Spark-style systems scale the same stages: a task
per input shard, no shared state inside a map, a barrier before a corpus-wide
step; the book's runner runs the tasks in a local process pool instead of on
SLURM or a cluster. So a stage whose decision depends on other documents
(keep the first copy) must say so with ``needs_fit = True``: a per-document
stage sees one shard in one worker and remembers nothing between shards.

Memory is bounded by the shards, not the corpus: a per-document step holds
``shard_docs`` documents per worker, the tokenizer a few chunks and one token
shard per split; only a corpus-wide stage holds its whole input, as its
``fit`` needs it. Resuming follows from the same design: a shard whose
``.done.json`` exists is finished (the files are written atomically, data
first, marker last), so a rerun skips it; a corpus-wide stage is one unit (an
interruption inside it redoes it, as its ``fit`` saw the whole corpus).

Every run folder keeps its ``config.json``; a rerun with a different config is
refused rather than mixing two pipelines' files (``--force`` replaces the run).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import shutil
import time
import tomllib
import types
import typing
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

from llmbook import data
from llmbook.errors import RunError
from llmbook.pipeline.document import Document, ReadStats, read_jsonl, write_jsonl
from llmbook.pipeline.processes import pool_context
from llmbook.pipeline.stage import Stage

# name -> "module:Class", imported when a config names it (a stage's module may need heavy libraries)
REGISTRY: dict[str, str] = {
    "html": "llmbook.pipeline.html:HtmlExtract",
    "langid": "llmbook.pipeline.langid:LanguageFilter",
    "line_dedup": "llmbook.pipeline.exact_dedup:LineDedup",
    "repetition": "llmbook.pipeline.repetition:GopherRepetition",
    "gopher": "llmbook.pipeline.gopher:GopherQuality",
    "c4": "llmbook.pipeline.c4:C4Quality",
    "exact_dedup": "llmbook.pipeline.exact_dedup:ExactDedup",
    "near_dedup": "llmbook.pipeline.lsh:NearDedup",
    "quality": "llmbook.pipeline.classifier:QualityFilter",
    "toxicity": "llmbook.pipeline.toxicity:ToxicityFilter",
    "pii": "llmbook.pipeline.pii:PIIMasker",
    "tokenize": "llmbook.pipeline.shards:write_shards",  # the last stage: documents in, token shards out
}
_REGISTERED: dict[str, type] = {}  # stages added at run time (tests, a reader's own stage)
TOKENIZE = "tokenize"
# the options of write_shards a config may set (the runner supplies the rest)
TOKENIZE_OPTIONS = ("tokenizer", "shard_tokens", "val_fraction", "chunk_docs", "bpe_train_chars", "engine")

EXAMPLE = """\
# The chapter's pipeline: python -m llmbook.pipeline run pipeline.toml
output = "pipeline-out"  # relative to this file's folder
shard_docs = 1000        # documents per input shard: the unit of work, of parallelism and of resume
workers = 2              # processes for the per-document stages and the tokenizer

[corpus]                 # Chapter 2's dirty corpus; or instead: input = "pages.jsonl"
n_docs = 10000
seed = 0

[[stage]]
name = "html"
[[stage]]
name = "langid"
[[stage]]
name = "exact_dedup"         # before line_dedup: copies share all their lines, which would count as boilerplate
[[stage]]
name = "line_dedup"
[[stage]]
name = "repetition"
[[stage]]
name = "gopher"
[[stage]]
name = "c4"
filter_no_terminal_punct = false  # verse and headings end without a period (Chapter 2 measures what it costs)
[[stage]]
name = "near_dedup"
[[stage]]
name = "quality"
[[stage]]
name = "toxicity"
[[stage]]
name = "pii"
[[stage]]
name = "tokenize"
tokenizer = "gpt2"
engine = "tiktoken"      # the same ids as the book's encoder (tests/test_shards.py compares the files), faster
shard_tokens = 1000000
val_fraction = 0.1
"""


# ---------------------------------------------------------------------- the stage registry


def register(name: str, cls: type) -> None:
    """Make ``name`` a stage a config can use (the class is built with the ``[[stage]]`` options)."""
    _REGISTERED[name] = cls


def known_stages() -> list[str]:
    return list(dict.fromkeys([*REGISTRY, *_REGISTERED]))


def stage_class(name: str):
    """The class (or, for "tokenize", the function) a stage name stands for; one clear line if there is none.

    A name with a colon, ``"my_module:MyStage"``, imports a stage of your own.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = REGISTRY.get(name, name if ":" in name else None)
    if target is None:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(known_stages())} (or 'module:Class')")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"stage {name!r} needs the module {module_name}, which cannot be imported ({exc})") from None
    if not hasattr(module, attr):
        raise ValueError(f"stage {name!r}: {module_name} has no {attr}")
    return getattr(module, attr)


def _hints(target) -> dict:
    """Type hints of a class's constructor (or a function), resolved; {} when they cannot be (then no checking)."""
    try:
        fn = target.__init__ if isinstance(target, type) else target
        hints = typing.get_type_hints(fn)
        if isinstance(target, type) and dataclasses.is_dataclass(target):
            hints = {**typing.get_type_hints(target), **hints}
        return hints
    except Exception:  # noqa: BLE001 - a hint naming a type only imported for checking: skip the check
        return {}


def _coerce(value, hint, where: str):
    """``value`` (from TOML) as the type ``hint`` asks for; ValueError with one line if it is not one."""
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(hint):
            try:
                return _coerce(value, member, where)
            except ValueError:
                continue
        raise ValueError(f"{where} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, where)
    simple = {bool: (bool,), int: (int,), float: (int, float), str: (str,), Path: (str,), type(None): ()}
    if hint in simple:
        ok = isinstance(value, simple[hint]) and (hint is bool or not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{where} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
        return hint(value) if hint in (float, Path) else value
    if origin in (tuple, list) and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        item = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else typing.Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (tuple, list):
        raise ValueError(f"{where} must be a list, got {type(value).__name__} {value!r}")
    return value  # a type the runner does not check (a callable, a classifier object): passed as it is


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _build(target, options: dict, where: str):
    """``target(**options)`` with every option type-checked; options of a dataclass parameter may be given flat.

    ``[[stage]] name = "gopher", min_doc_words = 30`` reaches
    ``GopherQuality(thresholds=GopherThresholds(min_doc_words=30))``.
    """
    hints = _hints(target)
    params = inspect.signature(target).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs: dict = {}
    nested: dict[str, dict] = {}
    for key, value in options.items():
        if key in params or accepts_any:
            kwargs[key] = _coerce(value, hints.get(key, typing.Any), f"{where}: option {key}")
            continue
        owners = [p for p, h in hints.items() if p in params and dataclasses.is_dataclass(h) and isinstance(h, type)
                  and key in {f.name for f in dataclasses.fields(h)}]
        if len(owners) != 1:
            valid = sorted(p for p, v in params.items() if p not in ("self", "name")
                           and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD))
            raise ValueError(f"{where}: unknown option {key!r}; its options: {', '.join(valid) or 'none'}")
        nested.setdefault(owners[0], {})[key] = value
    for param, sub in nested.items():
        base = kwargs.get(param) or _default(target, param, params) or hints[param]()
        kwargs[param] = _build(hints[param], {**dataclasses.asdict(base), **sub}, f"{where}: {param}")
    try:
        return target(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _default(target, param: str, params) -> object | None:
    """The default value of a constructor parameter (a dataclass field's default_factory called), or None."""
    if dataclasses.is_dataclass(target):
        for f in dataclasses.fields(target):
            if f.name == param and f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    default = params[param].default
    return default if default is not inspect.Parameter.empty and dataclasses.is_dataclass(default) else None


def _importable_name(name: str) -> str:
    """The name a worker process can build the stage from: a stage added with ``register`` as "module:Class".

    Workers start fresh (``processes.pool_context``), so they know the
    registry's names but not what this process registered at run time.
    """
    if name in _REGISTERED:
        cls = _REGISTERED[name]
        return f"{cls.__module__}:{cls.__qualname__}"
    return name


def build_stage(name: str, options: dict) -> Stage:
    """The stage ``name`` with its ``[[stage]]`` options (checked); one clear line for a bad name or option."""
    cls = stage_class(name)
    stage = _build(cls, options, f"stage {name!r}")
    if not isinstance(stage, Stage):
        raise ValueError(f"stage {name!r} is a {type(stage).__name__}, not a llmbook.pipeline.stage.Stage")
    return stage


# ---------------------------------------------------------------------- the config


@dataclass
class StageSpec:
    name: str
    options: dict = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """What a run does. ``input`` (a JSONL file) or ``corpus`` (``CorpusConfig`` fields) says what it reads."""

    output: Path
    stages: list[StageSpec]
    input: Path | None = None
    corpus: dict | None = None
    shard_docs: int = 1000  # documents per input shard
    workers: int = 1  # processes for per-document stages and tokenization (the output does not depend on it)

    @classmethod
    def from_dict(cls, values: dict, base: Path | None = None) -> PipelineConfig:
        """From a parsed TOML/JSON table; relative paths are relative to ``base`` (the config file's folder)."""
        if not isinstance(values, dict):
            raise ValueError(f"a pipeline config is a table, got {type(values).__name__}")
        values = dict(values)
        known = {"output", "input", "corpus", "shard_docs", "workers", "stage", "stages"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r} in the pipeline config; known: "
                             f"{', '.join(sorted(known))}")
        base = Path(base) if base is not None else Path.cwd()
        raw_stages = values.get("stage", values.get("stages"))
        if not raw_stages or not isinstance(raw_stages, list):
            raise ValueError("the pipeline config lists no stages: add [[stage]] tables with name = \"...\"")
        stages = []
        for i, s in enumerate(raw_stages, start=1):
            if isinstance(s, StageSpec):
                stages.append(s)
                continue
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise ValueError(f"stage {i} has no name: each [[stage]] needs name = \"...\"")
            stages.append(StageSpec(s["name"], {k: v for k, v in s.items() if k != "name"}))
        if "output" not in values or not isinstance(values["output"], str | Path):
            raise ValueError("the pipeline config needs output = \"<folder>\"")
        if ("input" in values) == ("corpus" in values):
            raise ValueError("the pipeline config needs exactly one of input = \"<file.jsonl>\" or a [corpus] table")
        for key in ("shard_docs", "workers"):
            if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1):
                raise ValueError(f"{key} must be a positive integer, got {values[key]!r}")
        corpus = values.get("corpus")
        if corpus is not None and not isinstance(corpus, dict):
            raise ValueError(f"corpus must be a table of CorpusConfig fields, got {corpus!r}")
        return cls(output=base / values["output"], stages=stages,
                   input=base / values["input"] if "input" in values else None, corpus=corpus,
                   shard_docs=values.get("shard_docs", 1000), workers=values.get("workers", 1))

    @classmethod
    def from_toml(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such config file (`python -m llmbook.pipeline example > {path.name}` "
                             "writes one)")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid TOML ({exc})") from None
        return cls.from_dict(values, base=path.parent)

    def identity(self) -> dict:
        """What decides the output (not where it goes, nor how many workers): a rerun must match it to resume."""
        source = {"corpus": self.corpus} if self.corpus is not None else {"input": str(self.input),
                                                                          "sha256": data.sha256_of(self.input)}
        return {"source": source, "shard_docs": self.shard_docs,
                "stages": [{"name": s.name, "options": s.options} for s in self.stages]}


def load_config(config: PipelineConfig | dict | str | Path) -> PipelineConfig:
    if isinstance(config, PipelineConfig):
        return config
    if isinstance(config, dict):
        return PipelineConfig.from_dict(config)
    return PipelineConfig.from_toml(config)


# ---------------------------------------------------------------------- the report


@dataclass
class StageReport:
    """One stage's counts: documents and UTF-8 bytes in and out, removal reasons, seconds of work."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # time in the stage summed over shards (with N workers, up to N x the wall time)
    cpu_seconds: float = 0.0  # CPU time of the process running it (on a busy machine, less than seconds)
    shards: int = 0  # shards processed ...
    reused: int = 0  # ... of which this many were finished by an earlier, interrupted run
    extra: dict = field(default_factory=dict)  # tokenize: tokens and shards per split

    @property
    def docs_per_s(self) -> float:
        return self.docs_in / self.seconds if self.seconds > 0 else float("inf")

    def add(self, other: dict) -> None:
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds", "cpu_seconds"):
            setattr(self, key, getattr(self, key) + other.get(key, 0.0))
        self.reasons = dict(Counter(self.reasons) + Counter(other["reasons"]))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "docs_per_s": round(self.docs_per_s, 1) if self.seconds else None}


@dataclass
class Report:
    """A run: the stages' reports in order, and this invocation's wall time."""

    output: Path
    stages: list[StageReport]
    seconds: float
    steps: list[Path] = field(default_factory=list)  # the folders of the document steps, in order
    kept_files: list[Path] = field(default_factory=list)  # the last step's shards: the documents that were kept

    def removed(self) -> dict[str, str]:
        """Every removed document's id and its ``"stage:rule"`` reason (what ``ground_truth.score`` takes)."""
        removed = {}
        for folder in self.steps:
            for path in sorted(folder.glob("shard_*.dropped.jsonl")):
                for line in path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    removed[record["id"]] = record["reason"]
        return removed

    def kept(self) -> Iterator[Document]:
        """The documents that came through every stage before tokenizing, in corpus order (streamed)."""
        return _stream(self.kept_files)

    @property
    def docs_in(self) -> int:
        return self.stages[0].docs_in if self.stages else 0

    @property
    def docs_out(self) -> int:
        return self.stages[-1].docs_out if self.stages else 0

    def stage(self, name: str) -> StageReport:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in this run; stages: {', '.join(s.name for s in self.stages)}")

    def table(self) -> str:
        """A plain-text table, one row per stage."""
        rows = [f"{'stage':<14}{'docs in':>10}{'docs out':>10}{'removed':>9}{'MB in':>9}{'MB out':>9}{'s':>8}"
                f"{'cpu s':>8}{'docs/s':>10}"]
        for s in self.stages:
            removed = 1 - s.docs_out / s.docs_in if s.docs_in else 0.0
            rate = f"{s.docs_per_s:>10,.0f}" if s.seconds else f"{'-':>10}"
            rows.append(f"{s.name:<14}{s.docs_in:>10,}{s.docs_out:>10,}{removed:>9.1%}{s.bytes_in / 1e6:>9.2f}"
                        f"{s.bytes_out / 1e6:>9.2f}{s.seconds:>8.2f}{s.cpu_seconds:>8.2f}{rate}")
        return "\n".join(rows)

    def summary(self) -> str:
        tokens = next((s.extra.get("tokens") for s in self.stages if s.name == TOKENIZE), None)
        kept = self.docs_out / self.docs_in if self.docs_in else 0.0
        reused = sum(s.reused for s in self.stages)
        text = f"pipeline: {self.docs_in:,} -> {self.docs_out:,} documents ({kept:.1%} kept)"
        if tokens:
            text += f", {sum(tokens.values()):,} tokens"
        text += f" in {self.seconds:.1f} s -> {self.output}"
        return text + (f" ({reused} shards reused from an earlier run)" if reused else "")

    def to_dict(self) -> dict:
        return {"output": str(self.output), "seconds": round(self.seconds, 3),
                "stages": [s.to_dict() for s in self.stages]}


# ---------------------------------------------------------------------- files


def _write_json(path: Path, value) -> None:
    """JSON to ``path`` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _prepare_output(cfg: PipelineConfig, force: bool) -> Path:
    """The output folder, new or holding a run of the same config; never another config's run."""
    out = Path(cfg.output)
    identity = json.loads(json.dumps(cfg.identity()))  # as it will read back from JSON
    marker = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if marker.is_file() and not (out / "input" / "_done.json").is_file():
            shutil.rmtree(out)  # a run stopped before its input was read: nothing to keep, nothing to resume
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise ValueError(f"{out} exists and is not a pipeline output folder (no config.json): choose a new folder")
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous != identity:
            if not force:
                raise ValueError(f"{out} holds a run of a different pipeline config "
                                 f"({_first_difference(previous, identity)}); choose a new output folder, or pass "
                                 "--force (force=True) to replace that run")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, identity)
    for stale in out.rglob(".*.tmp"):  # half-written files of an interrupted run (never under a real name)
        stale.unlink()
    return out


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'config'}: {json.dumps(a)} before, {json.dumps(b)} now"


def _shard_name(j: int) -> str:
    return f"shard_{j:05d}"


def _input_docs(cfg: PipelineConfig, stats: ReadStats) -> Iterator[Document]:
    if cfg.corpus is not None:
        from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus

        yield from make_corpus(_build(CorpusConfig, cfg.corpus, "corpus"))
        return
    if not cfg.input.is_file():
        raise ValueError(f"input file {cfg.input} not found: give input = \"<path to a .jsonl or .jsonl.gz>\"")
    yield from read_jsonl(cfg.input, stats)


def _split_input(cfg: PipelineConfig, out: Path, progress: bool) -> tuple[list[Path], StageReport]:
    """Cut the input into shards of ``shard_docs`` documents (once: ``input/_done.json`` marks it done)."""
    from tqdm.auto import tqdm

    folder, done = out / "input", out / "input" / "_done.json"
    if done.is_file():
        record = json.loads(done.read_text(encoding="utf-8"))
        report = StageReport(**record["report"])
        report.reused = report.shards
        return [folder / f"{_shard_name(j)}.jsonl" for j in range(record["shards"])], report
    start, cpu, stats = time.perf_counter(), time.process_time(), ReadStats()
    report, paths = StageReport("read"), []
    docs = _input_docs(cfg, stats)
    with tqdm(desc="read", unit="doc", disable=not progress) as bar:
        while batch := list(islice(docs, cfg.shard_docs)):
            path = folder / f"{_shard_name(len(paths))}.jsonl"
            write_jsonl(batch, path)
            paths.append(path)
            size = sum(len(d.text.encode("utf-8")) for d in batch)
            report.docs_in += len(batch)
            report.bytes_in += size
            bar.update(len(batch))
    if not paths:
        raise ValueError(f"the input {cfg.input} holds no documents")
    report.docs_out, report.bytes_out, report.shards = report.docs_in, report.bytes_in, len(paths)
    if stats.bad_lines:  # lines that were not JSON documents: counted as removed by reading
        report.docs_in += stats.bad_lines
        report.reasons["read:bad_line"] = stats.bad_lines
    if stats.invalid_utf8:
        report.extra["invalid_utf8_repaired"] = stats.invalid_utf8
    report.seconds, report.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    _write_json(done, {"shards": len(paths), "report": dataclasses.asdict(report)})
    return paths, report


# ---------------------------------------------------------------------- running stages over shards


def _decide(stage: Stage, docs: list[Document], name: str) -> tuple[list[Document], list[dict], dict]:
    """One stage over one shard's documents: the kept documents, the dropped ones' records, the counts."""
    start, cpu = time.perf_counter(), time.process_time()
    decisions = list(stage.run(docs))  # run, not apply: a stage may batch (a classifier scores 2,048 at once)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if len(decisions) != len(docs):
        raise ValueError(f"stage {name!r} returned {len(decisions)} decisions for {len(docs)} documents")
    kept = [d for d, reason in decisions if reason is None]
    dropped = [{"id": d.id, "stage": name, "reason": reason} for d, reason in decisions if reason is not None]
    counts = {"name": name, "docs_in": len(docs), "docs_out": len(kept),
              "bytes_in": sum(len(d.text.encode("utf-8")) for d in docs),
              "bytes_out": sum(len(d.text.encode("utf-8")) for d in kept),
              "reasons": dict(Counter(r["reason"] for r in dropped)), "seconds": seconds, "cpu_seconds": cpu}
    return kept, dropped, counts


_worker_stages: dict[tuple, list[Stage]] = {}  # per process: the stages of a segment of this run, built once


def _run_shard(task: tuple) -> list[dict]:
    """One input shard through a segment of per-document stages; writes its files, returns the stages' counts."""
    key, specs, source, target = task
    if key not in _worker_stages:
        _worker_stages[key] = [build_stage(name, options) for name, options in specs]
    docs = list(read_jsonl(source, strict=True))
    dropped_all, counts = [], []
    for stage, (name, _) in zip(_worker_stages[key], specs, strict=True):
        docs, dropped, c = _decide(stage, docs, name)
        dropped_all += dropped
        counts.append(c)
    _write_outputs(target, docs, dropped_all, counts)
    return counts


def _write_outputs(target: Path, kept: list[Document], dropped: list[dict], counts: list[dict]) -> None:
    """A shard's kept documents, its dropped ids and reasons, then (last: the shard is done) its counts."""
    write_jsonl(kept, target.with_suffix(".jsonl"))
    tmp = target.with_name(f".{target.name}.dropped.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped), encoding="utf-8")
    tmp.replace(target.with_name(f"{target.name}.dropped.jsonl"))
    _write_json(target.with_name(f"{target.name}.done.json"), {"stages": counts})


def _segments(stages: list[StageSpec], built: list[Stage | None]) -> list[list[int]]:
    """Stage indices grouped into steps: runs of per-document stages; each corpus-wide stage alone; tokenize alone."""
    groups: list[list[int]] = []
    for i, (spec, stage) in enumerate(zip(stages, built, strict=True)):
        if groups and not _is_alone(spec, stage) and not _is_alone(stages[groups[-1][-1]], built[groups[-1][-1]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _is_alone(spec: StageSpec, stage: Stage | None) -> bool:
    return spec.name == TOKENIZE or bool(stage is not None and stage.needs_fit)


def _display_names(stages: list[StageSpec]) -> list[str]:
    """Stage names for reports, unique: a second "gopher" is "gopher#2"."""
    seen: Counter = Counter()
    names = []
    for s in stages:
        seen[s.name] += 1
        names.append(s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}")
    return names


def _stream(paths: Iterable[Path]) -> Iterator[Document]:
    return chain.from_iterable(read_jsonl(p, strict=True) for p in paths)


def run(config: PipelineConfig | dict | str | Path, force: bool = False, workers: int | None = None,
        progress: bool = True) -> Report:
    """Run (or resume) a pipeline; return its report (also written to ``<output>/report.json``).

    ``config`` is a ``PipelineConfig``, a dict as the TOML would parse, or the
    path of a TOML file. ``workers`` overrides the config's (the output is the
    same for any number). ``force`` replaces an output folder that holds a run
    of a different config.
    """
    start = time.perf_counter()
    cfg = load_config(config)
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers}")
        cfg = dataclasses.replace(cfg, workers=workers)
    names = [s.name for s in cfg.stages]
    if TOKENIZE in names and names.index(TOKENIZE) != len(names) - 1:
        raise ValueError("the 'tokenize' stage turns documents into tokens: it must be the last stage, and only once")
    if cfg.input is not None and not cfg.input.is_file():
        raise ValueError(f"input file {cfg.input} not found: give input = \"<path to a .jsonl or .jsonl.gz>\"")
    # build every stage once here, so a bad name or option stops the run before any work
    built: list[Stage | None] = []
    for spec in cfg.stages:
        if spec.name == TOKENIZE:
            bad = sorted(set(spec.options) - set(TOKENIZE_OPTIONS))
            if bad:
                raise ValueError(f"stage 'tokenize': unknown option {bad[0]!r}; its options: "
                                 f"{', '.join(TOKENIZE_OPTIONS)}")
            built.append(None)
        else:
            built.append(build_stage(spec.name, spec.options))
    if cfg.corpus is not None:  # a bad corpus setting stops the run here too
        from llmbook.pipeline.dirty_corpus import CorpusConfig

        _build(CorpusConfig, cfg.corpus, "corpus")
    out = _prepare_output(cfg, force)
    labels = _display_names(cfg.stages)
    _worker_stages.clear()  # never a stage of an earlier run in this process
    run_id = time.time_ns()

    paths, read_report = _split_input(cfg, out, progress)
    reports, steps = [read_report], []
    # a pool that raises BrokenProcessPool when a worker dies (multiprocessing.Pool would wait forever)
    pool = ProcessPoolExecutor(cfg.workers, mp_context=pool_context()) if cfg.workers > 1 else None
    try:
        for group in _segments(cfg.stages, built):
            first = cfg.stages[group[0]]
            label = re.sub(r"[^\w.+-]", "_", "+".join(cfg.stages[i].name for i in group))
            folder = out / f"{group[0] + 1:02d}_{label}"
            if first.name == TOKENIZE:
                reports.append(_tokenize(paths, out / "tokens", first.options, cfg.workers, progress))
                break
            stage_reports = [StageReport(labels[i]) for i in group]
            targets = [folder / _shard_name(j) for j in range(len(paths))]
            if built[group[0]].needs_fit:
                _fit_stage(built[group[0]], labels[group[0]], paths, targets, folder, stage_reports[0], progress)
            else:
                specs = [(_importable_name(cfg.stages[i].name), cfg.stages[i].options) for i in group]
                key = (run_id, group[0])
                if pool is None:  # one process: the stages built above do the work (a worker builds its own)
                    _worker_stages[key] = [built[i] for i in group]
                _map_stages(specs, key, paths, targets, stage_reports, pool, progress)
            reports += stage_reports
            paths = [t.with_suffix(".jsonl") for t in targets]
            steps.append(folder)
    except BrokenProcessPool:
        raise RunError("a worker process died (killed, or out of memory); the finished shards are kept: run the same "
                       "config again to resume (with fewer workers or smaller shard_docs if memory ran out)") from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report = Report(out, reports, time.perf_counter() - start, steps, paths)
    _write_json(out / "report.json", report.to_dict())
    if progress:
        print(report.summary())
    return report


def _map_stages(specs: list[tuple[str, dict]], key: tuple, paths: list[Path], targets: list[Path],
                reports: list[StageReport], pool, progress: bool) -> None:
    """Per-document stages: every unfinished shard, in a pool of workers; a finished one's counts are read back."""
    from tqdm.auto import tqdm

    todo = []
    for j, target in enumerate(targets):
        done = target.with_name(f"{target.name}.done.json")
        if done.is_file():
            for r, counts in zip(reports, json.loads(done.read_text(encoding="utf-8"))["stages"], strict=True):
                r.add(counts)
                r.shards += 1
                r.reused += 1
        else:
            todo.append((key, specs, paths[j], target))
    label = "+".join(r.name for r in reports)
    with tqdm(total=len(targets), initial=len(targets) - len(todo), desc=label, unit="shard",
              disable=not progress) as bar:
        results = pool.map(_run_shard, todo) if pool is not None else map(_run_shard, todo)  # in order
        for counts in results:
            for r, c in zip(reports, counts, strict=True):
                r.add(c)
                r.shards += 1
            bar.update(1)


def _fit_stage(stage: Stage, name: str, paths: list[Path], targets: list[Path], folder: Path,
               report: StageReport, progress: bool) -> None:
    """A corpus-wide stage: ``fit`` on every document, then decide shard by shard (all again after an interruption).

    Memory: the step's whole input is held while the stage runs, as its ``fit`` needs it.
    """
    from tqdm.auto import tqdm

    done = folder / "_done.json"
    if done.is_file():
        for counts in json.loads(done.read_text(encoding="utf-8"))["shards"]:
            report.add(counts)
        report.shards = report.reused = len(targets)
        return
    # the corpus is read once and held: fit needs all of it (every corpus-wide stage keeps at least an entry per
    # document), and the decisions are then made on the same documents without reading them again
    corpus = [list(read_jsonl(p, strict=True)) for p in tqdm(paths, desc=f"{name} (read)", unit="shard",
                                                             disable=not progress)]
    start, cpu = time.perf_counter(), time.process_time()
    stage.fit(chain.from_iterable(corpus))
    fit_seconds, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    stage.needs_fit = False  # fitted: from here on, run() decides without fitting again
    all_counts = []
    for j in tqdm(range(len(paths)), desc=name, unit="shard", disable=not progress):
        kept, dropped, counts = _decide(stage, corpus[j], name)
        corpus[j] = []
        _write_outputs(targets[j], kept, dropped, [counts])
        all_counts.append(counts)
    all_counts[0]["seconds"] += fit_seconds  # the fit belongs to the stage's time
    all_counts[0]["cpu_seconds"] += fit_cpu
    for counts in all_counts:
        report.add(counts)
    report.shards = len(targets)
    report.extra["fit_seconds"] = fit_seconds
    _write_json(done, {"shards": all_counts})


def _tokenize(paths: list[Path], folder: Path, options: dict, workers: int, progress: bool) -> StageReport:
    """The last stage: the kept documents into token shards (done when the shard folder has its manifest)."""
    from llmbook.pipeline import shards

    report, done = StageReport(TOKENIZE), folder.with_name("tokens.done.json")
    if (folder / shards.MANIFEST).is_file() and done.is_file():
        report.reused = 1
        record = json.loads(done.read_text("utf-8"))
    else:
        cpu = time.process_time()
        stats = shards.write_shards(_stream(paths), folder, workers=workers, overwrite=True, progress=progress,
                                    **options)
        # CPU time only when the work ran in this process (the workers' is not seen from here)
        record = {"seconds": stats.seconds, "cpu_seconds": time.process_time() - cpu if workers == 1 else 0.0}
        _write_json(done, record)
    totals = shards.read_manifest(folder)["totals"]
    docs = sum(t["documents"] for t in totals.values())
    size = sum(t["bytes"] for t in totals.values())
    report.docs_in = report.docs_out = docs
    report.bytes_in = report.bytes_out = size
    report.seconds, report.cpu_seconds, report.shards = record["seconds"], record["cpu_seconds"], 1
    report.extra = {"tokens": {s: t["tokens"] for s, t in totals.items()}, "folder": str(folder)}
    return report
