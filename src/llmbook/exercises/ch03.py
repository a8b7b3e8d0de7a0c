"""Checks for Chapter 3's exercises: pair counts, merges, a tiny BPE trainer, decoding, encoding.

Every expected value comes from ``llmbook.bpe`` (``get_stats``, ``merge``,
``train_bpe``, ``Tokenizer.decode``, ``Tokenizer.encode_ordinary``), so a check and the chapter can never
disagree. When an answer is wrong, the check tries to name the usual mistake
(overlapping pairs, ties broken the wrong way, decoding token by token, ...).
"""

from __future__ import annotations

from functools import cache

from llmbook import data
from llmbook.bpe import Tokenizer, train_bpe
from llmbook.bpe.pretokenize import pretokenize
from llmbook.bpe.train import get_stats
from llmbook.bpe.train import merge as reference_merge
from llmbook.exercises import exercise

PAIR_CASES = [  # (what, ids)
    ("[1, 2, 3, 1, 2]", [1, 2, 3, 1, 2]),
    ("[7, 7, 7] (overlapping pairs)", [7, 7, 7]),
    ("an empty list", []),
    ("a single id", [42]),
    ("the bytes of 'hello hello'", list(b"hello hello")),
    ("ids above 255", [256, 300, 256, 300, 256, 256]),
]


def _sample(n: int) -> str:
    """The first ``n`` characters of Tiny Shakespeare."""
    return data.read_text("tinyshakespeare")[:n]


def _returned_none(value, name: str) -> None:
    if value is None:
        raise AssertionError(f"{name} returned None; did you forget `return`?")


def _describe_dict_difference(got: dict, expected: dict) -> str:
    missing = [p for p in expected if p not in got]
    extra = [p for p in got if p not in expected]
    wrong = [p for p in expected if p in got and got[p] != expected[p]]
    parts = []
    if missing:
        parts.append(f"missing pairs {missing[:3]}")
    if extra:
        parts.append(f"pairs that are not adjacent anywhere {extra[:3]}")
    if wrong:
        p = wrong[0]
        parts.append(f"pair {p} counted {got[p]} time(s) instead of {expected[p]}")
    return "; ".join(parts)


@exercise("3.1", solution="get_pair_counts")
def check_get_pair_counts(get_pair_counts):
    cases = PAIR_CASES + [("the bytes of 2,000 characters of Tiny Shakespeare", list(_sample(2000).encode()))]
    for what, ids in cases:
        expected = get_stats(ids)
        given = list(ids)
        got = get_pair_counts(given)
        _returned_none(got, "get_pair_counts")
        if given != ids:
            raise AssertionError(f"get_pair_counts changed its input ({what}); count without modifying `ids`")
        if not isinstance(got, dict):
            raise AssertionError(
                f"get_pair_counts({what}) should return a dict (a Counter is fine) mapping "
                f"(id, id) -> count, got {type(got).__name__}: {got!r:.80}"
            )
        got = {k: v for k, v in got.items() if v}  # a Counter may hold zero counts
        if got != expected:
            hint = _describe_dict_difference(got, expected)
            if what.startswith("[7, 7, 7]") and got.get((7, 7)) == 1:
                hint += "; overlapping pairs count separately: [7, 7, 7] holds (7, 7) twice"
            raise AssertionError(f"get_pair_counts({what}): {hint}")


@exercise("3.2", solution="merge")
def check_merge(merge):
    cases = [  # (ids, pair, new_id)
        ([1, 2, 3, 1, 2], (1, 2), 4),
        ([7, 7, 7], (7, 7), 8),
        ([7, 7, 7, 7], (7, 7), 8),
        ([1, 1, 2], (1, 2), 5),
        ([1, 2, 1, 2, 1], (2, 1), 256),
        ([2, 1], (1, 2), 9),
        ([], (1, 2), 3),
        ([1], (1, 2), 3),
        (list(b"the cat and the hat"), (ord("t"), ord("h")), 256),
        (list(_sample(2000).encode()), (ord("e"), ord(" ")), 300),
    ]
    for ids, pair, new_id in cases:
        expected = reference_merge(ids, pair, new_id)
        given = list(ids)
        got = merge(given, pair, new_id)
        shown = f"merge({ids if len(ids) < 20 else f'<{len(ids)} ids>'}, {pair}, {new_id})"
        _returned_none(got, "merge")
        if got is given and given != ids:
            raise AssertionError(f"{shown} changed its input list; build and return a new list instead")
        if not isinstance(got, list | tuple):
            raise AssertionError(f"{shown} should return a list of ids, got {type(got).__name__}")
        if list(got) != expected:
            hint = ""
            if list(got) == expected[:-1]:
                hint = "; the last id is lost when it is not part of a pair: keep it"
            elif ids == [7, 7, 7] and list(got) == [8, 8]:
                hint = "; after merging a pair, skip both of its elements: [7, 7, 7] -> [8, 7]"
            elif ids == [7, 7, 7]:
                hint = "; scan left to right and skip both elements of a merged pair: [7, 7, 7] -> [8, 7]"
            elif len(got) == len(ids) - 1 and ids.count(pair[0]) > 1:
                hint = "; replace *every* occurrence of the pair, not only the first"
            raise AssertionError(f"{shown}: got {list(got)[:20]}, expected {expected[:20]}{hint}")
        if given != ids:
            raise AssertionError(f"{shown} changed its input list; build and return a new list instead")


@exercise("3.3", solution="train_tiny_bpe")
def check_train_tiny_bpe(train_tiny_bpe):
    cases = [  # (what, text, n_merges)
        ("'aaabdaaabac' (with a tie at merge 2)", "aaabdaaabac", 3),
        ("a rose is a rose", "a rose is a rose is a rose ", 6),
        ("accented words (UTF-8)", "naïve café façade déjà vu, café naïve " * 3, 10),
        ("1,500 characters of Tiny Shakespeare", _sample(1500), 40),
    ]
    for what, text, n in cases:
        expected = train_bpe(text, 256 + n, workers=1)[1]
        got = train_tiny_bpe(text, n)
        _returned_none(got, "train_tiny_bpe")
        if not isinstance(got, list | tuple):
            raise AssertionError(f"train_tiny_bpe should return a list of merges, got {type(got).__name__}")
        got = [tuple(m) if isinstance(m, list) else m for m in got]
        if got and isinstance(got[0], tuple) and all(isinstance(x, int) for x in got[0]):
            raise AssertionError(
                "return merges as pairs of bytes, such as (b' ', b't'), not as pairs of ids: "
                "keep a vocab {id: bytes} and append (vocab[a], vocab[b])"
            )
        if got == expected:
            continue
        if len(got) != len(expected) and got == expected[: len(got)]:
            raise AssertionError(f"{what}: {len(got)} merges, expected {len(expected)}")
        k = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), None)
        if k is None:
            raise AssertionError(f"{what}: {len(got)} merges, expected {len(expected)}")
        raise AssertionError(f"{what}: merge {k + 1} is {got[k]!r}, expected {expected[k]!r}{_merge_hint(got[k])}")


def _merge_hint(merge_pair) -> str:
    """Name the likely mistake behind a wrong merge."""
    if not (isinstance(merge_pair, tuple) and len(merge_pair) == 2 and all(isinstance(x, bytes) for x in merge_pair)):
        return "; each merge should be a pair of bytes, such as (b' ', b't')"
    joined = (merge_pair[0] + merge_pair[1]).decode("utf-8", errors="replace")
    if len(pretokenize(joined)) > 1:
        return ("; that merge spans two pre-tokens: count pairs inside the pieces of pretokenize(text) "
                "only, weighted by how often each piece occurs")
    return ("; if two pairs were equally frequent, take the greater one, comparing (vocab[a], vocab[b]) "
            "as a tuple of bytes: max(counts, key=lambda p: (counts[p], vocab[p[0]], vocab[p[1]]))")


@cache
def _gpt2() -> Tokenizer:
    return Tokenizer.from_tiktoken("gpt2")


@exercise("3.4", solution="decode")
def check_decode(decode):
    gpt2 = _gpt2()
    texts = [
        "Good morrow, neighbour Baptista.",
        "naïve café",
        "emoji \N{SLIGHTLY SMILING FACE} and \N{PARTY POPPER}",
        "",
    ]
    cases = [(repr(t), gpt2.encode_ordinary(t)) for t in texts]
    emoji = gpt2.encode_ordinary("\N{SLIGHTLY SMILING FACE}")
    cases.append(("half an emoji (invalid UTF-8)", emoji[:1]))
    cases.append(("an emoji then half of one", gpt2.encode_ordinary("ok \N{PARTY POPPER}") + emoji[:1]))
    for what, ids in cases:
        expected = gpt2.decode(ids)
        try:
            got = decode(gpt2.vocab, list(ids))
        except UnicodeDecodeError:
            raise AssertionError(
                f"decode raised UnicodeDecodeError on {what}: pass errors='replace' to bytes.decode, "
                "so invalid UTF-8 becomes U+FFFD instead of an error"
            ) from None
        _returned_none(got, "decode")
        if isinstance(got, bytes):
            raise AssertionError("decode should return a str: join the tokens' bytes, then .decode('utf-8', ...)")
        if got != expected:
            hint = ""
            if "\ufffd" in str(got) and "\ufffd" not in expected:
                hint = ("; a character can be split across tokens: join all the bytes first and decode "
                        "once, instead of decoding token by token")
            raise AssertionError(f"decode of {what} (ids {ids}): got {got!r}, expected {expected!r}{hint}")


ENCODE_TEXTS = [  # (what, text)
    ("a line of Tiny Shakespeare", "First Citizen:\nBefore we proceed any further, hear me speak."),
    ("an empty string", ""),
    ("contractions and digits", "I'll say it's 2024, they've 12345 reasons."),
    ("a contraction glued to a word", "what'sthe news? he'sthere"),
    ("runs of spaces and newlines", "a   b\n\n\n  c \t d  "),
    ("accents and an emoji", "naïve café, déjà vu \N{SLIGHTLY SMILING FACE}!"),
    ("a long run of one letter", "e" * 150 + " eeeee"),
]


@cache
def _small_tokenizer() -> Tokenizer:
    """A 300-merge tokenizer trained on 20,000 characters of Tiny Shakespeare."""
    vocab, merges = train_bpe(_sample(20_000), 256 + 300, workers=1)
    return Tokenizer(vocab, merges, name="tiny-shakespeare-300")


def _leftmost_bpe(ids: list[int], ranks: dict, merged: dict) -> list[int]:
    """A usual mistake: merge the leftmost pair that has a merge, instead of the lowest-ranked one."""
    while True:
        i = next((i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) in ranks), None)
        if i is None:
            return ids
        ids = ids[:i] + [merged[ids[i], ids[i + 1]]] + ids[i + 2 :]


def _encode_hint(encode, tok: Tokenizer, text: str, got: list) -> str:
    """Name the likely mistake behind a wrong encoding of ``text``."""
    n_ids = 256 + len(tok.merges)
    if any(not isinstance(i, int) for i in got):
        return "; return the token ids as ints, not bytes or strings"
    if any(i >= n_ids or i < 0 for i in got):
        return f"; ids must lie in 0..{n_ids - 1}: byte b is id b, and merge k makes id 256 + k"
    expected = tok.encode_ordinary(text)
    for shift in (-256, -1, 1):
        if got == [e + shift if e >= 256 else e for e in expected]:
            return f"; your merged ids are off by {shift}: merge k (counting from 0) makes id 256 + k"
    pieces = pretokenize(text)
    if [i for p in pieces for i in encode(p)] == tok.encode_ordinary(text):
        return ("; every pre-token alone encodes right: cut the text with the GPT-2 pattern first "
                "and merge inside each piece only, never across pieces")
    for piece in pieces:
        mine, expected = list(encode(piece)), tok.encode_ordinary(piece)
        if mine == expected:
            continue
        spelled = [tok.vocab.get(i, b"?") for i in mine]
        hint = (f"; the first wrong pre-token is {piece!r}: got {mine} {spelled}, "
                f"expected {expected} {[tok.vocab[i] for i in expected]}")
        if mine == _leftmost_bpe(list(piece.encode("utf-8")), tok._ranks, tok._merged):
            hint += ("; you merged the leftmost pair that has a merge: merge the pair with the lowest rank "
                     "(the earliest learned) first, wherever it is")
        elif len(mine) > len(expected):
            hint += "; keep merging until no adjacent pair has a merge, not just one pass"
        return hint
    return ""


@exercise("3.9", solution="make_encoder")
def check_make_encoder(make_encoder):
    toy_vocab, toy_merges = train_bpe("aaabdaaabac", 256 + 3, workers=1)
    cases = [(Tokenizer(toy_vocab, toy_merges, name="toy"), ["aaabdaaabac", "aaaaaaa", "abab aaab"]),
             (_small_tokenizer(), [t for _, t in ENCODE_TEXTS])]
    for tok, texts in cases:
        reference = tok.to_tiktoken()
        merges = list(tok.merges)
        encode = make_encoder(merges)
        _returned_none(encode, "make_encoder")
        if not callable(encode):
            raise AssertionError(f"make_encoder should return a function encode(text), got {type(encode).__name__}")
        if merges != tok.merges:
            raise AssertionError("make_encoder changed the merges it was given; leave them as they are")
        for text in texts:
            expected = tok.encode_ordinary(text)
            assert expected == reference.encode_ordinary(text), "llmbook.bpe and tiktoken disagree (a bug in the book)"
            got = encode(text)
            _returned_none(got, "encode")
            if not isinstance(got, list | tuple):
                raise AssertionError(f"encode should return a list of ids, got {type(got).__name__}")
            got = list(got)
            if got != expected:
                what = next((w for w, t in ENCODE_TEXTS if t == text), repr(text))
                raise AssertionError(f"{tok.name} tokenizer, {what}: got {got[:16]}{'...' if len(got) > 16 else ''}, "
                                     f"expected {expected[:16]}{'...' if len(expected) > 16 else ''}"
                                     f"{_encode_hint(encode, tok, text, got)}")
