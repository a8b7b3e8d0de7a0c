"""A verifiable instruction-following task: prompts made from the book's own text, answers a program checks exactly.

The Alpaca records of Chapter 9 teach a small model the *format* of an answer,
but nobody can say whether its answer to "Explain photosynthesis" is right. To
measure instruction following we need instructions whose answers a program can
grade, on text the model already knows (its pretraining text), so success
depends on following the instruction, not on knowledge it cannot have.

Four families, each made from one line of Tiny Shakespeare or one sentence of
*Pride and Prejudice* (the two books alternate, so each family is half and half):

    short_line     Write a line of no more than 6 words.          (no input)
                   -> any line of 3 to 6 words; the reference is a book line that short
    capitals       Write a line in capital letters.               (no input)
                   -> any line of 3 or more words, every letter a capital; the reference is a book line, upper-cased
    last_word      Write the last word of this line.              | good enough for him.
                   -> him
    word_in_limit  Write a line of at most 10 words that uses the word "Clarence".    (no input)
                   -> any line of 3 to 10 words with "Clarence" in it; the reference is the book's line,
                      "She better would have fitted me or Clarence:"

(the source line of last_word follows the "|").

They rise in difficulty for a model of a million parameters. short_line and
capitals ask for a *kind* of answer, which fine-tuning teaches as a habit
(stop early; write capitals). last_word and word_in_limit need a word *copied
from the prompt*, which needs attention that finds it, and a model this size
trained on two million tokens of text barely has that (Chapter 9 measures it:
a first design with three copying families stayed near 0% after SFT). So SFT
moves the first two far and the last two little, which leaves Chapter 10 room
to show what preference tuning and RL add on the same prompts.

Graded rewards, for Chapter 10. ``TaskItem.check(response)`` returns a score in
[0, 1] that is 1.0 exactly when the answer is right and in between for partial
answers, so G samples of the same prompt get different rewards (GRPO normalises
rewards within the group; a group of equal rewards teaches nothing) and a
passing and a failing sample make an on-policy preference pair for DPO:

- last_word scores the answer's words against the reference's with the
  longest common subsequence, ``LCS(answer, reference) / max(len(answer),
  len(reference))``: 1.0 only for the exact word, less for every extra word
  ("the last word is famish" scores 1/5);
- short_line gives 1.0 for 3 to N words, ``N / n`` for n > N words and
  ``n / 3`` below 3; capitals the fraction of words in capitals, times ``n / 3``
  below 3 words;
- word_in_limit gives 0.5 for using the word and 0.5 for a length of 3 to N words.

These check only their constraints, so "fortune fortune fortune" passes
word_in_limit and "THE THE THE" passes capitals: loopholes left on purpose, a
small case of reward hacking for Chapter 10 to look for in what RL teaches.

What counts as the answer (documented contract, tested): the text up to the
first special token (``<|endoftext|>``, ``<|im_end|>``, ``<|im_start|>``) that a
sampler may have left on it; words are the whitespace-separated pieces with
punctuation stripped from their ends (apostrophes kept: "'tis", "know't"), so
spaces, newlines and a final full stop never matter; case matters. Anything
else the model writes, such as a runaway "### Instruction:", is more words and
lowers the score.

Held-out means held-out lines: every distinct line (compared in lower case) is
assigned to train, validation or test by a hash of (seed, line), so no line of a
test prompt appears in any training prompt, and the test set does not change
when the training set grows. (All the lines are in the pretraining text: the
model has read them once as prose; it has never seen these instructions.)

Trivial baselines on ``make_task_split(0).test`` (400 prompts, 100 per family),
measured with this module: exact success, and mean score in brackets.

    answer given                    short_line  capitals    last_word  word_in_limit  all
    the input (echo)                0% (0.80)   0% (0.00)   0% (0.11)  0% (0.50)      0% [0.0%, 1.0%] (0.35)
    the whole prompt                0% (0.80)   0% (0.00)   0% (0.06)  0% (0.50)      0% [0.0%, 1.0%] (0.34)
    a training answer, same family  74% (0.94)  100% (1.00) 0% (0.00)  0% (0.40)      43.5% [38.7%, 48.4%] (0.59)
    nothing                         0% (0.00)   0% (0.00)   0% (0.00)  0% (0.00)      0% [0.0%, 1.0%] (0.00)

(the instruction is the echo of the families without input: it has more
words than any limit and is not in capitals). A model that repeats its
prompt passes nothing. One that answers every prompt of a family with the
same book line passes short_line and capitals: those two measure a habit, and
SFT is what teaches habits; the copying families measure more, and no
answer learned by heart passes them.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmbook.posttrain.templates import ALL_SPECIAL_TOKENS, Message

FAMILIES = ("short_line", "capitals", "last_word", "word_in_limit")
SOURCES = ("shakespeare", "austen")
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval

MIN_WORDS, MAX_WORDS = 4, 12  # source lines: long enough to be a line, short enough for a tiny model to copy
MAX_LIMIT = 10  # word_in_limit asks for at most 4..10 words; its instruction has 13, so echoing it fails
MAX_SHORT = 8  # short_line asks for at most 4..8 words; its instruction has 9, so echoing it fails
_PUNCT = "".join(c for c in "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~")  # stripped from word ends; not the apostrophe
# letters, light punctuation and hyphens inside words ("four-and-twenty"); no quotes, dashes, digits or brackets
_LINE = re.compile(r"[A-Za-z](?:[A-Za-z ,.;:!?']|(?<=[A-Za-z])-(?=[A-Za-z]))*")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.")  # a full stop that does not end an Austen sentence
_STOP = frozenset(
    "about after again also been before being came come could does doth each from have here hath into just know "
    "like made make many more most much must never only other over said same shall should some such than that "
    "their them then there these they thee thine this those thou through thus thy very upon were what when where "
    "which while whom will with would your yours".split()
)  # words too common to make "uses the word W" a real constraint


def clean_response(text: str) -> str:
    """The answer a checker grades: the text before the first special token, without surrounding whitespace.

    >>> clean_response("  IT IS A TRUTH\\n<|im_end|>\\n<|im_start|>user")
    'IT IS A TRUTH'
    """
    cut = min((i for i in (text.find(t) for t in ALL_SPECIAL_TOKENS) if i >= 0), default=len(text))
    return text[:cut].strip()


def words(text: str) -> list[str]:
    """Whitespace-separated words with punctuation stripped from their ends (not apostrophes); empty ones dropped.

    >>> words("What, ho!  Where is\\nthe duke? 'Tis -- late.")
    ['What', 'ho', 'Where', 'is', 'the', 'duke', "'Tis", 'late']
    """
    return [w for w in (piece.strip(_PUNCT) for piece in text.split()) if w]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence: ``lcs_length("abcd", "axcy") == 2`` ("ac")."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def sequence_score(answer: Sequence[str], reference: Sequence[str]) -> float:
    """``LCS / max(len(answer), len(reference))``: 1.0 iff equal; each missing, wrong or extra word costs."""
    longest = max(len(answer), len(reference))
    return lcs_length(answer, reference) / longest if longest else 1.0


@dataclass(frozen=True)
class TaskItem:
    """One prompt of the task, with its reference answer and everything its checker needs."""

    family: str  # one of FAMILIES
    instruction: str  # "Write the last word of this line."
    input: str  # the source line the instruction is about; "" for word_in_limit
    reference: str  # an answer that scores 1.0 (the SFT target)
    line: str  # the book's line the item was made from (disjoint between splits)
    source: str  # "shakespeare" or "austen"
    count: int = 0  # N of short_line and word_in_limit
    word: str = ""  # W of word_in_limit

    @property
    def prompt(self) -> str:
        """Instruction and input as one user message (ChatML); Alpaca shows them as two sections instead."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def messages(self, with_reference: bool = True) -> list[Message]:
        """The item as ``from_alpaca`` writes a record: instruction, [input], [reference answer]."""
        out = [Message("user", self.instruction)]
        if self.input:
            out.append(Message("user", self.input))
        if with_reference:
            out.append(Message("assistant", self.reference))
        return out

    def check(self, response: str) -> float:
        """The score of a response in [0, 1]; 1.0 means the instruction was followed exactly."""
        answer = words(clean_response(response))
        n = len(answer)
        if self.family == "word_in_limit":
            uses_word = self.word.lower() in (w.lower() for w in answer)
            return 0.5 * uses_word + 0.5 * (3 <= n <= self.count)
        if self.family == "short_line":
            return 1.0 if 3 <= n <= self.count else (self.count / n if n > self.count else n / 3)
        if self.family == "capitals":
            upper = sum(any(c.isalpha() for c in w) and w == w.upper() for w in answer)
            return upper / n * min(1.0, n / 3) if n else 0.0
        return sequence_score(answer, words(self.reference))

    def passed(self, response: str) -> bool:
        """Whether the response follows the instruction exactly (``check(response) == 1.0``)."""
        return self.check(response) == 1.0


# --- source lines from the two books ------------------------------------------------------------------------


def shakespeare_lines(text: str) -> list[str]:
    """The spoken lines of Tiny Shakespeare: every non-empty line except the "SPEAKER:" line opening a speech."""
    out, previous = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line and not (line.endswith(":") and previous == ""):
            out.append(line)
        previous = line
    return out


def austen_sentences(text: str) -> list[str]:
    """The sentences of a novel: paragraphs unwrapped, split after . ! ? (not after "Mr." and friends).

    Dialogue quotes and the underscores that mark _italics_ in Gutenberg's
    plain text are dropped: they are typography, not words.

    >>> austen_sentences('"It is a _truth_.  Mr. Darcy\\nsmiled! Did he?"\\n\\nYes.')
    ['It is a truth.', 'Mr. Darcy smiled!', 'Did he?', 'Yes.']
    """
    out = []
    for paragraph in re.split(r"\n\s*\n", re.sub(r'["_]', "", text)):
        pieces = re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split()))
        sentence = ""
        for piece in pieces:
            sentence = f"{sentence} {piece}" if sentence else piece
            if not sentence.endswith(_ABBREVIATIONS):
                out.append(sentence)
                sentence = ""
        if sentence:
            out.append(sentence)
    return [s for s in out if s]


def usable(line: str) -> bool:
    """A line we make prompts from: 4-12 words of letters and light punctuation, not all capitals."""
    return bool(_LINE.fullmatch(line)) and MIN_WORDS <= len(words(line)) <= MAX_WORDS and line != line.upper()


def source_lines() -> dict[str, list[str]]:
    """The usable distinct lines of each book, in book order: ``{"shakespeare": [...], "austen": [...]}``."""
    from llmbook import data

    books = {
        "shakespeare": shakespeare_lines(data.read_text("tinyshakespeare")),
        "austen": austen_sentences(data.read_text("pride_and_prejudice")),  # the body, without Gutenberg's license
    }
    out: dict[str, list[str]] = {}
    for source, lines in books.items():
        seen: set[str] = set()  # a line said twice ("My lord, my lord.") makes one item at most
        out[source] = []
        for line in lines:
            if usable(line) and line.lower() not in seen:
                seen.add(line.lower())
                out[source].append(line)
    return out


# --- items and splits -----------------------------------------------------------------------------------------


def _content_words(line: str) -> list[str]:
    return sorted({w for w in words(line) if w.isalpha() and len(w) >= 4 and w.lower() not in _STOP})


def fits(family: str, line: str) -> bool:
    """Whether a usable line can make an item of this family (short ones for short_line, capitals, word_in_limit)."""
    n = len(words(line))
    if family == "short_line":
        return n <= MAX_SHORT
    if family == "capitals":
        return n <= MAX_LIMIT
    if family == "word_in_limit":
        return n <= MAX_LIMIT and bool(_content_words(line))
    return family in FAMILIES


def make_item(family: str, line: str, source: str, rng: random.Random) -> TaskItem:
    """The ``family`` item made from ``line``; ``rng`` picks N and W."""
    w = words(line)
    if family in FAMILIES and not fits(family, line):
        raise ValueError(f"the line {line!r} cannot make a {family} item (too many words, or no content word)")
    if family == "short_line":
        limit = rng.randint(max(MIN_WORDS, len(w)), MAX_SHORT)
        return TaskItem(family, f"Write a line of no more than {limit} words.", "", line, line, source, limit)
    if family == "capitals":
        return TaskItem(family, "Write a line in capital letters.", "", line.upper(), line, source)
    if family == "last_word":
        return TaskItem(family, "Write the last word of this line.", line, w[-1], line, source)
    if family == "word_in_limit":
        limit = rng.randint(max(MIN_WORDS, len(w)), MAX_LIMIT)
        word = rng.choice(_content_words(line))
        instruction = f'Write a line of at most {limit} words that uses the word "{word}".'
        return TaskItem(family, instruction, "", line, line, source, limit, word)
    raise ValueError(f"unknown task family {family!r}; the families are {', '.join(FAMILIES)}")


def split_of(line: str, seed: int) -> str:
    """The split a line belongs to: "test" for 10% of lines, "val" for 5%, by a hash of (seed, line in lower case)."""
    bucket = int(hashlib.sha256(f"{seed}:{line.lower()}".encode()).hexdigest(), 16) % 20
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def make_items(pool: dict[str, list[str]], n: int, rng: random.Random) -> list[TaskItem]:
    """``n`` items from ``pool`` (lines per source): families in turn, sources in turn, each line used once.

    Tiny Shakespeare has about ten times as many usable lines as *Pride and
    Prejudice* has short sentences, so when a family runs out of Austen lines
    (large training sets), its remaining items come from Shakespeare.
    """
    order = {s: rng.sample(lines, len(lines)) for s, lines in pool.items()}
    at = {(s, f): 0 for s in order for f in FAMILIES}  # next candidate line per (source, family)
    used: set[str] = set()
    items = []
    for i in range(n):
        family, turn = FAMILIES[i % len(FAMILIES)], (i // len(FAMILIES)) % len(SOURCES)
        for source in SOURCES[turn:] + SOURCES[:turn]:  # this item's book first, the other if it has run out
            lines, j = order[source], at[source, family]
            while j < len(lines) and (lines[j] in used or not fits(family, lines[j])):
                j += 1
            at[source, family] = j + 1
            if j < len(lines):
                break
        else:
            raise ValueError(f"ran out of lines for {family} after {len(items)} of {n} items; ask for fewer items")
        used.add(lines[j])
        items.append(make_item(family, lines[j], source, rng))
    return items


@dataclass(frozen=True)
class TaskSplit:
    """Train, validation and test items; no line of one split is in another."""

    train: list[TaskItem]
    val: list[TaskItem]
    test: list[TaskItem]
    seed: int


def make_task_split(seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 400) -> TaskSplit:
    """The task's splits, the same for the same arguments on every machine (hashes and seeded ``random``).

    Each split's items come only from its own lines (``split_of``), so the
    test set depends on ``seed`` and ``n_test`` alone. The book uses seed 0
    with 400 test prompts (100 per family: an interval of about +-10 points
    per family, +-5 overall).
    """
    if min(n_train, n_val, n_test) < 0:
        raise ValueError(f"split sizes must be >= 0, got train={n_train}, val={n_val}, test={n_test}")
    pools: dict[str, dict[str, list[str]]] = {name: {s: [] for s in SOURCES} for name in ("train", "val", "test")}
    for source, lines in source_lines().items():
        for line in lines:
            pools[split_of(line, seed)][source].append(line)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    made = {name: make_items(pools[name], sizes[name], random.Random(f"{seed}:{name}")) for name in sizes}
    return TaskSplit(made["train"], made["val"], made["test"], seed)


# --- success rate with a confidence interval ----------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a success probability from ``successes`` out of ``n`` (Wilson 1927).

    With p = successes / n:

        center    = (p + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        interval  = [center - halfwidth, center + halfwidth]

    Unlike the textbook p +- z sqrt(p(1-p)/n) it never leaves [0, 1] and is not
    zero-width at 0 or n successes, which matters for a base model at 0%:
    ``wilson_interval(0, 400)`` is (0, 0.0095), not (0, 0). z = 1.96 gives 95%.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class TaskScore:
    """Exact-success rate with its 95% Wilson interval, and the mean graded score, overall and per family."""

    n: int
    successes: int
    rate: float
    low: float
    high: float
    mean_score: float
    per_family: dict[str, TaskScore] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.rate:.1%} [{self.low:.1%}, {self.high:.1%}] of {self.n} (mean score {self.mean_score:.3f})"


def _summary(scores: list[float]) -> TaskScore:
    successes = sum(s == 1.0 for s in scores)
    low, high = wilson_interval(successes, len(scores))
    return TaskScore(len(scores), successes, successes / len(scores), low, high, sum(scores) / len(scores))


def score_responses(items: Sequence[TaskItem], responses: Sequence[str]) -> TaskScore:
    """Grade one response per item: success rate (score 1.0) with a 95% Wilson interval, overall and per family."""
    if len(items) != len(responses) or not items:
        raise ValueError(f"need one response per item and at least one item, got {len(responses)} for {len(items)}")
    scores = [item.check(r) for item, r in zip(items, responses, strict=True)]
    per_family = {}
    for family in FAMILIES:
        mine = [s for s, item in zip(scores, items, strict=True) if item.family == family]
        if mine:
            per_family[family] = _summary(mine)
    overall = _summary(scores)
    return TaskScore(overall.n, overall.successes, overall.rate, overall.low, overall.high, overall.mean_score,
                     per_family)
