"""Language identification: keep documents whose most likely language is one of a chosen few.

The model is py3langid's (a fork of langid.py: naive Bayes over byte n-grams, 140 labels,
mostly ISO 639-1 codes, plus a few ISO 639-3 ones and "zxx" for no linguistic content). It ships
inside the pip package, so nothing is downloaded; it is imported and loaded (about 0.6 s) when
the first rule is made in a process. Its score is the probability of the top language, the
scores normalized to sum to 1 over all labels (py3langid's `norm_probs`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

from jaxlm.config.schema import ConfigError
from jaxlm.prepare.filters import Verdict


@functools.cache
def identifier():
    """py3langid's bundled model with normalized scores; one per process."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise ConfigError("the language rule needs py3langid, which is not installed: "
                          "pip install py3langid (or pip install 'jaxlm[data]')") from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@dataclasses.dataclass(frozen=True)
class LanguageId:
    """Keep a document if its top language scores at least `min_score` (else low_score) and is
    one of `languages` (else other).

    FineWeb keeps English above 0.65 (fastText's lid.176 score, in datatrove's LanguageFilter,
    which keeps a document when any listed language scores above the threshold: for thresholds
    of 0.5 and up that is the top language, as here). The default threshold is FineWeb's; it
    was set for fastText, not for this model.
    """

    name: ClassVar[str] = "language"
    languages: tuple[str, ...] = ("en",)  # codes to keep, among the model's labels
    min_score: float = 0.65  # probability of the top language, 0 to 1

    def __post_init__(self):
        labels = identifier().labels
        unknown = [code for code in self.languages if code not in labels]
        if unknown or not self.languages:
            given = f"unknown code(s) {', '.join(map(repr, unknown))}" if unknown else "no code"
            raise ConfigError(f"language.languages has {given}; allowed: {', '.join(sorted(labels))}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"language.min_score={self.min_score!r} must be between 0 and 1")

    def __call__(self, text: str) -> Verdict:
        code, score = identifier().classify(text)
        if score < self.min_score:  # the model is unsure: not evidence of another language
            return Verdict(None, "language.low_score")
        if code not in self.languages:
            return Verdict(None, "language.other")
        return Verdict(text)
