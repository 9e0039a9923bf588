"""Corpus cleaning for `jaxlm data prepare`: rules (heuristic filters, PII, quality), dedup, the driver."""
from jaxlm.prepare.rules import RULES, build_rules
from jaxlm.prepare.run import format_report, prepare

__all__ = ["RULES", "build_rules", "format_report", "prepare"]
