"""PII scrubbing: real addresses and numbers are replaced, look-alikes are left alone."""
import pytest

from jaxlm.prepare.filters import Verdict
from jaxlm.prepare.pii import EMAIL, IP, PHONE, PiiScrub, find_pii

TOKEN = {EMAIL: "|||EMAIL_ADDRESS|||", IP: "|||IP_ADDRESS|||", PHONE: "|||PHONE_NUMBER|||"}


@pytest.mark.parametrize("kind,value", [
    (EMAIL, "john.doe@example.com"),
    (EMAIL, "first+tag@mail.example.co.uk"),
    (EMAIL, "X_Y-9%z@sub-domain.example.org"),
    (IP, "192.168.0.1"),
    (IP, "8.8.8.8"),
    (IP, "255.255.255.255"),
    (IP, "2001:db8::1"),
    (IP, "fe80::1ff:fe23:4567:890a"),
    (IP, "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    (IP, "1:2:3:4:5:6:7:8"),
    (IP, "::ffff:192.0.2.1"),
    (PHONE, "+1 (555) 123-4567"),
    (PHONE, "555-123-4567"),
    (PHONE, "(555) 123-4567"),
    (PHONE, "555.123.4567"),
    (PHONE, "1-800-555-0199"),
    (PHONE, "+44 20 7946 0958"),
    (PHONE, "+33 1 23 45 67 89"),
    (PHONE, "+49 (0)30 123456"),
])
def test_scrubs_each_kind_whole(kind, value):
    text = f"Contact: {value}. Thanks"
    assert PiiScrub()(text) == Verdict(f"Contact: {TOKEN[kind]}. Thanks", "pii.scrubbed")
    assert find_pii(text) == [(9, 9 + len(value), kind)]


@pytest.mark.parametrize("value", [
    "user@localhost",  # no dotted domain: documented choice, left alone
    "a@b",
    "@dataclass",
    "name@example.c",  # one-letter top-level label
    "256.1.1.1",
    "999.1.1.1",
    "1.2.3",
    "1.2.3.4.5",
    "12:30:45",
    "a[1::2]",
    "std::vector",
    "Example::",
    "00:1a:2b:3c:4d:5e",  # a MAC address is not an IP
    "2023",
    "$1,234,567",
    "3.11.7",
    "5551234567",  # a plain digit run has no separators
    "2023-01-15",
    "+1 2 3",  # too few digits for a phone number
])
def test_leaves_look_alikes_untouched(value):
    text = f"Value {value} here."
    assert PiiScrub()(text) == Verdict(text, "")


def test_mixed_text_keeps_everything_else_exactly():
    text = "Mail bob@example.org, or call 555-123-4567; the server is 10.0.0.7:8080 (since 2023)."
    want = "Mail |||EMAIL_ADDRESS|||, or call |||PHONE_NUMBER|||; the server is |||IP_ADDRESS|||:8080 (since 2023)."
    assert PiiScrub()(text) == Verdict(want, "pii.scrubbed")


def _with_matches(n: int) -> str:
    values = ["a@example.com", "10.0.0.1", "555-123-4567", "2001:db8::2", "b@example.net",
              "+44 20 7946 0958", "192.0.2.9"]
    return " and ".join(values[:n]) + "."


def test_at_most_max_matches_are_scrubbed_more_drop_the_document():
    five = PiiScrub()(_with_matches(5))
    assert five.reason == "pii.scrubbed"
    assert five.text == " and ".join([TOKEN[EMAIL], TOKEN[IP], TOKEN[PHONE], TOKEN[IP], TOKEN[EMAIL]]) + "."
    assert PiiScrub()(_with_matches(6)) == Verdict(None, "pii.too_many")
    assert PiiScrub(max_matches=6)(_with_matches(6)).reason == "pii.scrubbed"
    assert PiiScrub(max_matches=2)(_with_matches(3)) == Verdict(None, "pii.too_many")


def test_repeated_value_counts_each_time():
    text = "ping 8.8.8.8 " * 6
    assert PiiScrub()(text) == Verdict(None, "pii.too_many")
