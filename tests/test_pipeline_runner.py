"""The pipeline runner: stages chained over input shards, the report, the same output for any number of workers,
resume after a crash and after SIGKILL without redoing finished shards, and one clear line for a bad config.

The stages here are toy ones (a module written to tmp_path), so the runner is tested apart from the real stages.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmbook.pipeline import runner, shards
from llmbook.pipeline.document import Document, read_jsonl, write_jsonl

TOY_STAGES = textwrap.dedent('''
    """Toy stages for the runner's tests."""
    import os
    import signal
    from dataclasses import dataclass, field
    from pathlib import Path

    from llmbook.pipeline.stage import Filter, Stage


    @dataclass(frozen=True)
    class Limits:
        min_words: int = 3
        max_words: int = 1000


    @dataclass
    class DropShort(Filter):
        limits: Limits = field(default_factory=Limits)
        name: str = "drop_short"

        def reason(self, text):
            n = len(text.split())
            return "short" if n < self.limits.min_words else "long" if n > self.limits.max_words else None


    class Upper(Stage):
        name = "upper"

        def apply(self, doc):
            doc.text = doc.text.upper()
            return doc, None


    class FirstCopy(Stage):
        """Exact dedup in miniature: fit remembers the first id of every text."""

        name = "first_copy"
        needs_fit = True

        def fit(self, docs):
            self.first = {}
            for d in docs:
                self.first.setdefault(d.text, d.id)

        def apply(self, doc):
            return doc, (None if self.first[doc.text] == doc.id else "first_copy:duplicate")


    class Trap(Stage):
        """Crashes (or kills its process) at document ``at`` while the file ``armed`` exists; disarms itself."""

        name = "trap"

        def __init__(self, at: str = "", armed: str = "", kill: bool = False):
            self.at, self.armed, self.kill = at, armed, kill

        def apply(self, doc):
            if doc.id == self.at and self.armed and Path(self.armed).exists():
                Path(self.armed).unlink()
                if self.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("trap sprung")
            return doc, None
''')

WORDS = "the king queen lord good night day love death sword crown thou art my heart speak".split()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy stage module, importable as ``toy_stages`` here and in child processes."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "toy_stages.py").write_text(TOY_STAGES)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return folder


def make_input(path: Path, n: int = 230, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 10 == 9:  # an exact copy of an earlier document
            docs.append(Document(f"d{i:04d}", docs[rng.randrange(len(docs))].text))
        else:
            docs.append(Document(f"d{i:04d}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))))
    write_jsonl(docs, path)
    return docs


def config(tmp_path: Path, out: str = "out", trap: dict | None = None, **extra) -> dict:
    stages = [{"name": "toy_stages:DropShort", "min_words": 4}, {"name": "toy_stages:Upper"},
              {"name": "toy_stages:FirstCopy"}, {"name": "toy_stages:Trap", **(trap or {})},
              {"name": "tokenize", "tokenizer": str(tmp_path / "bytes_eot.json"), "shard_tokens": 2000,
               "val_fraction": 0.2}]
    return {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / out), "shard_docs": 40, "stage": stages,
            **extra}


@pytest.fixture
def setup(tmp_path, toy):
    from llmbook.bpe.tokenizer import Tokenizer

    Tokenizer({i: bytes([i]) for i in range(256)}, [], [shards.EOT], name="bpe-257").save(tmp_path / "bytes_eot.json")
    return make_input(tmp_path / "in.jsonl")


def outputs(out: Path) -> dict[str, bytes]:
    """Every file that holds data (documents, dropped ids, tokens), by path: what must not depend on how we ran."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith("done.json") \
                and p.name not in ("report.json", "config.json"):
            files[str(p.relative_to(out))] = p.read_bytes()
    return files


def counts(report: runner.Report) -> list[tuple]:
    return [(s.name, s.docs_in, s.docs_out, s.bytes_in, s.bytes_out, s.reasons) for s in report.stages]


# ---------------------------------------------------------------------- a run


def test_run_chains_stages_and_reports(tmp_path, setup):
    docs = setup
    report = runner.run(config(tmp_path), progress=False)
    names = [s.name for s in report.stages]
    assert names == ["read", "toy_stages:DropShort", "toy_stages:Upper", "toy_stages:FirstCopy", "toy_stages:Trap",
                     "tokenize"]
    short = [d for d in docs if len(d.text.split()) < 4]
    kept = [d for d in docs if len(d.text.split()) >= 4]
    first = {}
    for d in kept:
        first.setdefault(d.text, d.id)
    final = [d for d in kept if first[d.text] == d.id]
    read, drop, upper, dedup, _, tok = report.stages
    assert read.docs_in == read.docs_out == len(docs) and read.shards == 6  # 230 documents in shards of 40
    assert (drop.docs_in, drop.docs_out, drop.reasons) == (len(docs), len(kept), {"drop_short:short": len(short)})
    assert drop.bytes_in == sum(len(d.text.encode()) for d in docs)
    assert upper.docs_out == len(kept) and not upper.reasons
    assert dedup.docs_out == len(final) == report.docs_out and dedup.reasons == {
        "first_copy:duplicate": len(kept) - len(final)}
    assert tok.docs_in == len(final) and sum(tok.extra["tokens"].values()) == sum(len(d.text) + 1 for d in final)
    assert all(s.seconds >= 0 and s.cpu_seconds >= 0 for s in report.stages) and report.seconds > 0
    # the final documents: in order, upper-cased; the dropped ones listed with their reasons
    out = tmp_path / "out"
    last = sorted((out / "04_toy_stages_Trap").glob("shard_*[0-9].jsonl"))
    assert [d.id for p in last for d in read_jsonl(p)] == [d.id for d in final]
    assert all(d.text == d.text.upper() for p in last for d in read_jsonl(p))
    first_step = out / "01_toy_stages_DropShort+toy_stages_Upper"
    dropped = [json.loads(line) for p in sorted(first_step.glob("*.dropped.jsonl"))
               for line in p.read_text().splitlines()]
    assert [r["id"] for r in dropped] == [d.id for d in short]
    assert {r["reason"] for r in dropped} == {"drop_short:short"}
    assert [d.id for d in report.kept()] == [d.id for d in final]
    removed = report.removed()
    assert sorted(removed) == sorted({d.id for d in docs} - {d.id for d in final})
    assert {removed[d.id] for d in short} == {"drop_short:short"}
    # the report on disk, and the shard folder the trainer reads
    on_disk = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in on_disk["stages"]] == names and on_disk["stages"][1]["docs_per_s"] > 0
    data = shards.to_prepared(out / "tokens")
    assert len(data.train) + len(data.val) == sum(tok.extra["tokens"].values())
    assert "documents" in report.summary() and report.table().count("\n") == len(names)


def test_same_output_for_any_number_of_workers(tmp_path, setup):
    one = runner.run(config(tmp_path, "w1"), progress=False)
    two = runner.run(config(tmp_path, "w2"), workers=2, progress=False)
    assert counts(one) == counts(two)
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2") and len(outputs(tmp_path / "w1")) > 20


def test_registered_stage_and_flat_options(tmp_path, setup):
    import toy_stages

    runner.register("toy_short", toy_stages.DropShort)
    try:
        cfg = config(tmp_path)
        cfg["stage"] = [{"name": "toy_short", "min_words": 10, "max_words": 20}, cfg["stage"][-1]]
        report = runner.run(cfg, progress=False)
        assert set(report.stage("toy_short").reasons) == {"drop_short:short", "drop_short:long"}
        assert "toy_short" in runner.known_stages()
    finally:
        runner._REGISTERED.pop("toy_short")


# ---------------------------------------------------------------------- resume


def test_resume_after_a_crash_redoes_only_unfinished_shards(tmp_path, setup):
    clean = runner.run(config(tmp_path, "clean"), progress=False)
    armed = tmp_path / "armed"
    armed.touch()
    trap = {"at": "d0170", "armed": str(armed)}  # in input shard 4 of 6 (documents 160-199)
    cfg = config(tmp_path, "crashed", trap=trap)
    with pytest.raises(RuntimeError, match="trap sprung"):
        runner.run(cfg, progress=False)
    folder = tmp_path / "crashed" / "04_toy_stages_Trap"
    finished = {p.name: p.stat() for p in folder.glob("*.done.json")}
    assert sorted(finished) == [f"shard_{j:05d}.done.json" for j in range(4)]
    resumed = runner.run(cfg, progress=False)
    for name, before in finished.items():  # finished shards were not written again
        after = (folder / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert resumed.stage("toy_stages:Trap").reused == 4 and resumed.stage("toy_stages:DropShort").reused == 6
    assert counts(resumed) == counts(clean)
    assert outputs(tmp_path / "crashed") == outputs(tmp_path / "clean")
    again = runner.run(cfg, progress=False)  # a finished run: everything reused, nothing recomputed
    assert all(s.reused == s.shards for s in again.stages) and counts(again) == counts(clean)


def test_resume_after_sigkill(tmp_path, setup):
    """The command line killed mid-way (SIGKILL: no cleanup at all), then run again, equals an uninterrupted run."""
    armed = tmp_path / "armed"
    trap = {"at": "d0130", "armed": str(armed), "kill": True}
    cfg_clean, cfg = config(tmp_path, "clean", trap=trap), config(tmp_path, "killed", trap=trap)
    runner.run(cfg_clean, progress=False)  # not armed: runs through
    toml = tmp_path / "killed.toml"
    toml.write_text(_to_toml(cfg))
    armed.touch()
    command = [sys.executable, "-m", "llmbook.pipeline", "run", str(toml), "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == -9, first.stderr  # killed
    assert not (tmp_path / "killed" / "report.json").exists()
    finished = sorted(p.name for p in (tmp_path / "killed" / "04_toy_stages_Trap").glob("*.done.json"))
    assert finished == [f"shard_{j:05d}.done.json" for j in range(3)]
    second = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert {s["name"]: s["reused"] for s in report["stages"]}["toy_stages:Trap"] == 3
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "clean")
    assert not list((tmp_path / "killed").rglob(".*.tmp"))  # half-written files of the killed run are gone


def _to_toml(cfg: dict) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if k != "stage"]
    for stage in cfg["stage"]:
        lines.append("[[stage]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in stage.items()]
    return "\n".join(lines) + "\n"


def test_a_different_config_is_refused_unless_forced(tmp_path, setup):
    runner.run(config(tmp_path), progress=False)
    changed = config(tmp_path)
    changed["stage"][0]["min_words"] = 6
    with pytest.raises(ValueError, match=r"different pipeline config \(stages\[0\]\.options\.min_words: 4 before, 6"):
        runner.run(changed, progress=False)
    before = json.loads((tmp_path / "out" / "report.json").read_text())["stages"][1]
    report = runner.run(changed, force=True, progress=False)
    assert report.stage("toy_stages:DropShort").reused == 0
    assert report.stage("toy_stages:DropShort").docs_out < before["docs_out"]  # the new option took effect
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pipeline output folder"):
        runner.run(config(tmp_path, "other"), force=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"  # never deleted


# ---------------------------------------------------------------------- bad configs: one clear line


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["stage"].insert(0, {"name": "gopherr"}), "unknown stage 'gopherr'; known: html, langid"),
    (lambda c: c.update(input="/nowhere/in.jsonl"), "input file /nowhere/in.jsonl not found"),
    (lambda c: c["stage"][0].update(min_words="four"), "option min_words must be int, got str 'four'"),
    (lambda c: c["stage"][0].update(colour=3), "unknown option 'colour'"),
    (lambda c: c["stage"][3].update(kill="yes"), "option kill must be bool"),
    (lambda c: c["stage"].append({"name": "toy_stages:Upper"}), "must be the last stage"),
    (lambda c: c["stage"][-1].update(shard_size=3), "stage 'tokenize': unknown option 'shard_size'"),
    (lambda c: c.update(shard_docs=0), "shard_docs must be a positive integer"),
    (lambda c: c.update(colour=1), "unknown setting 'colour'"),
    (lambda c: c.update(stage=[]), "lists no stages"),
    (lambda c: c["stage"].insert(0, {"min_words": 3}), "stage 1 has no name"),
    (lambda c: c["stage"].insert(0, {"name": "nosuchmodule:Stage"}), "needs the module nosuchmodule"),
])
def test_bad_config_is_one_clear_line(tmp_path, setup, change, message):
    cfg = config(tmp_path)
    change(cfg)
    with pytest.raises(ValueError) as info:
        runner.run(cfg, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_command_line(tmp_path, setup, capsys):
    from llmbook.pipeline.__main__ import main

    toml = tmp_path / "p.toml"
    cfg = config(tmp_path)
    cfg["stage"].insert(1, {"name": "nope"})
    toml.write_text(_to_toml(cfg))
    assert main(["run", str(toml), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown stage 'nope'; known:") and err.count("\n") == 1
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["stages"]) == 0 and "near_dedup" in capsys.readouterr().out
    assert main(["example"]) == 0
    example = runner.PipelineConfig.from_dict(__import__("tomllib").loads(capsys.readouterr().out))
    assert [s.name for s in example.stages][-1] == "tokenize" and example.corpus == {"n_docs": 10000, "seed": 0}
    assert {s.name for s in example.stages} <= set(runner.known_stages())
    runner.run(config(tmp_path, "ok"), progress=False)
    assert main(["verify", str(tmp_path / "ok" / "tokens")]) == 0
    assert "shards OK (bpe-257, uint16): train" in capsys.readouterr().out
    shard = tmp_path / "ok" / "tokens" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    assert main(["verify", str(tmp_path / "ok" / "tokens")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard}: truncated") and err.count("\n") == 1



def test_invalid_utf8_and_bad_lines_are_counted_not_fatal(tmp_path, setup):
    with open(tmp_path / "in.jsonl", "ab") as f:
        f.write(b'{"id": "bad-utf8", "text": "caf\xe9 ol\xe9 the king and the queen speak"}\n')
        f.write(b"this line is not json\n")
        f.write(b'{"id": "empty", "text": ""}\n')
    report = runner.run(config(tmp_path), progress=False)
    read = report.stage("read")
    assert read.docs_out == len(setup) + 2 and read.reasons == {"read:bad_line": 1}
    assert read.extra == {"invalid_utf8_repaired": 1}
    kept = {d.id: d.text for d in report.kept()}
    assert kept["bad-utf8"] == "CAF\ufffd OL\ufffd THE KING AND THE QUEEN SPEAK" and "empty" not in kept


def test_corpus_input_and_a_bad_corpus_setting(tmp_path, setup):
    cfg = config(tmp_path)
    del cfg["input"]
    cfg["corpus"] = {"n_docs": "many"}
    with pytest.raises(ValueError, match="corpus: option n_docs must be int, got str 'many'"):
        runner.run(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    cfg["corpus"] = {"n_docs": 120, "seed": 3}
    report = runner.run(cfg, progress=False)
    assert report.docs_in == 120 and report.stage("read").shards == 3
    first = [d.id for d in report.kept()]
    from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus

    ids = [d.id for d in make_corpus(CorpusConfig(n_docs=120, seed=3))]
    assert first == [i for i in ids if i in set(first)] and len(first) > 0


def test_every_registered_name_is_a_stage():
    from llmbook.pipeline.stage import Stage

    for name in runner.REGISTRY:
        target = runner.stage_class(name)
        assert name == "tokenize" or (isinstance(target, type) and issubclass(target, Stage)), name
    assert runner.stage_class("tokenize") is shards.write_shards
