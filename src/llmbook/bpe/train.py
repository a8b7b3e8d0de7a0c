"""Training byte-level BPE: learn merges from how often pairs of tokens sit side by side.

We start from the 256 byte values, so any text can be encoded, and repeatedly
mint a new token for the most frequent adjacent pair. On "aaabdaaabac" (one
pre-token) that goes

    a a a b d a a a b a c      (a, a) occurs 4 times -> merge into "aa"
    aa a b d aa a b a c        (aa, a) and (a, b) both twice: a tie -> "aaa"
    aaa b d aaa b a c          (aaa, b) twice -> "aaab"

Ties go to the lexicographically greater pair of byte strings, compared as the
Python tuple ``(bytes_a, bytes_b)``: ``(b"aa", b"a") > (b"a", b"b")`` because
``b"aa" > b"a"``. Any fixed rule would do; this one is what the CS336 course
uses, so results are comparable with theirs.

Id layout of the vocabulary ``train_bpe`` returns:

    0 .. 255                      the single bytes, id == byte value
    256 .. 256 + n_merges - 1     the merged tokens, in the order they were learned
    the last len(special_tokens)  the special tokens, in the order given

Counting every pair of the corpus anew after each merge would cost a pass over
all the words per merge. A merge only changes the words that contain the
merged pair, so we keep an index pair -> words that contain it, update the
counts of those words only, and keep the counts in a heap to find the next
most frequent pair without scanning them all.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from llmbook.bpe.pretokenize import count_pretokens

Pair = tuple[int, int]


def get_stats(ids: Sequence[int]) -> dict[Pair, int]:
    """Count adjacent pairs: ``[1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}``.

    Overlapping pairs count twice: ``[7, 7, 7]`` has the pair (7, 7) twice.
    """
    counts: dict[Pair, int] = {}
    for pair in zip(ids, ids[1:], strict=False):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` by ``new_id``, scanning left to right.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge([7, 7, 7], (7, 7), 8)  # overlapping: the left one wins
    [8, 7]
    """
    out: list[int] = []
    i, n = 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def descending_key(token: bytes) -> str:
    """A string that sorts in the *opposite* order of ``token``.

    ``heapq`` pops the smallest entry, and we want the greatest bytes on ties,
    so every byte ``x`` becomes ``chr(255 - x)``, followed by ``chr(256)``,
    which is greater than any of them: a prefix such as b"a" < b"aa" then sorts
    after its extension, as it must in reverse.

    >>> sorted([b"a", b"aa", b"b"], key=descending_key)
    [b'b', b'aa', b'a']
    """
    return "".join(chr(255 - x) for x in token) + chr(256)


def _check_request(vocab_size: int, special_tokens: Sequence[str]) -> None:
    if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
        raise ValueError(f"special tokens must be distinct and non-empty, got {list(special_tokens)}")
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the 256 byte tokens and {len(special_tokens)} "
            f"special token(s) need vocab_size >= {smallest}"
        )


def train_bpe(
    text_or_path: str | Path,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    pattern: str = "gpt2",
    workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn a vocabulary of ``vocab_size`` tokens and the merges that build it.

    ``text_or_path`` is the training text, or a file when it is a ``Path`` (a
    ``str`` is always text). ``pattern`` is "gpt2", "cl100k" or a regex of your
    own. Returns ``(vocab, merges)``: ``vocab[id]`` is the token's bytes and
    ``merges[k]`` the pair of byte strings merged into id ``256 + k``.

    >>> vocab, merges = train_bpe("aaabdaaabac", 256 + 3)
    >>> merges
    [(b'a', b'a'), (b'aa', b'a'), (b'aaa', b'b')]
    """
    special_tokens = list(special_tokens)
    _check_request(vocab_size, special_tokens)
    start = time.perf_counter()

    # 1. count the pre-tokens; each distinct one is a "word" of byte ids
    word_counts = count_pretokens(text_or_path, pattern, special_tokens, workers)
    words = [list(w) for w in word_counts if len(w) > 1]  # one byte has no pair to merge
    freqs = [n for w, n in word_counts.items() if len(w) > 1]

    vocab = {i: bytes([i]) for i in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    keys = [descending_key(t) for t in vocab.values()]  # keys[id], for tie-breaking in the heap

    # 2. count every adjacent pair once, remembering which words contain it
    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, (word, n) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            counts[pair] += n
            where[pair].add(w)

    # a max-heap by (count, bytes_a, bytes_b): negated count, reversed bytes
    heap = [(-n, keys[a], keys[b], a, b) for (a, b), n in counts.items()]
    heapq.heapify(heap)

    n_merges = vocab_size - 256 - len(special_tokens)
    for new_id in tqdm(range(256, 256 + n_merges), desc="merges", disable=not progress):
        # 3. find the most frequent pair; entries whose count has changed since are stale
        while heap and counts.get((heap[0][3], heap[0][4])) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            break  # every word is a single token: nothing left to merge
        _, _, _, a, b = heapq.heappop(heap)
        pair = (a, b)

        # 4. mint a new token
        vocab[new_id] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        keys.append(descending_key(vocab[new_id]))

        # 5. rewrite the words that contain the pair and note how pair counts change
        delta: dict[Pair, int] = defaultdict(int)
        for w in where.pop(pair):
            old, n = words[w], freqs[w]
            new = words[w] = merge(old, pair, new_id)
            old_pairs = list(zip(old, old[1:], strict=False))
            new_pairs = list(zip(new, new[1:], strict=False))
            for p in old_pairs:
                delta[p] -= n
            for p in new_pairs:
                delta[p] += n
            # keep the index exact: this word no longer holds some pairs, and holds new ones
            for p in set(old_pairs).difference(new_pairs):
                if p != pair:
                    where[p].discard(w)
            for p in new_pairs:
                where[p].add(w)

        # 6. apply the changes; push the new counts (the heap keeps the old ones as stale)
        for p, d in delta.items():
            if d == 0:
                continue
            n = counts[p] + d
            if n > 0:
                counts[p] = n
                heapq.heappush(heap, (-n, keys[p[0]], keys[p[1]], p[0], p[1]))
            else:
                del counts[p]
                where.pop(p, None)

    # 7. special tokens take the last ids
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")

    if progress:
        seconds = time.perf_counter() - start
        print(
            f"trained {len(merges):,} merges on {sum(word_counts.values()):,} pre-tokens "
            f"({len(word_counts):,} distinct) in {seconds:.2f} s; vocab size {len(vocab):,}"
        )
    return vocab, merges
