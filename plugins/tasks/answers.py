"""Answer extractors and ground-truth checkers for tasks built from data (``task=dataset``).

Plain Python, no selfloop state: an extractor reads the answer out of a completion (or a
reference), a checker compares two answers. Both accept text the extractor finds nothing in
(``lenient``), so answers the loop already extracted (pseudo-labels) compare too.
"""

from __future__ import annotations

import math
import re
import unicodedata

from selfloop.errors import SelfloopError

EXTRACTORS = ("exact", "last_number", "regex", "boxed")
CHECKERS = ("exact", "numeric", "normalized_text", "none")
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
ARTICLES = re.compile(r"\b(a|an|the)\b")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def parse_number(text: str) -> float | None:
    """``"1,234"``, ``"-3.5"``, ``"3/4"``, ``"$12"``, ``"50%"`` as a float; None if not a number."""
    s = text.strip().replace(",", "").lstrip("$").rstrip("%").strip()
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = parse_number(num), parse_number(den)
        return a / b if a is not None and b else None
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalization)."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(ARTICLES.sub(" ", text).split())


class Answers:
    """The configured extractor and checker (plain Python, reusable outside a run)."""

    def __init__(self, extractor: str = "exact", pattern: str | None = None, checker: str = "exact", tolerance: float = 1e-6):
        self.extractor, self.pattern, self.checker, self.tolerance = extractor, pattern, checker, tolerance
        self.regex = re.compile(pattern) if extractor == "regex" else None

    def extract(self, text: str) -> str | None:
        """The answer in ``text``; None when the extractor finds none."""
        kind = self.extractor
        if kind == "exact":
            return text.strip()
        if kind == "last_number":
            found = NUMBER.findall(text)
            return found[-1].replace(",", "").lstrip("+") if found else None
        if kind == "boxed":
            return last_boxed(text)
        match = None
        for match in self.regex.finditer(text):
            pass
        if match is None:
            return None
        return (match.group(1) if self.regex.groups else match.group(0)).strip()

    def lenient(self, text: str) -> str:
        """The extracted answer, or the text itself when the extractor finds nothing: answers
        the loop already extracted (pseudo-labels) pass through unchanged."""
        found = self.extract(text)
        return found if found is not None else text.strip()

    def check(self, answer: str, reference: str) -> bool:
        a, r = self.lenient(answer), self.lenient(reference)
        kind = self.checker
        if kind == "numeric":
            x, y = parse_number(a), parse_number(r)
            tol = self.tolerance
            return x is not None and y is not None and math.isclose(x, y, rel_tol=tol, abs_tol=tol)
        if kind == "normalized_text":
            return normalize_text(a) == normalize_text(r)
        if kind == "exact":
            return a == r
        raise SelfloopError("task.dataset.checker=none: this task has no ground-truth check; nothing should call check() (has_references is False)")

    def well_formed(self, answer: str) -> bool:
        a = self.lenient(answer)
        if self.checker == "numeric":
            return parse_number(a) is not None
        return bool(a)


