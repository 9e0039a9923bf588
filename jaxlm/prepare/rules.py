"""The rule registry: every rule class by its config name, and `build_rules` to make a chain."""
from __future__ import annotations

from jaxlm.config.schema import ConfigError, build
from jaxlm.prepare.filters import Blocklist, C4Lines, GopherQuality, GopherRepetition, HtmlStrip, MinWords
from jaxlm.prepare.language import LanguageId
from jaxlm.prepare.pii import PiiScrub
from jaxlm.prepare.quality import Perplexity, QualityClassifier
from jaxlm.prepare.web import FineWebQuality

RULES: dict[str, type] = {r.name: r for r in (
    HtmlStrip, LanguageId, GopherQuality, GopherRepetition, C4Lines, FineWebQuality, MinWords, Blocklist,
    PiiScrub, QualityClassifier, Perplexity)}


def build_rules(spec: dict) -> list:
    """Rules from `{name: true | false | {param: value}}`, in the given order; false skips one."""
    if not isinstance(spec, dict):
        raise ConfigError(f"filters must be a mapping of filter name to settings; got {spec!r}")
    rules = []
    for name, params in spec.items():
        if name not in RULES:
            raise ConfigError(f"unknown filter {name!r}; allowed: {', '.join(RULES)}")
        if params is False:
            continue
        if params is None or params is True:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"filter {name!r} takes true, false or a mapping of parameters; "
                              f"got {params!r}")
        rules.append(build(RULES[name], name, params, what=f"filter {name!r}"))
    return rules
