"""The book's own multiple-choice task, built from text no book model trained on, written as an lm-eval task.

"Which continuation is the real one?" A passage of held-out text is the
context; the gold choice is the line (Shakespeare) or sentence (Austen) that
really comes next; three distractors are other held-out lines or sentences of
about the same length, drawn with a seeded generator. A model that has learned
the language scores the true continuation higher more often than chance (25%).

    >>> items = continuation_items("shakespeare", n=200)            # doctest: +SKIP
    >>> write_task(items, "tasks", "book_next_line", delimiter="\\n")  # doctest: +SKIP

Why held-out text, and which: every book model trained on the first 90% of
its text (``loader.split_text``; "shakespeare" on the raw Tiny Shakespeare
file, "english" on each source with its outer newlines stripped, a split
point a character or two away). ``held_out_text`` starts after the later of
those split points, at the next line, so no item comes from text a model
saw. ``contamination.py`` checks this against the training text n-gram by
n-gram.

Why the lengths of the distractors match the gold's: a choice's summed
log-likelihood falls with its length, so a short distractor would win on
length alone (that is what ``acc_norm`` corrects, and with matched lengths
``acc`` and ``acc_norm`` measure the same thing).

The task file is lm-eval's own format (a YAML next to a JSONL file read by
``datasets``' json builder), so ``lm_eval`` runs it offline, and the book's
scorer (``multiple_choice.score_items``) reads the same items.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from llmbook import data
from llmbook.evaluation.multiple_choice import MCItem
from llmbook.loader import split_text

SOURCES = {"shakespeare": "tinyshakespeare", "austen": "pride_and_prejudice"}
# the separator between context and choice in the text, lm-eval's ``target_delimiter``: a play's next line starts
# on a new line; a novel's next sentence follows a space
DELIMITERS = {"shakespeare": "\n", "austen": " "}
KINDS = ("lines", "swapped", "shuffled")  # what the distractors are: see continuation_items
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.")  # a full stop that does not end an Austen sentence


def held_out_text(source: str, val_fraction: float = 0.1) -> str:
    """The end of a book that no book model trained on, starting at a whole line.

    ``source`` is "shakespeare" or "austen". The split point is the later of
    the raw file's (``prepare_data`` on one file) and the stripped text's
    (``loader.mixture_split``, the "english" model's), in the raw text's
    coordinates; the partial line it falls in is skipped.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    text = data.read_text(SOURCES[source])
    raw_start = len(text) - len(split_text(text, val_fraction)[1])
    stripped = text.strip("\n")
    lead = len(text) - len(text.lstrip("\n"))
    mixture_start = lead + len(stripped) - len(split_text(stripped, val_fraction)[1])
    start = max(raw_start, mixture_start)
    newline = text.find("\n", start)
    return text[newline + 1:] if newline >= 0 else ""


def _pick(rng: random.Random, candidates: list[int], n: int, what: str) -> list[int]:
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if n > len(candidates):
        raise ValueError(f"asked for {n} items but the held-out text has only {len(candidates)} usable {what}: "
                         "ask for fewer")
    return sorted(rng.sample(candidates, n))


def _distractors(rng: random.Random, gold: str, pool: Sequence[str], avoid: str, k: int) -> list[str]:
    """k distinct texts from ``pool`` within 20% (at least 5 characters) of the gold's length, none in ``avoid``."""
    slack = max(5, len(gold) // 5)
    seen = {gold.lower()}
    similar = []
    for text in pool:
        if abs(len(text) - len(gold)) <= slack and text.lower() not in seen and text not in avoid:
            seen.add(text.lower())
            similar.append(text)
    if len(similar) < k:
        raise ValueError(f"too few held-out texts of about {len(gold)} characters for {k} distractors")
    return rng.sample(similar, k)


def _shuffled(rng: random.Random, gold: str, k: int) -> list[str]:
    """k distinct orders of the gold's words, none the original: the same words, so only word order tells."""
    tokens = gold.split()
    seen, out = {gold}, []
    for _ in range(200):
        candidate = " ".join(rng.sample(tokens, len(tokens)))
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
            if len(out) == k:
                return out
    raise ValueError(f"the line {gold!r} has too few word orders for {k} distractors")


def _swapped(rng: random.Random, gold: str, k: int) -> list[str]:
    """k copies of the gold, each with one pair of neighbouring words swapped (k different pairs)."""
    tokens = gold.split()
    out: list[str] = []
    for i in rng.sample(range(len(tokens) - 1), len(tokens) - 1):  # the pairs in a random order, until k differ
        swapped = [*tokens[:i], tokens[i + 1], tokens[i], *tokens[i + 2:]]
        if swapped != tokens and " ".join(swapped) not in out and len(out) < k:
            out.append(" ".join(swapped))
    if len(out) < k:
        raise ValueError(f"the line {gold!r} has too few distinct swaps for {k} distractors")
    return out


def _enough_variants(gold: str, k: int, kind: str) -> bool:
    """Whether ``gold`` has ``k`` distinct distractors of ``kind`` ("Sound, sound, sound, sound!" has 2 swaps, not 3).

    Checked before items are drawn, so a line that cannot make an item is never picked.
    """
    tokens = gold.split()
    if kind == "swapped":
        swaps = {" ".join([*tokens[:i], tokens[i + 1], tokens[i], *tokens[i + 2:]]) for i in range(len(tokens) - 1)}
        return len(swaps - {" ".join(tokens)}) >= k
    if kind == "shuffled":
        return len(set(tokens)) >= 3 or (len(set(tokens)) == 2 and len(tokens) >= 4)  # 3 distinct words: 5 orders
    return True


def _item(rng: random.Random, item_id: str, context: str, gold: str, pool: Sequence[str], n_choices: int,
          kind: str = "lines") -> MCItem:
    if kind == "swapped":
        choices = _swapped(rng, " ".join(gold.split()), n_choices - 1)
    elif kind == "shuffled":
        choices = _shuffled(rng, " ".join(gold.split()), n_choices - 1)
    else:
        choices = _distractors(rng, gold, pool, context, n_choices - 1)
    answer = rng.randrange(n_choices)
    choices.insert(answer, gold)
    return MCItem(item_id, context, tuple(choices), answer)


def _shakespeare_items(n: int, seed: int, context_chars: int, n_choices: int, kind: str) -> list[MCItem]:
    lines = held_out_text("shakespeare").split("\n")

    def spoken(i: int) -> bool:  # a line of a speech, not a "SPEAKER:" heading nor a blank
        line = lines[i]
        return bool(line.strip()) and not (line.endswith(":") and (i == 0 or not lines[i - 1].strip()))

    pool = [lines[i] for i in range(len(lines)) if spoken(i) and 20 <= len(lines[i]) <= 80]
    # a gold line continues a speech (the line before it is text, not a blank) and has a few lines of context
    candidates = [i for i in range(8, len(lines)) if spoken(i) and 20 <= len(lines[i]) <= 80 and lines[i - 1].strip()
                  and len(lines[i].split()) >= 4 and _enough_variants(lines[i], n_choices - 1, kind)]
    rng = random.Random(f"{seed}:shakespeare")
    items = []
    for i in _pick(rng, candidates, n, "lines"):
        first = i - 1
        while first > 0 and len("\n".join(lines[first - 1:i])) <= context_chars:
            first -= 1
        context = "\n".join(lines[first:i]).strip()
        items.append(_item(rng, f"shakespeare-{i}", context, lines[i], pool, n_choices, kind))
    return items


def _sentences(paragraph: str) -> list[tuple[int, str]]:
    """(start offset, sentence unwrapped to single spaces) for each sentence of a raw paragraph."""
    out, start = [], 0
    for match in re.finditer(r"(?<=[.!?])[\"']?(\s+)", paragraph):
        piece = paragraph[start:match.start(1)]
        if not piece.endswith(_ABBREVIATIONS):
            out.append((start, " ".join(piece.split())))
            start = match.end()
    if paragraph[start:].strip():
        out.append((start, " ".join(paragraph[start:].split())))
    return out


def _austen_items(n: int, seed: int, context_chars: int, n_choices: int, kind: str) -> list[MCItem]:
    text = held_out_text("austen")
    # (offset in text, sentence, mid-paragraph?) for every sentence; chapter headings are not sentences
    sentences: list[tuple[int, str, bool]] = []
    for match in re.finditer(r"\S(?:.|\n(?!\s*\n))*", text):
        if match.group().startswith("Chapter "):
            continue
        for k, (offset, sentence) in enumerate(_sentences(match.group())):
            sentences.append((match.start() + offset, sentence, k > 0))
    pool = [s for _, s, _ in sentences if 30 <= len(s) <= 150]
    candidates = [j for j, (offset, s, mid) in enumerate(sentences) if mid and 30 <= len(s) <= 150
                  and offset >= context_chars and _enough_variants(s, n_choices - 1, kind)]
    rng = random.Random(f"{seed}:austen")
    items = []
    for j in _pick(rng, candidates, n, "sentences"):
        offset, sentence, _ = sentences[j]
        before = text[:offset].rstrip()
        cut = len(before) - context_chars
        context = before[before.find(" ", cut) + 1:] if cut > 0 else before  # start at a word
        items.append(_item(rng, f"austen-{offset}", context.lstrip(), sentence, pool, n_choices, kind))
    return items


def continuation_items(source: str = "shakespeare", n: int = 200, seed: int = 0, context_chars: int = 200,
                       n_choices: int = 4, kind: str = "lines") -> list[MCItem]:
    """``n`` "which continuation is the real one" items from a book's held-out text, the same on every machine.

    ``kind="lines"``: the distractors are other held-out lines (sentences) of
    about the gold's length, so the model must know what comes *next* here
    (hard for a small model: the book's models score near chance).
    ``kind="shuffled"``: the distractors are the gold's own words in other
    orders, so the model must know only what *English* looks like (the same
    characters: acc equals acc_norm). ``kind="swapped"``: each distractor is
    the gold with one pair of neighbouring words swapped, between the two.

    ``context_chars`` (about 200: ~90 tokens of the reference model's BPE, so
    context and choice fit its 128-token window) bounds the passage shown; it
    holds whole lines (Shakespeare) or starts at a word (Austen). Use
    ``DELIMITERS[source]`` as the separator when scoring or writing the task.
    """
    if n_choices < 2:
        raise ValueError(f"a multiple-choice item needs at least 2 choices, got n_choices={n_choices}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: 'lines' (other lines as distractors), 'swapped' (two neighbouring "
                         "words of the gold swapped) or 'shuffled' (the gold's words in any order)")
    if source == "shakespeare":
        return _shakespeare_items(n, seed, context_chars, n_choices, kind)
    if source == "austen":
        return _austen_items(n, seed, context_chars, n_choices, kind)
    raise ValueError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")


SPEAKER_DELIMITER = "\n\n"  # a speech starts after a blank line


def speaker_items(n: int = 200, seed: int = 0, context_chars: int = 200, n_choices: int = 4,
                  nearby: int = 30) -> list[MCItem]:
    """``n`` "which speaker says this line" items from held-out Tiny Shakespeare.

    The context is the dialogue before a speech; each choice is a speaker's
    heading followed by the speech's real first line (``"GREMIO:\nGood
    morrow, neighbour Baptista."``), the same line in every choice, so only
    the name differs and the model must judge who would say it here. The
    distractors are other speakers of the same stretch of the play (among the
    ``nearby`` speeches around it) where there are enough, so a name that is
    simply frequent, or from another play, does not give the answer away.
    Score with ``delimiter=SPEAKER_DELIMITER``.
    """
    if n_choices < 2:
        raise ValueError(f"a multiple-choice item needs at least 2 choices, got n_choices={n_choices}")
    lines = held_out_text("shakespeare").split("\n")
    starts = [i for i in range(1, len(lines) - 1) if lines[i].endswith(":") and not lines[i - 1].strip()
              and lines[i + 1].strip() and len(lines[i]) > 1]
    names = [lines[i][:-1] for i in starts]
    candidates = [k for k, i in enumerate(starts) if i >= 8 and len(set(names) - {names[k]}) >= n_choices - 1]
    rng = random.Random(f"{seed}:speaker")
    items = []
    for k in _pick(rng, candidates, n, "speeches"):
        i, gold = starts[k], names[k]
        first = i - 1
        while first > 0 and len("\n".join(lines[first - 1:i - 1])) <= context_chars:
            first -= 1
        context = "\n".join(lines[first:i - 1]).strip()
        near = sorted(set(names[max(0, k - nearby // 2):k + nearby // 2 + 1]) - {gold})
        others = sorted(set(names) - {gold} - set(near))
        pick = rng.sample(near, min(len(near), n_choices - 1))
        pick += rng.sample(others, n_choices - 1 - len(pick))
        answer = rng.randrange(n_choices)
        pick.insert(answer, gold)
        items.append(MCItem(f"speaker-{i}", context, tuple(f"{name}:\n{lines[i + 1]}" for name in pick), answer))
    return items


def task_config(name: str, jsonl: Path, delimiter: str = " ") -> dict:
    """lm-eval's task YAML as a dict: a local JSONL test split, scored by log-likelihood of each choice.

    The fields name columns of the JSONL (``context``, ``choices``, ``gold``),
    so lm-eval reads them as they are, without a Jinja template that would
    have to quote Shakespeare's apostrophes.
    """
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(jsonl).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": delimiter,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def write_task(items: Sequence[MCItem], folder: str | Path, name: str, delimiter: str = " ") -> Path:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` (lm-eval's task format) into ``folder``; return the YAML's path.

    Load it with ``lm_eval.tasks.TaskManager(include_path=folder)`` and the
    task name ``name`` (``harness.run_task`` does). The JSONL's path in the
    YAML is absolute, so the task runs from any working directory.
    """
    if not items:
        raise ValueError("no items to write: an evaluation task needs at least one item")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"task name {name!r} must be letters, digits, '_' or '-' (it names files and the task)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{name}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for item in items:
            if not 0 <= item.gold < len(item.choices):
                raise ValueError(f"item {item.id!r}: gold {item.gold} is not an index of its {len(item.choices)} "
                                 "choices")
            record = {"id": item.id, "context": item.context, "choices": list(item.choices), "gold": item.gold}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task_config(name, jsonl, delimiter), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return path


def read_items(jsonl: str | Path) -> list[MCItem]:
    """The items of a task's JSONL file, as ``write_task`` wrote them."""
    items = []
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            items.append(MCItem(str(r["id"]), r["context"], tuple(r["choices"]), int(r["gold"])))
    return items
