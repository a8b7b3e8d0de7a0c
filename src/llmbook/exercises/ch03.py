"""Checks for Chapter 3's exercises: pair counts, merges, a tiny BPE trainer, decoding, encoding, the whole BPE.

Every expected value comes from ``llmbook.bpe`` (``get_stats``, ``merge``,
``train_bpe``, ``Tokenizer.decode``, ``Tokenizer.encode_ordinary``), so a check and the chapter can never
disagree. When an answer is wrong, the check tries to name the usual mistake
(overlapping pairs, ties broken the wrong way, decoding token by token, ...).
"""

from __future__ import annotations

from collections import Counter
from functools import cache

from llmbook import data
from llmbook.bpe import Tokenizer, train_bpe
from llmbook.bpe.pretokenize import count_pretokens, pretokenize, split_on_special
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


# ---------------------------------------------------------------------------------------------- 3.10

SPECIAL = "<|endoftext|>"


def shakespeare_documents(start: int, n_chars: int) -> str:
    """``n_chars`` characters of Tiny Shakespeare from ``start``, its speeches joined by <|endoftext|>.

    Speeches are cut at blank lines, so the text holds a special token every few lines, as a corpus of
    many short documents does.
    """
    return SPECIAL.join(data.read_text("tinyshakespeare")[start : start + n_chars].split("\n\n"))


def train_cases() -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(what, text, vocab_size, special tokens): small texts that expose one mistake each, then real text.

    "aaaa aaaa aaaa" catches stale counts (merge 2 uses pairs that merge 1 consumed) and an overlapping
    merge ("aaaa" -> [aa, aa, aa, a] makes tokens no text holds); "abab cdcd" is a tie between (a, b) and
    (c, d), which the greater bytes break for (c, d); "hi<|endoftext|>" has one pair outside its special tokens.
    """
    return [
        ("'aaaa aaaa aaaa'", "aaaa aaaa aaaa", 256 + 3, ()),
        ("'abab cdcd abab cdcd' (a tie at merge 1)", "abab cdcd abab cdcd", 256 + 2, ()),
        ("'aaabdaaabac' (a tie at merge 2)", "aaabdaaabac", 256 + 3, ()),
        ("'hi<|endoftext|>' five times", "hi<|endoftext|>" * 5, 256 + 2 + 1, (SPECIAL,)),
        ("50,000 characters of Tiny Shakespeare with <|endoftext|> between speeches",
         shakespeare_documents(0, 50_000), 256 + 128 + 1, (SPECIAL,)),
    ]


def encode_texts() -> list[tuple[str, str]]:
    """(what, text): edge cases of pre-tokenization, special tokens, and 4,000 characters of real text."""
    return [
        *ENCODE_TEXTS,
        ("a special token between words", f"Hello{SPECIAL}World"),
        ("two special tokens in a row", f"{SPECIAL}{SPECIAL} the end"),
        ("a special token between spaces", f"a {SPECIAL} b"),
        ("an unfinished special token (text)", "<|endoftext| and <|end"),
        ("4,000 characters of Tiny Shakespeare (held out) with <|endoftext|>",
         shakespeare_documents(1_000_000, 4_000)),
    ]


@cache
def _shakespeare_bpe() -> Tokenizer:
    """The library's tokenizer trained on the last training case (Tiny Shakespeare with special tokens)."""
    _, text, vocab_size, specials = train_cases()[-1]
    vocab, merges = train_bpe(text, vocab_size, specials, workers=1)
    return Tokenizer(vocab, merges, specials, name="tiny-shakespeare-128")


def _words_after(text: str, specials: tuple[str, ...], merges: list[tuple[bytes, bytes]]) -> tuple[Counter, dict]:
    """Training's state after ``merges``: each distinct pre-token as a tuple of ids, with its count; bytes -> id."""
    token_id = {bytes([b]): b for b in range(256)}
    words = Counter({tuple(w): n for w, n in count_pretokens(text, "gpt2", specials).items()})
    for k, (a, b) in enumerate(merges):
        token_id.setdefault(a + b, 256 + k)
        pair = (token_id[a], token_id[b])
        words = Counter({tuple(reference_merge(list(w), pair, token_id[a + b])): n for w, n in words.items()})
    return words, token_id


def _train_hint(text: str, specials: tuple[str, ...], got: list, expected: list, k: int) -> str:
    """Name the likely mistake behind the first wrong merge, ``got[k]`` instead of ``expected[k]``."""
    g = got[k]
    if not (isinstance(g, tuple) and len(g) == 2 and all(isinstance(x, bytes) for x in g)):
        return "; each merge is a pair of bytes, such as (b' ', b't'), not ids or strings"
    joined = g[0] + g[1]
    if joined not in text.encode("utf-8"):
        return (f"; overlapping pairs merged wrongly: merge {k + 1} spells {joined!r}, which is nowhere in the text; "
                "merge left to right and skip both ids of a merged pair ('aaa' with (a, a) -> [aa, a])")
    ordinary = [w for w in count_pretokens(text, "gpt2", specials) if joined in w]
    if not ordinary:
        if any(joined in piece.encode("utf-8") for piece in pretokenize(text)):
            return (f"; special tokens split wrongly: merge {k + 1}, {g!r}, comes from a special token counted as "
                    "text; cut the text at the special tokens first, and never count or merge them")
        return (f"; pre-tokenized wrongly: merge {k + 1}, {g!r}, spans two pre-tokens; count pairs only inside the "
                "pieces regex.findall(GPT2_PATTERN, text) gives, never across them")
    if k >= len(expected):
        return ""
    words, token_id = _words_after(text, specials, expected[:k])
    counts: Counter = Counter()
    for w, n in words.items():
        for pair, m in get_stats(w).items():
            counts[pair] += m * n
    ids = lambda p: (token_id.get(p[0]), token_id.get(p[1]))  # noqa: E731
    mine, want = counts.get(ids(g), 0), counts[ids(expected[k])]
    if mine == want:
        return (f"; ties broken differently: {g!r} and {expected[k]!r} both occur {want} times; on equal counts "
                "take the greater pair of bytes, max(counts, key=lambda p: (counts[p], vocab[p[0]], vocab[p[1]]))")
    return (f"; stale pair counts: after merge {k}, {g!r} occurs {mine} times and {expected[k]!r} {want} times; "
            "count the pairs anew after every merge (a merge removes pairs and makes new ones)")


def _check_training(bpe_train) -> None:
    for what, text, vocab_size, specials in train_cases():
        want_vocab, want = train_bpe(text, vocab_size, specials, workers=1)
        result = bpe_train(text, vocab_size, specials)
        _returned_none(result, "bpe_train")
        if not (isinstance(result, tuple | list) and len(result) == 2 and isinstance(result[0], dict)):
            raise AssertionError(f"bpe_train should return (vocab, merges): a dict id -> bytes and a list of pairs, "
                                 f"got {type(result).__name__}")
        vocab, got = result[0], [tuple(m) if isinstance(m, list) else m for m in result[1]]
        if got != want:
            k = next((i for i, (g, e) in enumerate(zip(got, want, strict=False)) if g != e), min(len(got), len(want)))
            if k == len(got):
                raise AssertionError(f"{what}: {len(got)} merges, expected {len(want)}; learn vocab_size - 256 - "
                                     "len(special_tokens) merges, or fewer when no pair is left")
            shown = f"merge {k + 1} is {got[k]!r}, expected {want[k]!r}" if k < len(want) else (
                f"{len(got)} merges, expected {len(want)}; stop when no pre-token has a pair left")
            raise AssertionError(f"{what}: {shown}{_train_hint(text, specials, got, want, k)}")
        if vocab != want_vocab:
            wrong = sorted(i for i in set(vocab) | set(want_vocab) if vocab.get(i) != want_vocab.get(i))
            i = wrong[0]
            hint = ("; the special tokens take the last ids, in the order given, after the merged tokens"
                    if i >= 256 + len(want) else "; byte b is id b, and merge k (from 0) makes id 256 + k")
            raise AssertionError(f"{what}: the merges are right, but vocab[{i}] is {vocab.get(i)!r}, expected "
                                 f"{want_vocab.get(i)!r}{hint}")


def _merge_by(ids: list[int], ranks: dict, merged: dict, choose) -> list[int]:
    """Merge one pre-token, picking the pair to merge next with ``choose(pairs that have a merge)``."""
    while True:
        pairs = [p for p in zip(ids, ids[1:], strict=False) if p in ranks]
        if not pairs:
            return ids
        ids = reference_merge(ids, choose(pairs), merged[choose(pairs)])


def _by_frequency(pairs: list) -> tuple[int, int]:
    counts = Counter(pairs)
    return max(counts, key=counts.__getitem__)  # ties: the first seen, the leftmost


def _bpe_encode_hint(encode, tok: Tokenizer, text: str, got: list, expected: list) -> str:
    """Name the likely mistake behind a wrong encoding of ``text`` (``encode(text)`` gave ``got``)."""
    if any(not isinstance(i, int) for i in got):
        return "; return the token ids as ints, not bytes or strings"
    if any(i not in tok.vocab for i in got) or tok.decode_bytes(got) != text.encode("utf-8"):
        return ("; your ids do not spell the text: take each token's id from the vocab (bytes -> id), for every "
                "byte too, since GPT-2's byte b is not id b")
    specials = tuple(tok.special_tokens)
    special_ids = set(tok.special_tokens.values())
    if sum(i in special_ids for i in got) != sum(i in special_ids for i in expected):
        return ("; special token encoded as text: '<|endoftext|>' became ordinary tokens; cut the text at the "
                "special tokens first (regex.escape them: '|' is special in a regex), and give each its id from "
                "special_tokens")
    pieces = split_on_special(text, specials)
    if [i for p in pieces for i in encode(p)] != got:
        return ""
    for piece in pieces:
        if piece in specials:
            continue
        if [i for pre in pretokenize(piece) for i in encode(pre)] == tok.encode_ordinary(piece) != encode(piece):
            return ("; pre-tokenized wrongly: every pre-token alone encodes right, so merges crossed pre-token "
                    "boundaries; merge inside each piece of regex.findall(GPT2_PATTERN, text) only")
        for pre in pretokenize(piece):
            mine, want = list(encode(pre)), tok.encode_ordinary(pre)
            if mine == want:
                continue
            start = [tok._encoder[bytes([b])] for b in pre.encode("utf-8")]
            shown = (f"; the first wrong pre-token is {pre!r}: got {[tok.vocab[i] for i in mine]}, expected "
                     f"{[tok.vocab[i] for i in want]}")
            if mine in (_merge_by(start, tok._ranks, tok._merged, _by_frequency),
                        _merge_by(start, tok._ranks, tok._merged, lambda pairs: pairs[0])):
                return (shown + "; merged by frequency (or the leftmost pair) at encode time instead of by rank: "
                        "merge the pair learned earliest (the lowest rank) first, wherever it is")
            return shown + "; merge the lowest-ranked pair first, every occurrence, until no pair has a merge"
    return ""


def _check_encoding(bpe_encode, tok: Tokenizer, reference, texts) -> None:
    vocab, merges, specials = dict(tok.vocab), list(tok.merges), dict(tok.special_tokens)
    for what, text in texts:
        expected = tok.encode(text, allowed_special="all")
        assert expected == reference.encode(text, allowed_special="all"), "llmbook.bpe and tiktoken disagree (a bug)"
        encode = lambda t: bpe_encode(t, vocab, merges, specials)  # noqa: E731
        got = encode(text)
        _returned_none(got, "bpe_encode")
        if not isinstance(got, list | tuple):
            raise AssertionError(f"bpe_encode should return a list of ids, got {type(got).__name__}")
        if vocab != tok.vocab or merges != tok.merges or specials != tok.special_tokens:
            raise AssertionError("bpe_encode changed the vocab, merges or special tokens it was given; leave them")
        got = list(got)
        if got != expected:
            i = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e),
                     min(len(got), len(expected)))
            raise AssertionError(f"{tok.name} tokenizer, {what}: {len(got)} ids, expected {len(expected)}; from id "
                                 f"{i} on got {got[i:i + 8]}, expected {expected[i:i + 8]}"
                                 f"{_bpe_encode_hint(encode, tok, text, got, expected)}")


@exercise("3.10", solution="bpe_train")
def check_bpe(bpe_train, bpe_encode):
    """Train on real text and compare the merges with ``train_bpe``; encode and compare with llmbook.bpe and tiktoken.

    The encoder is tried with our Shakespeare tokenizer (byte b is id b) and with GPT-2's, whose vocabulary
    and merges come from tiktoken's ranks and whose ids tiktoken itself gives.
    """
    _check_training(bpe_train)
    shakespeare = _shakespeare_bpe()
    _check_encoding(bpe_encode, shakespeare, shakespeare.to_tiktoken(), encode_texts())
    _check_encoding(bpe_encode, _gpt2(), data.tiktoken_encoding("gpt2"), encode_texts())
