"""Chapter 2's measurements: near-deduplication throughput and recall, ours against datasketch and datatrove.

    .venv/bin/python benchmarks/bench_pipeline.py                        # from the repository root: 100K documents
    .venv/bin/python benchmarks/bench_pipeline.py --docs 20000 --datatrove-docs 2000
    .venv/bin/python benchmarks/bench_pipeline.py --quick --out /tmp/p.json   # a smoke run of seconds

The corpus is ``dirty_corpus.make_corpus(CorpusConfig(n_docs=--docs, seed=0))``
with its planted exact and near duplicates (``metadata["dup_of"]``, true
5-gram Jaccard in ``metadata["jaccard"]``). Every method deduplicates the
same texts with the same parameters: word 5-grams, 14 bands x 8 rows = 112
permutations (FineWeb's), seed 1, no Jaccard verification, and is timed from
texts in memory to clusters:

* **ours**: ``lsh.NearDedup(verify=False)``: vectorized signatures, banding by
  sorting, union-find; with 1 worker and with ``--workers`` processes.
* **datasketch**: ``text.word_shingles`` per document, ``MinHash.generator``
  (its fast path: permutations drawn once), ``MinHashLSH(params=(14, 8))``
  filled with an insertion session, one ``query`` per document, union-find.
* **datatrove**: its four-step MinHash pipeline (``MinhashDedupSignature`` ->
  ``MinhashDedupBuckets`` -> ``MinhashDedupCluster`` -> ``MinhashDedupFilter``)
  under ``LocalPipelineExecutor`` in a temporary folder, the corpus split in
  ``--workers`` JSONL files read by a small reader (datatrove's ``JsonlReader``
  needs ``orjson``, not installed). SHA-1 64-bit shingle hashes: the default
  xxhash fails with xxhash 4.1 ("Strings must be encoded before hashing").
  Its word tokenizer is spaCy's, about 100x slower than a regex here, so it
  runs on the first ``--datatrove-docs`` documents, and ours and datasketch
  are timed on the same subset too.

Recall: the fraction of planted (original, copy) pairs that end in one
cluster, by true-Jaccard bin, beside the S-curve's 1 - (1 - s^r)^b (the
chance that LSH makes the pair a candidate; clustering can only add).
Precision: the fraction of LSH's edges whose true Jaccard is >= 0.7 (the
S-curve's step is at 0.72) and >= 0.5. With ``llmbook.pipeline.runner``
present, an end-to-end section runs the book's pipeline on the corpus.
Timings are wall-clock on a machine shared with other work: the load average
is recorded. Results go to benchmarks/results/pipeline.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pipeline.json"
BANDS, ROWS, NGRAM, SEED = 14, 8, 5, 1

_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import numpy as np  # noqa: E402

from llmbook.pipeline import text  # noqa: E402
from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus  # noqa: E402
from llmbook.pipeline.document import Document, write_jsonl  # noqa: E402
from llmbook.pipeline.lsh import (  # noqa: E402
    NearDedup,
    UnionFind,
    pair_precision,
    planted_pairs,
    recall_by_jaccard,
)
from llmbook.pipeline.minhash import s_curve  # noqa: E402


def say(line: str) -> None:
    print(line, flush=True)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.1f} GB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory": memory, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("numpy", "datasketch", "datatrove", "spacy", "xxhash"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of its finished children (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self_mb": round(own, 1), "largest_child_mb": round(children, 1)}


# ---------------------------------------------------------------------------------------------- the three methods


def run_ours(docs: list[Document], workers: int) -> dict:
    stage = NearDedup(bands=BANDS, rows=ROWS, n=NGRAM, seed=SEED, verify=False, workers=workers)
    start = time.perf_counter()
    stage.fit(docs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "clusters": stage.clusters, "edges": stage.edges}


def run_datasketch(docs: list[Document]) -> dict:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    shingles = ([s.encode("utf-8") for s in text.word_shingles(d.text, NGRAM)] for d in docs)
    lsh = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    sketches = []
    with lsh.insertion_session() as session:
        for i, m in enumerate(MinHash.generator(shingles, num_perm=BANDS * ROWS, seed=SEED)):
            session.insert(i, m)
            sketches.append(m)
    uf = UnionFind(len(docs))
    edges = []
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if j != i and uf.union(i, j):
                edges.append((min(i, j), max(i, j)))
    clusters = uf.roots()
    return {"seconds": time.perf_counter() - start, "clusters": clusters,
            "edges": np.array(edges, dtype=np.int64).reshape(-1, 2)}


class _Reader:
    """datatrove pipeline step: rank k reads part k of the corpus (stdlib JSON; JsonlReader needs orjson)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document as DatatroveDocument

        from llmbook.pipeline.document import read_jsonl

        for doc in read_jsonl(Path(self.folder) / f"part{rank}.jsonl"):
            yield DatatroveDocument(text=doc.text, id=doc.id, metadata={})


class _Drain:
    """datatrove pipeline step: consume the kept documents (the filter's output) without writing them."""

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        for _ in data:
            pass


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (this process's and its children's stderr) to ``path``; its tail is shown on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            print(path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_datatrove(docs: list[Document], workers: int) -> dict:
    """datatrove's four MinHash steps on ``workers`` parts of the corpus; clusters read from its .clusters files."""
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_datatrove_"))
    try:
        parts = np.array_split(np.arange(len(docs)), workers)
        for k, idx in enumerate(parts):
            write_jsonl([docs[i] for i in idx.tolist()], tmp / "in" / f"part{k}.jsonl")
        cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=SEED,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))
        steps = {
            "signatures": ([_Reader(str(tmp / "in")), MinhashDedupSignature(str(tmp / "sigs"), config=cfg)], workers),
            "buckets": ([MinhashDedupBuckets(str(tmp / "sigs"), str(tmp / "buckets"), config=cfg)], BANDS),
            "cluster": ([MinhashDedupCluster(str(tmp / "buckets"), str(tmp / "remove"), config=cfg,
                                             save_cluster_id=True)], 1),
            "filter": ([_Reader(str(tmp / "in")), MinhashDedupFilter(str(tmp / "remove")), _Drain()], workers),
        }
        seconds = {}
        for name, (pipeline, tasks) in steps.items():
            start = time.perf_counter()
            with _stderr_to(tmp / "datatrove.log"):  # every task of every step logs at INFO, from its own process
                LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                      logging_dir=str(tmp / f"logs_{name}"), skip_completed=False).run()
            seconds[name] = round(time.perf_counter() - start, 2)
        # the .clusters files hold (document index in its part, cluster id) for every document in a cluster
        clusters = np.arange(len(docs))
        for k, idx in enumerate(parts):
            path = tmp / "remove" / f"{k:06d}.clusters"
            if path.is_file():
                raw = path.read_bytes()
                for doc, cluster in struct.iter_unpack("<II", raw):
                    clusters[idx[doc]] = -1 - cluster
        # name each cluster by its first member, as ours and datasketch do
        first: dict[int, int] = {}
        for i, c in enumerate(clusters.tolist()):
            if c < 0:
                clusters[i] = first.setdefault(c, i)
        return {"seconds": sum(seconds.values()), "steps_seconds": seconds, "clusters": clusters, "edges": None}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- measures


def recall_summary(docs: list[Document], clusters: np.ndarray) -> dict:
    pairs = planted_pairs(docs)
    jac = np.array([p[2] for p in pairs])
    found = np.array([clusters[i] == clusters[j] for i, j, _ in pairs], dtype=bool)

    def frac(mask: np.ndarray) -> float | None:
        return round(float(found[mask].mean()), 4) if mask.any() else None

    return {"planted_pairs": len(pairs), "recall_all": frac(jac >= 0), "recall_jaccard_ge_0.8": frac(jac >= 0.8),
            "recall_jaccard_ge_0.9": frac(jac >= 0.9), "recall_jaccard_lt_0.5": frac(jac < 0.5),
            "documents_removed": int((clusters != np.arange(len(clusters))).sum())}


def describe(docs: list[Document], result: dict, label: str) -> dict:
    n = len(docs)
    out = {"documents": n, "seconds": round(result["seconds"], 2), "docs_per_second": round(n / result["seconds"], 1),
           **recall_summary(docs, result["clusters"])}
    if result.get("steps_seconds"):
        out["steps_seconds"] = result["steps_seconds"]
    if result.get("edges") is not None:
        texts = [d.text for d in docs]
        out["edges"] = len(result["edges"])
        out["precision_jaccard_ge_0.7"] = pair_precision(texts, result["edges"], 0.7, NGRAM)
        out["precision_jaccard_ge_0.5"] = pair_precision(texts, result["edges"], 0.5, NGRAM)
    say(f"  {label:<22} {n:>7} docs {out['seconds']:>8.1f} s {out['docs_per_second']:>9.0f} docs/s  "
        f"recall (J>=0.8) {out['recall_jaccard_ge_0.8']}  removed {out['documents_removed']}")
    return out


def s_curve_table(docs: list[Document], clusters: np.ndarray) -> list[dict]:
    rows = recall_by_jaccard(docs, clusters, BANDS, ROWS,
                             bins=(0.0, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0))
    for row in rows:
        for key in ("recall", "s_curve"):
            row[key] = None if row[key] is None else round(row[key], 4)
    return rows


_E2E = """
import json, sys, threading, time, tomllib
from pathlib import Path

import psutil

from llmbook.pipeline import classifier, dirty_corpus, runner, toxicity

# The classifiers are trained before the clock starts, on a separate labelled corpus (as the chapter does and a
# real pipeline must): given a model, the quality and toxicity filters are per-page stages the workers share.
models = Path(sys.argv[2]).parent / "models"
models.mkdir(parents=True, exist_ok=True)
train = dirty_corpus.make_corpus(dirty_corpus.CorpusConfig(n_docs=5000, seed=1))
quality = classifier.train_quality_classifier(train, seed=0)[0].save(models / "quality.npz")
toxic = toxicity.train_toxicity_classifier(train, seed=0)[0].save(models / "toxicity.npz")
cfg = tomllib.loads(runner.EXAMPLE)
cfg.pop("corpus", None)
cfg.update(input=sys.argv[1], output=sys.argv[2], workers=int(sys.argv[3]))
for stage in cfg["stage"]:
    if stage["name"] in ("quality", "toxicity"):
        stage["model"] = str(quality if stage["name"] == "quality" else toxic)

# peak memory: this process's own (VmHWM) and, sampled twice a second, the largest worker's (the workers are
# children of the forkserver, itself a child of this process)
peak_worker = 0
done = threading.Event()
def watch():
    global peak_worker
    me = psutil.Process()
    while not done.wait(0.5):
        for child in me.children(recursive=True):
            try:
                peak_worker = max(peak_worker, child.memory_info().rss)
            except psutil.Error:
                pass
threading.Thread(target=watch, daemon=True).start()
start = time.perf_counter()
report = runner.run(cfg, progress=False)
seconds = time.perf_counter() - start
done.set()
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "self_mb": hwm_kb / 1024, "largest_child_mb": peak_worker / 2**20,
                  "report": report.to_dict()}, default=str))
"""


def end_to_end(corpus_path: Path, n_docs: int, workers: int, timeout: int) -> dict:
    """The book's whole pipeline (``runner.EXAMPLE``'s stages) on the corpus, in a fresh process for its memory."""
    if importlib.util.find_spec("llmbook.pipeline.runner") is None:
        return {"skipped": "llmbook.pipeline.runner not available yet"}
    out_dir = Path(tempfile.mkdtemp(prefix="bench_pipeline_e2e_"))
    env = {**os.environ}
    env.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))
    try:
        proc = subprocess.run([sys.executable, "-c", _E2E, str(corpus_path), str(out_dir / "run"), str(workers)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if proc.returncode != 0:
            return {"failed": proc.stderr[-2000:]}
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"documents": n_docs, "workers": workers, "seconds": round(got["seconds"], 1),
                "docs_per_second": round(n_docs / got["seconds"], 1),
                "peak_rss": {"runner_process_mb": round(got["self_mb"], 1),
                             "largest_worker_mb": round(got["largest_child_mb"], 1)},
                "stages": "runner.EXAMPLE's, input the corpus JSONL (its building not counted); quality and toxicity "
                          "classifiers trained beforehand on a separate 5,000-page corpus (seed 1), not timed",
                "report": got["report"]}
    except subprocess.TimeoutExpired:
        return {"failed": f"did not finish in {timeout} s"}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- main


def only_end_to_end(args: argparse.Namespace, docs: list[Document]) -> int:
    corpus_path = Path(tempfile.mkdtemp(prefix="bench_pipeline_corpus_")) / "corpus.jsonl"
    try:
        write_jsonl(docs, corpus_path)
        say(f"end to end: the book's pipeline on {len(docs)} documents, load {load_average()}")
        section = {"date": now(), "load_average_before": load_average(),
                   **end_to_end(corpus_path, len(docs), args.workers, args.e2e_timeout),
                   "load_average_after": load_average()}
    finally:
        shutil.rmtree(corpus_path.parent, ignore_errors=True)
    say(f"  {json.dumps({k: v for k, v in section.items() if k != 'report'})}")
    result = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    result["end_to_end"] = section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000, help="corpus size for ours and datasketch")
    parser.add_argument("--datatrove-docs", type=int, default=10_000, help="the subset datatrove runs on")
    parser.add_argument("--workers", type=int, default=2, help="processes for ours and datatrove")
    parser.add_argument("--quick", action="store_true", help="a tiny run (1,500 docs, datatrove on 300)")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--only-end-to-end", action="store_true",
                        help="build the corpus, run only the end-to-end section, replace it in --out's file")
    parser.add_argument("--e2e-timeout", type=int, default=1200, help="seconds before the end-to-end run is stopped")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.datatrove_docs = 1_500, 300
    args.datatrove_docs = min(args.datatrove_docs, args.docs)
    started, start_load = time.perf_counter(), load_average()
    result: dict = {"date": now(), "machine": machine(), "versions": versions(),
                    "shared_machine": "wall-clock timings on a 2-core machine shared with other work: compare them "
                                      "with the load averages recorded",
                    "load_average_at_start": start_load,
                    "settings": {"docs": args.docs, "datatrove_docs": args.datatrove_docs, "workers": args.workers,
                                 "bands": BANDS, "rows": ROWS, "num_perm": BANDS * ROWS, "ngram": NGRAM,
                                 "seed": SEED, "verify": False, "corpus": "make_corpus(CorpusConfig(n_docs, seed=0))",
                                 "s_curve_step": round((1 / BANDS) ** (1 / ROWS), 4)}}

    say(f"building the corpus: {args.docs} documents")
    t = time.perf_counter()
    docs = make_corpus(CorpusConfig(n_docs=args.docs, seed=0))
    result["corpus_seconds"] = round(time.perf_counter() - t, 1)
    result["corpus_planted_pairs"] = len(planted_pairs(docs))

    if args.only_end_to_end:
        return only_end_to_end(args, docs)

    say(f"\nfull corpus ({args.docs} documents), load {load_average()}")
    full = {}
    ours_w = run_ours(docs, args.workers)
    full[f"ours_{args.workers}_workers"] = describe(docs, ours_w, f"ours, {args.workers} workers")
    full["ours_1_worker"] = describe(docs, run_ours(docs, 1), "ours, 1 worker")
    ds = run_datasketch(docs)
    full["datasketch"] = describe(docs, ds, "datasketch")
    full["ratio_ours_to_datasketch"] = {
        f"{args.workers}_workers": round(full[f"ours_{args.workers}_workers"]["docs_per_second"]
                                         / full["datasketch"]["docs_per_second"], 2),
        "1_worker": round(full["ours_1_worker"]["docs_per_second"] / full["datasketch"]["docs_per_second"], 2)}
    full["same_clusters_ours_and_datasketch"] = float((ours_w["clusters"] == ds["clusters"]).mean())
    full["load_average_after"] = load_average()
    result["full"] = full
    say(f"  ours / datasketch: {full['ratio_ours_to_datasketch']}")

    result["s_curve"] = {"ours": s_curve_table(docs, ours_w["clusters"]),
                         "datasketch": s_curve_table(docs, ds["clusters"]),
                         "theory_points": [{"jaccard": s, "p_candidate": round(float(s_curve(s, BANDS, ROWS)), 4)}
                                           for s in np.round(np.linspace(0, 1, 21), 2).tolist()]}
    say("  S-curve (ours): " + ", ".join(f"[{r['jaccard_lo']}, {r['jaccard_hi']}) {r['recall']} vs {r['s_curve']}"
                                         for r in result["s_curve"]["ours"] if r["pairs"]))

    if not args.skip_datatrove:
        sub = docs[: args.datatrove_docs]
        say(f"\nsubset ({len(sub)} documents) with datatrove, load {load_average()}")
        subset = {f"ours_{args.workers}_workers": describe(sub, run_ours(sub, args.workers),
                                                          f"ours, {args.workers} workers"),
                  "datasketch": describe(sub, run_datasketch(sub), "datasketch"),
                  "datatrove": describe(sub, run_datatrove(sub, args.workers), f"datatrove, {args.workers} workers")}
        subset["load_average_after"] = load_average()
        result["subset_with_datatrove"] = subset

    corpus_path = Path(tempfile.mkdtemp(prefix="bench_pipeline_corpus_")) / "corpus.jsonl"
    try:
        write_jsonl(docs, corpus_path)
        if args.skip_end_to_end:
            result["end_to_end"] = {"skipped": "--skip-end-to-end"}
        else:
            say(f"\nend to end: the book's pipeline on {len(docs)} documents, load {load_average()}")
            result["end_to_end"] = end_to_end(corpus_path, len(docs), args.workers, args.e2e_timeout)
            say(f"  {json.dumps({k: v for k, v in result['end_to_end'].items() if k != 'report'})}")
    finally:
        shutil.rmtree(corpus_path.parent, ignore_errors=True)

    result["peak_rss"] = peak_rss_mb()
    result["load_average_at_end"] = load_average()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    say(f"\n{result['total_seconds']:.0f} s in all; load {start_load} at the start, "
        f"{result['load_average_at_end']} at the end -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
