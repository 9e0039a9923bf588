"""Find and scrub personal data: e-mail addresses, IP addresses and phone numbers.

Detection is by regex, then validation: an IP candidate must parse with `ipaddress`.
Choices where formats are ambiguous:

- E-mail: the domain must have a dot and an alphabetic top-level label of 2+ letters, so
  "user@localhost" and "a@b" are left alone (as are Python decorators like "@dataclass").
- IPv4: exactly four dotted numbers each <= 255, no leading zeros, not part of a longer dotted
  run ("1.2.3.4.5"); a four-part version number like "1.2.3.4" is indistinguishable and scrubbed.
- IPv6: any form `ipaddress` accepts, but a compressed form needs one group of 3+ hex digits
  (or all 8 groups), so that slices like `a[1::2]`, "::" and times like "12:30:45" stay.
- Phone: North-American "555-123-4567", "(555) 123-4567", "555.123.4567", optionally after
  "+1" or "1"; international "+<country> <groups>" with 8 to 15 digits in all. Separators are
  required: plain digit runs (years, ids), prices "$1,234,567" and versions "3.11.7" stay.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import ClassVar

from jaxlm.prepare.filters import Verdict

EMAIL, IP, PHONE = "EMAIL_ADDRESS", "IP_ADDRESS", "PHONE_NUMBER"

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,63}(?![\w-])")
# Patterns start with a narrow character class where they can (the lookbehind after it), so
# the regex engine skips ahead quickly; the others run only when a cheap hint is present.
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\.?\w)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
                   r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\w)")
_PHONE_NA = re.compile(r"(?<![\w+.-])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
                       r"(?![\w-]|\.\d)")
_PHONE_INTL = re.compile(r"\+(?<![\w+]\+)\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,6}(?:[ .-]\d{1,6}){1,5}"
                         r"(?![\w-]|\.\d)")
_PHONE_NA_HINT = re.compile(r"\d{3}[ .-]\d{4}")


def _valid_ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _valid_ipv6(s: str) -> bool:
    if s.count(":") < 7 and max(len(g) for g in s.split(":")) < 3:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _valid_phone(s: str) -> bool:
    return 8 <= sum(c.isdigit() for c in s) <= 15


def _always(text: str) -> bool:
    return True


# (kind, pattern, validator, hint): the pattern runs only if hint(text). Where two matches
# overlap, the earlier start wins, then the longer match, then the detector listed first.
_DETECTORS = (
    (EMAIL, _EMAIL, None, lambda text: "@" in text),
    (IP, _IPV6, _valid_ipv6, lambda text: "::" in text or text.count(":") >= 7),
    (IP, _IPV4, _valid_ipv4, _always),
    (PHONE, _PHONE_NA, None, _PHONE_NA_HINT.search),
    (PHONE, _PHONE_INTL, _valid_phone, _always),
)


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of personal data in `text`, in text order."""
    candidates = []
    for priority, (kind, pattern, valid, hint) in enumerate(_DETECTORS):
        for m in pattern.finditer(text) if hint(text) else ():
            if valid is None or valid(m.group(0)):
                candidates.append((m.start(), -m.end(), priority, kind))
    spans, end = [], 0
    for start, neg_end, _, kind in sorted(candidates):
        if start >= end:
            spans.append((start, -neg_end, kind))
            end = -neg_end
    return spans


@dataclasses.dataclass(frozen=True)
class PiiScrub:
    """Replace each e-mail, IP address and phone number by `|||<KIND>|||`; a document with more
    than `max_matches` of them in all is dropped instead."""

    name: ClassVar[str] = "pii"
    max_matches: int = 5

    def __call__(self, text: str) -> Verdict:
        spans = find_pii(text)
        if not spans:
            return Verdict(text)
        if len(spans) > self.max_matches:
            return Verdict(None, "pii.too_many")
        parts, pos = [], 0
        for start, end, kind in spans:
            parts += [text[pos:start], f"|||{kind}|||"]
            pos = end
        parts.append(text[pos:])
        return Verdict("".join(parts), "pii.scrubbed")
