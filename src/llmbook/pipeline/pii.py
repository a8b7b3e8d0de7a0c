"""Masking personal information: e-mail addresses, phone numbers and IP addresses become placeholders.

A model memorizes what it sees often enough, and a crawl is full of
addresses and numbers of real people. Pipelines therefore replace them
before training, with regular expressions, because a model-based detector
costs too much at the scale of a crawl:

- Dolma's toolkit masks them with the tokens ``|||EMAIL_ADDRESS|||``,
  ``|||PHONE_NUMBER|||`` and ``|||IP_ADDRESS|||`` (Soldaini et al. 2024);
- FineWeb (Penedo et al. 2024) runs datatrove's ``PIIFormatter``, which
  replaces e-mail addresses with ``email@example.com`` or
  ``firstname.lastname@example.org`` and *public* IPv4 addresses with
  addresses that did not answer pings when its list was made; it leaves
  phone numbers alone.

Here the placeholders are ``<EMAIL>``, ``<PHONE>``, ``<IP>``. The hard part is
what *not* to mask: dates (2024-01-15), prices ($1,234.56), decimals
(3.14159), version numbers (v1.2.3.4), octets above 255 (999.1.1.1), times
(10:45:18). Every pattern below is anchored so that it cannot start or end
inside a longer run of digits and dots; the tests hold the tricky cases.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from llmbook.pipeline.document import Document
from llmbook.pipeline.stage import Decision, Stage

# local part (letters, digits and . _ % + -), "@", then dot-separated labels ending in a letter-only TLD:
# "jane.doe+news@mail.example.co.uk"
# (Each pattern opens with a lookahead on its first character: Python's re then skips to candidate positions
# instead of trying the lookbehind at every character, 2-3x faster.)
EMAIL = re.compile(
    r"(?=[A-Za-z0-9])(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
# one octet: 0-255 without leading zeros (so "01.02.03.04" and "256.1.1.1" are not addresses)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# four octets, not part of a longer dotted run ("1.2.3.4.5") nor glued to a word ("v1.2.3.4" is a version)
IPV4 = re.compile(rf"(?=\d)(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w-]|\.\d)")
# IPv6 candidates: a run of hex digits and colons with at least two colons and a digit; ipaddress decides
IPV6 = re.compile(r"(?=[0-9A-Fa-f:])(?<![\w:.])(?=[0-9A-Fa-f:]*\d)[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:.])")
# North American numbers: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567, +1 555 123 4567, 1-555-...
# Area code and exchange start with 2-9 (NANP); separators are required, so an order number 5551234567 stays.
_NANP = r"(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}"
# International: "+" and a country code, then 2 to 5 groups of digits (E.164 allows at most 15 digits in all)
_INTL = r"\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
PHONE = re.compile(rf"(?=[+(0-9])(?<![\w.+/-])(?:{_INTL}|{_NANP})(?![\w]|[.-]\d)")

_VERSION_WORDS = re.compile(r"(?:version|release|build|v)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Placeholders:
    """What each kind of personal information becomes (Dolma's tokens would be ``|||EMAIL_ADDRESS|||``...)."""

    email: str = "<EMAIL>"
    phone: str = "<PHONE>"
    ip: str = "<IP>"


def _is_ip(match: re.Match, public_only: bool) -> bool:
    """A real address, not a version number: ipaddress accepts it, and no "version"/"v" right before it."""
    text = match.string
    if _VERSION_WORDS.search(text[max(0, match.start() - 12) : match.start()]):
        return False
    try:
        address = ipaddress.ip_address(match.group(0))
    except ValueError:
        return False
    return address.is_global if public_only else True


def _is_phone(match: re.Match) -> bool:
    """Between 10 and 15 digits (E.164's maximum; a NANP number has 10, 11 with its country code 1)."""
    return 10 <= sum(ch.isdigit() for ch in match.group(0)) <= 15


def mask_pii(
    text: str, placeholders: Placeholders = Placeholders(), ipv6: bool = True, public_only: bool = False
) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, then IP addresses, then phone numbers; return the text and how many of each.

    ``mask_pii("mail jo+x@a.co.uk or call (555) 234-5678 from 8.8.8.8")
    -> ("mail <EMAIL> or call <PHONE> from <IP>", {"email": 1, "phone": 1, "ip": 1})``.
    E-mail first, so an address's digits are never read as a phone number.
    ``public_only=True`` masks only globally routable IPs, as datatrove's
    ``PIIFormatter`` does by default (192.168.0.1 identifies no one).
    """
    counts = {"email": 0, "phone": 0, "ip": 0}

    def sub(kind: str, pattern: re.Pattern, value: str, accept, text: str) -> str:
        def replace(m: re.Match) -> str:
            if not accept(m):
                return m.group(0)
            counts[kind] += 1
            return value

        return pattern.sub(replace, text)

    if "@" in text:  # cheap tests first: most pages have no "@", and a third have no digit at all
        text = sub("email", EMAIL, placeholders.email, lambda m: True, text)
    if not any(d in text for d in "0123456789"):
        return text, counts
    text = sub("ip", IPV4, placeholders.ip, lambda m: _is_ip(m, public_only), text)
    if ipv6 and text.count(":") >= 2:
        text = sub("ip", IPV6, placeholders.ip, lambda m: _is_ip(m, public_only), text)
    text = sub("phone", PHONE, placeholders.phone, _is_phone, text)
    return text, counts


class PIIMasker(Stage):
    """Mask personal information in every document (never drops one); ``metadata["pii_masked"]`` has the counts."""

    name = "pii"

    def __init__(self, placeholders: Placeholders = Placeholders(), ipv6: bool = True, public_only: bool = False):
        self.placeholders, self.ipv6, self.public_only = placeholders, ipv6, public_only

    def apply(self, doc: Document) -> Decision:
        text, counts = mask_pii(doc.text, self.placeholders, self.ipv6, self.public_only)
        return Document(doc.id, text, {**doc.metadata, "pii_masked": counts}), None


def planted_recall(docs: list[Document], masker: PIIMasker | None = None) -> dict:
    """How much of the corpus's planted PII the masker removes, and how much it masks where none was planted.

    A planted string (``metadata["pii"]``) counts as caught when it no longer
    appears in the masked text. Masks in documents without planted PII are
    counted too: in the dirty corpus they are Project Gutenberg's license
    footer, which holds the foundation's real address, phone number and
    e-mail addresses (masking them is right).
    """
    masker = masker or PIIMasker()
    planted = caught = 0
    by_kind: dict[str, list[int]] = {}
    false_alarms = clean_docs = 0
    for doc in docs:
        masked, _ = masker.apply(doc)
        strings = doc.metadata.get("pii") or []
        if not strings:
            clean_docs += 1
            false_alarms += sum(masked.metadata["pii_masked"].values())
            continue
        for s in strings:
            kind = "email" if "@" in s else "ip" if IPV4.fullmatch(s) else "phone"
            hit = s not in masked.text
            planted += 1
            caught += hit
            by_kind.setdefault(kind, [0, 0])
            by_kind[kind][0] += 1
            by_kind[kind][1] += hit
    return {
        "planted": planted,
        "caught": caught,
        "recall": caught / planted if planted else 0.0,
        "recall_by_kind": {k: hit / n for k, (n, hit) in sorted(by_kind.items())},
        "documents_without_planted_pii": clean_docs,
        "masks_in_them": false_alarms,
    }
