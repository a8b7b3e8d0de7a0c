"""Contamination: which evaluation items share long word n-grams with the training text, item by item.

A model that trained on a test item can score it from memory, and its score
then says nothing about what it learned. The field's check is textual: an
item is suspect when long runs of its words also occur in the training data.

    >>> report = check_contamination(items, training_text("english"))   # doctest: +SKIP
    >>> print(report)                                                   # doctest: +SKIP
    >>> [r.id for r in report.items if r.contaminated]                  # doctest: +SKIP

Why n = 13 by default: it is GPT-3's choice (Brown et al. 2020, appendix C)
and what lm-eval's ``decontamination`` module uses: thirteen words in a row
almost never repeat by chance in English prose, while shorter n-grams do
("I do beseech your grace to" is 6 words of stock Shakespeare), so a shared
13-gram means shared text. Items here are ~40-word passages, so they hold
~30 13-grams; for short items (a one-line question) use a smaller n, e.g. 8,
and expect some chance matches.

Why a fraction and a threshold, not "any shared n-gram": GPT-3 called an item
dirty on a single shared 13-gram, which flags an item that quotes one famous
line. We report, per item, how many of its n-grams occur in the training
text and flag it when that fraction reaches ``threshold`` (default 0.5:
at least half the item is training text).

How: the items' n-grams go into a set of 64-bit hashes (small); the training
text is streamed once, chunk by chunk, hashing each of its n-grams and
keeping those in the set. Memory is the size of the evaluation set, not of
the training data, so the same code checks a gigabyte corpus read from disk.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmbook.evaluation.multiple_choice import MCItem

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")  # lower-cased words; "o'er" and "i'll" stay whole


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation, so line breaks, quotes and capitals do not hide a copy.

    >>> words("Good morrow, neighbour\\nGremio!  I'll go.")
    ['good', 'morrow', 'neighbour', 'gremio', "i'll", 'go']
    """
    return _WORD.findall(text.lower())


def ngram_hash(gram: Sequence[str]) -> int:
    """A stable 64-bit hash of an n-gram (the same in every process, unlike Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "little")


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Every run of ``n`` consecutive words; none if there are fewer than ``n``."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def item_text(item: MCItem | tuple[str, str], delimiter: str = " ") -> tuple[str, str]:
    """``(id, text)`` of an item: a multiple-choice item is its context followed by its gold choice."""
    if isinstance(item, MCItem):
        return item.id, item.context + delimiter + item.choices[item.gold]
    item_id, text = item
    return str(item_id), text


def _chunks(training: str | Path | Iterable[str]) -> Iterable[str]:
    """The training text piece by piece: a path is read line by line, a string through a StringIO, else as given."""
    if isinstance(training, Path):
        with training.open(encoding="utf-8") as f:
            yield from f
    elif isinstance(training, str):
        yield from io.StringIO(training)
    else:
        yield from training


def training_ngrams_in(wanted: set[int], training: str | Path | Iterable[str], n: int) -> tuple[set[int], int]:
    """The hashes of ``wanted`` that occur as n-grams of the streamed training text, and its number of words.

    A word cut between two chunks is joined back (the text after a chunk's
    last space waits for the next chunk), and the last ``n - 1`` words of a
    chunk start the next one's n-grams, so chunking never changes the answer.
    """
    found: set[int] = set()
    window: deque[str] = deque(maxlen=n)
    n_words = 0
    carry = ""
    for chunk in _chunks(training):
        text = carry + chunk
        cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
        text, carry = (text[:cut + 1], text[cut + 1:]) if cut >= 0 else ("", text)
        for word in words(text):
            window.append(word)
            n_words += 1
            if len(window) == n:
                h = ngram_hash(window)
                if h in wanted:
                    found.add(h)
    for word in words(carry):
        window.append(word)
        n_words += 1
        if len(window) == n and (h := ngram_hash(window)) in wanted:
            found.add(h)
    return found, n_words


@dataclass(frozen=True)
class ItemOverlap:
    """One item's overlap with the training text."""

    id: str
    ngrams: int  # distinct n-grams in the item
    overlapping: int  # how many of them occur in the training text
    fraction: float  # overlapping / ngrams (0 for an item shorter than n words)
    contaminated: bool  # fraction >= threshold (and at least one overlap)
    examples: tuple[str, ...]  # up to three overlapping n-grams, as text

    def __str__(self) -> str:
        flag = "CONTAMINATED" if self.contaminated else "clean"
        return f"{self.id}: {self.overlapping}/{self.ngrams} n-grams in training ({self.fraction:.0%}) {flag}"


@dataclass(frozen=True)
class ContaminationReport:
    """Per-item overlaps of an evaluation set with a training text."""

    n: int
    threshold: float
    training_words: int
    items: tuple[ItemOverlap, ...]

    @property
    def contaminated(self) -> list[str]:
        """The ids of the flagged items."""
        return [r.id for r in self.items if r.contaminated]

    @property
    def rate(self) -> float:
        """The fraction of items flagged."""
        return len(self.contaminated) / len(self.items)

    @property
    def mean_fraction(self) -> float:
        """The mean over items of the fraction of their n-grams found in the training text."""
        return sum(r.fraction for r in self.items) / len(self.items)

    @property
    def any_overlap(self) -> int:
        """How many items share at least one n-gram with the training text (GPT-3's "dirty")."""
        return sum(r.overlapping > 0 for r in self.items)

    def __str__(self) -> str:
        return (f"{len(self.contaminated)} of {len(self.items)} items contaminated ({self.n}-grams, flagged at "
                f">= {self.threshold:.0%} overlap); {self.any_overlap} share at least one {self.n}-gram; mean "
                f"overlap {self.mean_fraction:.2%}; {self.training_words:,} training words")


def check_contamination(items: Sequence[MCItem | tuple[str, str]], training: str | Path | Iterable[str],
                        n: int = 13, threshold: float = 0.5, delimiter: str = " ") -> ContaminationReport:
    """Per item, how many of its word ``n``-grams occur in ``training``; flag those at ``threshold`` or more.

    ``items`` are ``MCItem`` (checked as context + delimiter + gold choice, the
    text a model reads when it gets the item right) or ``(id, text)`` pairs.
    ``training`` is the text itself, a ``Path`` to a UTF-8 file (streamed by
    line) or any iterable of text chunks (streamed). One pass over it.
    """
    if not items:
        raise ValueError("no items to check: give at least one evaluation item")
    if n < 1:
        raise ValueError(f"n must be a positive number of words, got {n}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of an item's n-grams in (0, 1], got {threshold}")
    texts = [item_text(item, delimiter) for item in items]
    per_item: list[dict[int, tuple[str, ...]]] = []
    for _, text in texts:
        per_item.append({ngram_hash(g): g for g in ngrams(words(text), n)})
    wanted = set().union(*(set(grams) for grams in per_item))
    found, n_words = training_ngrams_in(wanted, training, n)
    out = []
    for (item_id, _), grams in zip(texts, per_item, strict=True):
        hits = [g for h, g in grams.items() if h in found]
        fraction = len(hits) / len(grams) if grams else 0.0
        out.append(ItemOverlap(item_id, len(grams), len(hits), fraction, bool(hits) and fraction >= threshold,
                               tuple(" ".join(g) for g in hits[:3])))
    return ContaminationReport(n, threshold, n_words, tuple(out))


def training_text(model: str = "english", val_fraction: float = 0.1) -> str:
    """The text a book model trained on: "shakespeare" (Tiny Shakespeare's first 90%) or "english" (the mixture's).

    The same split ``loader.prepare_data`` makes for the model's dataset.
    """
    from llmbook import data, loader

    if model == "shakespeare":
        return loader.split_text(data.read_text("tinyshakespeare"), val_fraction)[0]
    if model == "english":
        return loader.mixture_split("english", val_fraction)[0]
    raise ValueError(f"unknown model {model!r}: 'shakespeare' (the reference model) or 'english' (the base of "
                     "the post-trained models, which saw its text)")


def finetuning_text(name: str = "sft-full") -> str:
    """The text of an SFT model's fine-tuning conversations (Chapter 9's ``sft.conversations``, train split).

    Worth checking too: the verifiable task makes its prompts from lines of
    *both whole books*, so the post-trained models (SFT, and DPO and GRPO built
    on it) read lines from the books' held-out ends as instruction inputs.
    Measured on the book task (100 items per book): no item shares a 13-gram
    with this text, because its lines are 4-12 words long and a 13-gram cannot
    see them; with n = 8, 16 of the Shakespeare items and 40 of the Austen
    items share at least one. The choice of n decides what a check can find.
    """
    from llmbook.posttrain import sft

    if name not in sft.SFT_PRESETS:
        raise ValueError(f"unknown SFT model {name!r}: choose one of {', '.join(sft.SFT_PRESETS)}")
    conversations = sft.conversations(sft.SFT_PRESETS[name], "train")
    return "\n\n".join("\n".join(m.content for m in messages) for messages in conversations)
