"""Encoding and decoding with a trained BPE, and moving it to and from tiktoken and GPT-2 files.

Encoding replays training on new text: cut it into pre-tokens, spell each
pre-token in bytes, then apply the learned merges, earliest learned first.
With the merges ``(h, e) -> 256`` and ``(256, y) -> 257`` (rank 0 and 1):

    "hey" -> [h, e, y]            bytes
          -> [256, y]             rank 0 applies
          -> [257]                rank 1 applies; no pair left that has a merge

A pre-token such as " the" occurs thousands of times in a book, so its ids are
cached and the merge loop runs once per distinct pre-token. Decoding is a
lookup and a join; the join may cut a character in half (a token can hold part
of one), which ``decode`` shows as U+FFFD.

Two merge loops give the same ids. ``bpe`` is the one to read: it looks at
every pair after every merge, which is quick for a word but quadratic in the
length of one pre-token, and the pattern makes a run of one repeated letter a
single pre-token (a megabyte of "a" is one). ``bpe_fast`` keeps the parts in a
linked list and the pairs in buckets by rank, so a pre-token of n bytes costs
O(n log n); ``encode`` uses it for every pre-token longer than ``SHORT_PIECE``
bytes.

Ids are whatever the vocabulary says: ours put byte ``b`` at id ``b``, but
GPT-2's byte tokens have other ids (id 0 is "!"), so nothing here assumes it.
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from heapq import heapify, heappop, heappush
from pathlib import Path
from typing import Literal

from llmbook.bpe.pretokenize import GPT2_PATTERN, compiled, resolve_pattern, special_regex, split_on_special

FORMAT, VERSION = "llmbook-bpe", 1
INF = float("inf")
CACHE_SIZE = 100_000  # distinct pre-tokens remembered; the cache is emptied when full
CACHE_MAX_CHARS = 256  # longer pre-tokens are not remembered: they rarely repeat, and would hold memory
SHORT_PIECE = 64  # pre-tokens of at most this many bytes use the simple loop, which is faster on them
STREAM_CHARS = 1 << 16  # encode_iterable encodes this many characters at a time


def bpe(ids: list[int], ranks: dict[tuple[int, int], int], merged: dict[tuple[int, int], int]) -> list[int]:
    """Apply merges to one pre-token, lowest rank (earliest learned) first, until none applies.

    The teaching version: short and clear, but every merge scans all the pairs
    left, so a pre-token of n bytes costs O(n^2). ``encode`` runs it only on
    short pre-tokens and ``bpe_fast`` on the rest; both give the same ids.

    >>> ranks, merged = {(104, 101): 0, (256, 121): 1}, {(104, 101): 256, (256, 121): 257}
    >>> bpe(list(b"hey"), ranks, merged), bpe(list(b"he he"), ranks, merged)
    ([257], [256, 32, 256])

    ``pair_ranks[i]`` is the rank of the pair ``(ids[i], ids[i + 1])``. A merge
    changes only the two pairs beside it, so we update those two instead of
    looking every pair up again. Merging the leftmost lowest pair one at a time
    gives what training's merge-every-occurrence gave: the pairs a merge
    creates contain the new token, so they rank later than the merged pair.
    """
    get = ranks.get
    pair_ranks = [get(pair, INF) for pair in zip(ids, ids[1:], strict=False)]
    while pair_ranks:
        # find the pair with the lowest rank
        best = min(pair_ranks)
        if best == INF:
            break  # no pair has a merge
        i = pair_ranks.index(best)
        # merge it, and look up the ranks of its new neighbour pairs
        ids[i : i + 2] = [merged[ids[i], ids[i + 1]]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get((ids[i - 1], ids[i]), INF)
        if i < len(pair_ranks):
            pair_ranks[i] = get((ids[i], ids[i + 1]), INF)
    return ids


DEAD = -1  # the id left behind where a part was merged into its left neighbour


def bpe_fast(
    ids: list[int],
    ranks: dict[tuple[int, int], int],
    merged: dict[tuple[int, int], int],
    stats: dict[str, int] | None = None,
) -> list[int]:
    """What ``bpe`` returns, in O(n log n) for a pre-token of n ids instead of O(n^2).

    >>> ranks, merged = {(104, 101): 0, (256, 121): 1}, {(104, 101): 256, (256, 121): 257}
    >>> bpe_fast(list(b"hey he"), ranks, merged)
    [257, 32, 256]

    The parts form a doubly linked list (``nxt``, ``prv``), so a merge costs
    O(1) instead of moving everything after it. Pairs wait in buckets by rank,
    each bucket a list of the positions of their left parts; a heap of the
    ranks gives the lowest. A bucket is worked through left to right, which is
    ``bpe``'s order: merging one pair creates only pairs that contain the new
    token, and those rank later in any vocabulary BPE learned (should one rank
    lower, we stop and take that one first, so the result is the same for any
    merges). A merge leaves stale entries behind; each is recognised and
    skipped when its turn comes (lazy invalidation): its left part is gone, or
    the pair there has another rank now. Every position enters a bucket once at
    the start and each merge adds at most two, so at most 3n entries are
    looked at; ``stats["steps"]`` counts them, to test that bound.
    """
    n = len(ids)
    if n < 2:
        return list(ids)
    get = ranks.get
    ids = list(ids)
    positions = list(range(n + 1))  # 0..n, one int object each, shared by the lists below
    nxt = positions[1:]  # nxt[i]: the part after part i (n: none)
    prv = [-1, *positions[: n - 1]]  # prv[i]: the part before part i (-1: none)
    buckets: dict[int, list[int]] = {}  # rank -> positions of the left parts of pairs of that rank
    pair_of: dict[int, tuple[int, int]] = {}  # rank -> its pair
    for i, pair in zip(positions, zip(ids, ids[1:], strict=False), strict=False):
        rank = get(pair)
        if rank is not None:
            bucket = buckets.get(rank)
            if bucket is None:
                buckets[rank], pair_of[rank] = [i], pair
            else:
                bucket.append(i)
    todo = list(buckets)  # the ranks that have a bucket: a heap, lowest first
    heapify(todo)
    steps = 0
    while todo:
        rank = heappop(todo)
        bucket = buckets.pop(rank, None)
        if bucket is None:
            continue  # the rank was pushed twice
        bucket.sort()  # left to right: ascending runs, one per pass that added to it
        a, b = pair_of[rank]
        new = merged[a, b]
        steps += len(bucket)
        for k, i in enumerate(bucket):
            j = nxt[i]
            if j == n or ids[i] != a or ids[j] != b:
                continue  # stale: part i is gone (DEAD), or it holds another pair now
            ids[i], ids[j] = new, DEAD
            p, m = prv[i], nxt[j]
            nxt[i] = m
            lower = False
            if p >= 0:  # the pair before the new token; added first, so one pass over a
                pair = (ids[p], new)  # bucket adds ascending positions to every bucket
                r = get(pair)
                if r is not None:
                    other = buckets.get(r)
                    if other is None:
                        buckets[r], pair_of[r] = [p], pair
                        heappush(todo, r)
                    else:
                        other.append(p)
                    lower = r < rank
            if m < n:  # the pair after it
                prv[m] = i
                pair = (new, ids[m])
                r = get(pair)
                if r is not None:
                    other = buckets.get(r)
                    if other is None:
                        buckets[r], pair_of[r] = [i], pair
                        heappush(todo, r)
                    else:
                        other.append(i)
                    lower = lower or r < rank
            if lower:  # a pair of lower rank appeared: it goes first; the rest of this bucket waits
                rest = bucket[k + 1 :]
                if rest:
                    steps -= len(rest)
                    buckets.setdefault(rank, []).extend(rest)
                    heappush(todo, rank)
                break
    if stats is not None:
        stats["steps"] = stats.get("steps", 0) + steps
    return [t for t in ids if t != DEAD]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, used in vocab.json and merges.txt.

    Printable Latin-1 bytes stand for themselves; the others (space, control
    bytes, ...) get the characters from U+0100 on, so b" the" is written "Ġthe".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


class Tokenizer:
    """A byte-level BPE tokenizer: a vocabulary, merges, a split pattern and special tokens.

    >>> tok = Tokenizer({**{i: bytes([i]) for i in range(256)}, 256: b"he"}, [(b"h", b"e")])
    >>> tok.encode("hehe"), tok.decode([256, 33])
    ([256, 256], 'he!')
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "bpe",
    ):
        self.name = name
        self.pattern = resolve_pattern(pattern)
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges = list(merges)

        # special tokens: explicit ids, or looked up by their bytes (the last such id), or appended
        self.special_tokens: dict[str, int] = {}
        if isinstance(special_tokens, dict):
            self.special_tokens = dict(special_tokens)
        else:
            by_bytes = {token: i for i, token in sorted(self.vocab.items())}
            for token in dict.fromkeys(special_tokens or ()):
                found = by_bytes.get(token.encode("utf-8"))
                self.special_tokens[token] = found if found is not None else max(self.vocab, default=-1) + 1
                self.vocab[self.special_tokens[token]] = token.encode("utf-8")
        for token, i in self.special_tokens.items():
            if self.vocab.setdefault(i, token.encode("utf-8")) != token.encode("utf-8"):
                raise ValueError(f"special token {token!r} wants id {i}, which is the token {self.vocab[i]!r}")

        # ordinary tokens by bytes (the lowest id wins should two tokens share bytes)
        special_ids = set(self.special_tokens.values())
        self._encoder: dict[bytes, int] = {}
        for i, token in sorted(self.vocab.items()):
            if i not in special_ids:
                self._encoder.setdefault(token, i)
        missing = [b for b in range(256) if bytes([b]) not in self._encoder]
        if missing:
            raise ValueError(f"a byte-level vocabulary needs all 256 single bytes; {len(missing)} are missing")
        self._byte_ids = [self._encoder[bytes([b])] for b in range(256)]

        # merges as ids: (a, b) -> rank, and (a, b) -> the id of the merged token
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged: dict[tuple[int, int], int] = {}
        for rank, (a, b) in enumerate(self.merges):
            try:
                pair, new_id = (self._encoder[a], self._encoder[b]), self._encoder[a + b]
            except KeyError:
                raise ValueError(f"merge {rank} {(a, b)} uses or makes a token missing from the vocabulary") from None
            self._ranks.setdefault(pair, rank)
            self._merged.setdefault(pair, new_id)
        self._cache: dict[str, list[int]] = {}
        self._split = compiled(self.pattern).findall

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the rows an embedding table needs (like tiktoken's ``n_vocab``)."""
        return max(self.vocab) + 1

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={len(self.special_tokens)})"
        )

    # ------------------------------------------------------------------ encoding

    def _encode_piece(self, piece: str) -> list[int]:
        """The ids of one pre-token, from the cache or by running the merges."""
        ids = self._cache.get(piece)
        if ids is None:
            data = piece.encode("utf-8")
            # A pre-token that is itself a token (" the") needs no merging: in a vocabulary
            # learned by BPE the merges rebuild every token they made. tiktoken does the same.
            whole = self._encoder.get(data)
            if whole is not None:
                ids = [whole]
            else:
                merge_loop = bpe if len(data) <= SHORT_PIECE else bpe_fast
                ids = merge_loop([self._byte_ids[b] for b in data], self._ranks, self._merged)
            if len(piece) <= CACHE_MAX_CHARS:
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
                self._cache[piece] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special tokens in it as ordinary text (tiktoken's ``encode_ordinary``).

        Use it for text that is only text, such as a training corpus or a
        user's prompt: "<|endoftext|>" in it is spelled in ordinary tokens.
        """
        ids: list[int] = []
        cache, encode_piece = self._cache, self._encode_piece
        for piece in self._split(text):
            cached = cache.get(piece)  # the common case, inlined: a pre-token seen before
            ids.extend(cached if cached is not None else encode_piece(piece))
        return ids

    def _special_sets(self, allowed_special, disallowed_special) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Resolve tiktoken-style arguments to sorted tuples (hashable, for cached regexes)."""
        for arg in (allowed_special, disallowed_special):
            if isinstance(arg, str) and arg != "all":
                raise ValueError(f"expected 'all' or a set of special tokens, got the string {arg!r}")
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else specials & set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        return tuple(sorted(allowed)), tuple(sorted(disallowed))

    def _check_disallowed(self, text: str, disallowed: tuple[str, ...]) -> None:
        match = special_regex(disallowed).search(text) if disallowed else None
        if match:
            token = match.group()
            raise ValueError(
                f"the text contains the special token {token!r}, which is disallowed. To encode it as the "
                f"special token, pass allowed_special={{{token!r}}} (or 'all'); to encode it as ordinary "
                f"text, call encode_ordinary(text) or pass disallowed_special=()."
            )

    def _encode(self, text: str, allowed: tuple[str, ...]) -> list[int]:
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for piece in split_on_special(text, allowed):
            special = self.special_tokens.get(piece) if piece in allowed else None
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | set[str] | frozenset[str] = frozenset(),
        disallowed_special: Literal["all"] | set[str] | frozenset[str] | tuple = "all",
    ) -> list[int]:
        """Encode text; special tokens in it follow tiktoken's rules and defaults.

        A special token in ``allowed_special`` becomes its id; one in
        ``disallowed_special`` raises ``ValueError``; any other is ordinary
        text. By default none is allowed and all are disallowed, so
        "<|endoftext|>" in a text raises instead of silently becoming the
        control token: text from outside (a web page, a user) must not be able
        to end a document. Say ``allowed_special={"<|endoftext|>"}`` when you
        put it there yourself, or call ``encode_ordinary`` to treat it as text.
        """
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        self._check_disallowed(text, disallowed)
        return self._encode(text, allowed)

    def _encode_settled(self, text: str, allowed: tuple[str, ...], hold: int) -> tuple[list[int], int]:
        """Encode the longest prefix of ``text`` that more text cannot change; return its ids and its length.

        Two things are unsettled at the end of a text. The last ``hold``
        characters may begin a special token, which would cut the ordinary
        text there. And the last two pre-tokens of ordinary text may still grow
        or split ("x  " + "y" is 'x', ' ', ' y'; "'l" + "l" is "'ll"); earlier
        pre-tokens never change, whatever comes after.
        """
        limit = len(text) - hold
        ids: list[int] = []
        pos = 0
        for piece in split_on_special(text, allowed):
            end = pos + len(piece)
            if pos >= limit:
                break
            if piece in allowed:  # a special token that starts before the limit: settled
                ids.append(self.special_tokens[piece])
            elif end < len(text) and end <= limit:  # ordinary text ended by a special token: complete
                ids.extend(self.encode_ordinary(piece))
            else:  # ordinary text whose end is not known yet: settle all but its last two pre-tokens
                matches = list(compiled(self.pattern).finditer(piece, 0, limit - pos))
                for m in matches[:-2]:
                    ids.extend(self._encode_piece(m.group()))
                return ids, pos + (matches[-2].start() if len(matches) > 2 else 0)
            pos = end
        return ids, pos

    def encode_iterable(
        self,
        lines: Iterable[str],
        *,
        allowed_special: Literal["all"] | set[str] | frozenset[str] = frozenset(),
        disallowed_special: Literal["all"] | set[str] | frozenset[str] | tuple = "all",
    ) -> Iterator[int]:
        """Encode a stream of strings (say, a file's lines) lazily, in bounded memory.

        Yields exactly ``encode("".join(lines), ...)``, special tokens
        included. Lines are gathered into pieces of about ``STREAM_CHARS``
        characters; each piece is encoded up to the point that later text
        cannot change, and the rest is carried over to the next piece. A
        carried-over rest can grow (one pre-token may be a megabyte of "a"), so
        the next try waits until the buffer has doubled: each character is
        scanned a bounded number of times.
        """
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        hold = max(map(len, allowed + disallowed), default=1) - 1  # the longest special token, less one
        buffer: list[str] = []
        size, wait_for = 0, STREAM_CHARS
        for line in lines:
            buffer.append(line)
            size += len(line)
            if size < wait_for:
                continue
            text = "".join(buffer)
            self._check_disallowed(text, disallowed)
            ids, done = self._encode_settled(text, allowed, hold)
            yield from ids
            buffer, size = [text[done:]], len(text) - done
            wait_for = max(STREAM_CHARS, 2 * size)
        text = "".join(buffer)
        self._check_disallowed(text, disallowed)
        yield from self._encode(text, allowed)

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for, joined.

        Ids must be integers (Python's, NumPy's, or one-element integer
        tensors) of tokens in the vocabulary. Anything else raises: 1.5 or True
        is a bug in the caller, and quietly reading them as id 1 would hide it.
        """
        ids = ids if isinstance(ids, list | tuple) else list(ids)
        if set(map(type, ids)) <= {int}:  # the common case: plain ints, checked at C speed
            try:
                return b"".join(map(self.vocab.__getitem__, ids))
            except KeyError:
                pass  # an unknown id: token_bytes below names it
        return b"".join(map(self.token_bytes, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token: ``token_bytes(256)`` might be b" t"."""
        try:
            if isinstance(token_id, bool) or type(token_id).__name__ == "bool_":
                raise TypeError
            index = operator.index(token_id)  # int, NumPy integer, integer tensor; not 1.5
        except TypeError:
            raise TypeError(
                f"token ids must be integers, got {token_id!r} ({type(token_id).__name__}); "
                f"convert model outputs with int() or .tolist() before decoding"
            ) from None
        token = self.vocab.get(index)
        if token is None:
            raise ValueError(f"unknown token id {token_id}; valid ids are 0..{self.vocab_size - 1}")
        return token

    # ------------------------------------------------------------------ tiktoken

    @classmethod
    def from_tiktoken(cls, name_or_encoding) -> Tokenizer:
        """The tokenizer of a ``tiktoken.Encoding`` (or of its name: "gpt2", "cl100k_base", ...).

        tiktoken stores no merges, only each token's rank (its id); the merges
        are recovered from them by ``recover_merges``.
        """
        if isinstance(name_or_encoding, str):
            vocab, merges, specials, pattern = _tiktoken_parts(name_or_encoding)
            return cls(vocab, merges, specials, pattern, name_or_encoding)
        enc = name_or_encoding
        vocab = {rank: token for token, rank in enc._mergeable_ranks.items()}
        return cls(vocab, recover_merges(enc._mergeable_ranks), dict(enc._special_tokens), enc._pat_str, enc.name)

    def to_tiktoken(self, name: str | None = None):
        """A ``tiktoken.Encoding`` that gives the same ids.

        tiktoken merges the adjacent pair whose *merged bytes* have the lowest
        id, so it needs the merged tokens' ids to grow in the order the merges
        were learned, and every token's bytes to be distinct; both hold for
        ``train_bpe``'s layout and for GPT-2's and GPT-4's vocabularies.
        """
        import tiktoken

        special_ids = set(self.special_tokens.values())
        ranks = {token: i for i, token in self.vocab.items() if i not in special_ids}
        if len(ranks) != len(self.vocab) - len(special_ids):
            raise ValueError("tiktoken needs distinct bytes for every token; this vocabulary repeats some")
        made = [self._merged[pair] for pair in sorted(self._ranks, key=self._ranks.__getitem__)]
        if any(later <= earlier for earlier, later in zip(made, made[1:], strict=False)):
            raise ValueError("tiktoken needs merged tokens' ids to grow with their merge rank; these do not")
        return tiktoken.Encoding(
            name or self.name, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=dict(self.special_tokens)
        )

    # ------------------------------------------------------------------ GPT-2 / Hugging Face files

    @classmethod
    def from_gpt2_files(
        cls, vocab_json: Path, merges_txt: Path, special_tokens: Sequence[str] | None = None, name: str = "gpt2"
    ) -> Tokenizer:
        """Load GPT-2's ``vocab.json`` (alias ``encoder.json``) and ``merges.txt`` (alias ``vocab.bpe``).

        Both files spell bytes with ``bytes_to_unicode``'s characters. Special
        tokens are spelled as themselves; with ``special_tokens=None`` they are
        the entries of vocab.json that are neither a byte nor made by a merge
        (for GPT-2: "<|endoftext|>").
        """
        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def unmap(s: str) -> bytes:
            try:
                return bytes(to_byte[c] for c in s)
            except KeyError:
                raise ValueError(f"{s!r} in {vocab_json} is not a GPT-2 byte-level token") from None

        encoder: dict[str, int] = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        pairs = [line.split() for line in lines if line.strip() and not line.startswith("#version")]
        made = set(bytes_to_unicode().values()) | {a + b for a, b in pairs}

        vocab: dict[int, bytes] = {}
        specials: dict[str, int] = {}
        for s, i in encoder.items():
            if s in special_tokens if special_tokens is not None else s not in made:
                specials[s] = i
                vocab[i] = s.encode("utf-8")
            else:
                vocab[i] = unmap(s)
        for s in special_tokens or ():  # asked for, but not in vocab.json: append
            specials.setdefault(s, max(vocab) + 1)
            vocab.setdefault(specials[s], s.encode("utf-8"))
        merges = [(unmap(a), unmap(b)) for a, b in pairs]
        return cls(vocab, merges, specials, GPT2_PATTERN, name)

    def to_gpt2_files(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``vocab.json`` and ``merges.txt`` that GPT-2 code and Hugging Face ``tokenizers`` load.

        The files cannot say which pattern splits the text: their readers assume
        GPT-2's, so a tokenizer trained with another pattern will split differently there.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = bytes_to_unicode()

        def mapped(token: bytes) -> str:
            return "".join(table[b] for b in token)

        special_of = {i: s for s, i in self.special_tokens.items()}
        encoder = {special_of[i] if i in special_of else mapped(t): i for i, t in sorted(self.vocab.items())}
        vocab_json, merges_txt = directory / "vocab.json", directory / "merges.txt"
        vocab_json.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{mapped(a)} {mapped(b)}\n" for a, b in self.merges)
        merges_txt.write_text("#version: 0.2\n" + merges, encoding="utf-8")
        return vocab_json, merges_txt

    # ------------------------------------------------------------------ our own file format

    def save(self, path: str | Path) -> Path:
        """Save as readable JSON: tokens as strings, merges as pairs of ids.

        Token bytes that are not valid UTF-8 are written as the lone surrogates
        Python's "surrogateescape" gives them (b"\\xe2" -> "\\udce2"), so every
        token survives the round trip exactly.
        """
        path = Path(path)
        head = {"format": FORMAT, "version": VERSION, "name": self.name, "pattern": self.pattern}
        tokens = [
            f"    {json.dumps(str(i))}: {json.dumps(t.decode('utf-8', 'surrogateescape'))}"
            for i, t in sorted(self.vocab.items())
        ]
        merges = [f"    [{self._encoder[a]}, {self._encoder[b]}]" for a, b in self.merges]
        text = "{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items())
        text += f'  "special_tokens": {json.dumps(self.special_tokens)},\n'
        text += '  "vocab": {\n' + ",\n".join(tokens) + "\n  },\n"
        text += '  "merges": [\n' + ",\n".join(merges) + "\n  ]\n}\n"
        # a unique temporary name in the same folder: two processes saving at once never share one
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # atomic: a crash never leaves half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a file written by ``save``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{path} is not an {FORMAT} file (it has no \'"format": "{FORMAT}"\')')
        if data.get("version") != VERSION:
            raise ValueError(
                f"{path} is {FORMAT} format version {data.get('version')}, but this llmbook reads version "
                f"{VERSION}; re-save it with the llmbook version that wrote it, or retrain"
            )
        vocab = {int(i): s.encode("utf-8", "surrogateescape") for i, s in data["vocab"].items()}
        merges = [(vocab[a], vocab[b]) for a, b in data["merges"]]
        return cls(vocab, merges, data["special_tokens"], data["pattern"], data["name"])


def recover_merges(mergeable_ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges behind tiktoken's ranks, in rank order.

    A token of rank r was made by merging two tokens of lower rank. Which two?
    Run BPE on the token's own bytes with only the merges of rank < r: it stops
    at exactly two pieces, and those are the pair (minbpe's ``recover_merges``).
    """
    byte_ids = [mergeable_ranks[bytes([b])] for b in range(256)]
    ranks: dict[tuple[int, int], int] = {}
    merged: dict[tuple[int, int], int] = {}
    vocab = {rank: token for token, rank in mergeable_ranks.items()}
    merges = []
    for rank in sorted(vocab):
        token = vocab[rank]
        if len(token) == 1:
            continue
        parts = bpe([byte_ids[b] for b in token], ranks, merged)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        ranks[(parts[0], parts[1])] = rank
        merged[(parts[0], parts[1])] = rank
        merges.append((vocab[parts[0]], vocab[parts[1]]))
    return merges


_TIKTOKEN_CACHE: dict[str, tuple] = {}


def _tiktoken_parts(name: str) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], dict[str, int], str]:
    """vocab, merges, special tokens and pattern of a named tiktoken encoding, recovered once per process."""
    if name not in _TIKTOKEN_CACHE:
        from llmbook.data import tiktoken_encoding

        enc = tiktoken_encoding(name)
        vocab = {rank: token for token, rank in enc._mergeable_ranks.items()}
        _TIKTOKEN_CACHE[name] = (vocab, recover_merges(enc._mergeable_ranks), dict(enc._special_tokens), enc._pat_str)
    return _TIKTOKEN_CACHE[name]
