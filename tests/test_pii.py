"""PII masking: the formats that must be masked, the look-alikes that must not (dates, prices, versions, octets
above 255), agreement with datatrove's PIIFormatter where both apply, and every planted string of the corpus."""

from __future__ import annotations

import pytest

from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus
from llmbook.pipeline.document import Document
from llmbook.pipeline.pii import PIIMasker, Placeholders, mask_pii, planted_recall

MASKED = [
    ("write to jane.doe@example.com today", "write to <EMAIL> today", "email"),
    ("jo+news@mail.example.co.uk.", "<EMAIL>.", "email"),
    ("first_last99@sub.domain.org, then", "<EMAIL>, then", "email"),
    ("(555) 234-5678", "<PHONE>", "phone"),
    ("call 555-234-5678 now", "call <PHONE> now", "phone"),
    ("555.234.5678", "<PHONE>", "phone"),
    ("555 234 5678", "<PHONE>", "phone"),
    ("+1 555 234 5678", "<PHONE>", "phone"),
    ("1-555-234-5678", "<PHONE>", "phone"),
    ("+1 (555) 234-5678", "<PHONE>", "phone"),
    ("London +44 20 7946 0958.", "London <PHONE>.", "phone"),
    ("Paris +33 1 23 45 67 89", "Paris <PHONE>", "phone"),
    ("from 8.8.8.8 at noon", "from <IP> at noon", "ip"),
    ("router 192.168.0.1.", "router <IP>.", "ip"),
    ("255.255.255.255", "<IP>", "ip"),
    ("host 2001:db8::8a2e:370:7334 up", "host <IP> up", "ip"),
    ("fe80::1ff:fe23:4567:890a", "<IP>", "ip"),
]

NOT_MASKED = [
    "Released on 2024-01-15 at 10:45:18.",  # a date and a time
    "It costs $1,234.56, or 20.5% less.",  # a price, a percentage
    "pi is 3.14159 and e is 2.71828",  # decimals
    "version 1.2.3.4 and v1.2.3.4 and build 10.0.19041.1",  # version numbers that look like addresses
    "999.1.1.1 and 256.100.100.100",  # an octet above 255 is no IPv4 address
    "1.2.3.4.5 and 192.168.001.001",  # five parts; leading zeros
    "ISBN 978-0-14-143951-8, order 5551234567",  # an ISBN; ten digits without separators
    "tel 123-456-7890",  # a North American area code never starts with 0 or 1
    "dated 12/05/2023, chapter 12, in 1813",
    "40.7128, -74.0060 and 1,000,000 people",
    "time 12:30:45, ratio 3:2, std::vector, a::b",  # colons that are not IPv6
    "an @ sign alone, user@localhost, @handle",  # no dot-separated domain: not an address
    "",
]


@pytest.mark.parametrize(("text", "expected", "kind"), MASKED)
def test_masks_common_formats(text, expected, kind):
    masked, counts = mask_pii(text)
    assert masked == expected
    assert counts[kind] == 1 and sum(counts.values()) == 1


@pytest.mark.parametrize("text", NOT_MASKED)
def test_leaves_look_alikes_alone(text):
    assert mask_pii(text) == (text, {"email": 0, "phone": 0, "ip": 0})


def test_everything_in_one_line_and_other_placeholders():
    text = "Reach me at olga.rossi319@company.org, phone +44 20 3456 7890, server 12.200.3.44."
    assert mask_pii(text) == (
        "Reach me at <EMAIL>, phone <PHONE>, server <IP>.",
        {"email": 1, "phone": 1, "ip": 1},
    )
    dolma = Placeholders("|||EMAIL_ADDRESS|||", "|||PHONE_NUMBER|||", "|||IP_ADDRESS|||")
    assert mask_pii("a@b.com 8.8.8.8", dolma)[0] == "|||EMAIL_ADDRESS||| |||IP_ADDRESS|||"


def test_public_only_and_ipv6_switch():
    text = "lan 192.168.0.1, loopback 127.0.0.1, dns 8.8.8.8, v6 2001:4860:4860::8888"
    masked, counts = mask_pii(text, public_only=True)  # datatrove's default: private addresses identify no one
    assert masked == "lan 192.168.0.1, loopback 127.0.0.1, dns <IP>, v6 <IP>" and counts["ip"] == 2
    assert mask_pii(text, ipv6=False)[0] == "lan <IP>, loopback <IP>, dns <IP>, v6 2001:4860:4860::8888"


def test_agrees_with_datatrove_where_both_mask():
    """datatrove's PIIFormatter (FineWeb's) masks e-mails and IPv4; on plain cases it masks what we mask."""
    from datatrove.pipeline.formatters import PIIFormatter

    theirs = PIIFormatter(only_remove_public_ips=False, email_replacement="<EMAIL>", ip_replacement="<IP>")
    plain = [
        "write to jane.doe@example.com today",
        "jo+news@mail.example.co.uk or first_last99@sub.domain.org",
        "from 8.8.8.8 and 192.168.0.1 at noon",
        "Posted by sam3 from 45.67.89.123 at 3:05 pm",
    ]
    for text in plain:
        assert mask_pii(text, ipv6=False)[0] == theirs.format(text)
    # where we differ on purpose: their IPv4 pattern is not anchored, so it finds addresses inside longer runs
    assert theirs.format("v1.2.3.4") == "v<IP>" and mask_pii("v1.2.3.4")[0] == "v1.2.3.4"
    assert theirs.format("999.1.1.1") == "9<IP>" and mask_pii("999.1.1.1")[0] == "999.1.1.1"


def test_masker_never_drops_and_records_counts():
    doc = Document("d1", "mail a@b.com or 555-234-5678", {"source": "x"})
    out, reason = PIIMasker().apply(doc)
    assert reason is None and out.id == "d1"
    assert out.text == "mail <EMAIL> or <PHONE>"
    assert out.metadata == {"source": "x", "pii_masked": {"email": 1, "phone": 1, "ip": 0}}
    assert doc.text == "mail a@b.com or 555-234-5678" and "pii_masked" not in doc.metadata  # input untouched
    assert [r for _, r in PIIMasker().run([doc, Document("d2", "")])] == [None, None]


def test_every_planted_string_of_the_corpus_is_masked():
    docs = make_corpus(CorpusConfig(n_docs=1500, seed=4))
    report = planted_recall(docs)
    assert report["planted"] > 100 and report["recall"] == 1.0
    assert set(report["recall_by_kind"]) == {"email", "phone", "ip"}
    # masks outside planted PII come only from Project Gutenberg's license footer (its real address and phone)
    masker = PIIMasker()
    for doc in docs:
        if not doc.metadata.get("pii") and sum(masker.apply(doc)[0].metadata["pii_masked"].values()):
            assert doc.metadata.get("boilerplate_kind") == "gutenberg" or "pglaf.org" in doc.text
