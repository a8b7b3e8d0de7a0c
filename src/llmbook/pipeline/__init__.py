"""Chapter 2, the data pipeline: from messy documents to clean, deduplicated, tokenized shards.

One module per stage, in the order a document meets them:

- ``document``: the record every stage passes on (id, text, metadata), JSONL in and out, streaming.
- ``text``: the normalisation and word splitting the stages share (so "a word" means one thing).
- ``stage``: the two shapes a stage takes: a per-document ``Filter`` and a corpus-wide ``Stage`` with a first pass.
- ``dirty_corpus``: a "dirty web" corpus built from the book's text with every planted problem labelled.
- ``html``: HTML to text, boilerplate dropped (compared with trafilatura).
- ``gopher``, ``c4``, ``repetition``: the rule filters of Gopher and C4 (decisions equal to datatrove's).
- ``langid``: language identification (lingua, and a character n-gram classifier from scratch).
- ``exact_dedup``, ``minhash``: exact and near deduplication (MinHash + LSH, proven against datasketch).
- ``classifier``, ``toxicity``, ``pii``: hashed n-gram linear classifiers and PII masking.
- ``shards``: tokenize into fixed-size binary shards and stream batches from them (Chapter 7 trains on them).
- ``runner``: ``python -m llmbook.pipeline run <config.toml>`` chains the stages, reports, resumes.

The last stage tokenizes with Chapter 3's tokenizer; it imports ``llmbook.bpe`` there and only there.
"""
