"""Rule-based quality filters for web text, with the thresholds as published (`--quality rules`).

A document is removed for the first rule it fails, in the order of `RULES`; the rule's name is the
removal reason (`rules:<name>` in stats.json) and its measured value goes to removed_samples.jsonl.

Gopher (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", appendix A.1.1 "quality filtering" and table A1 "repetition removal"):
  gopher_word_count        50 <= words <= 100,000
  gopher_mean_word_length  3 <= mean word length <= 10 characters
  gopher_hash_ratio        '#' per word <= 0.1
  gopher_ellipsis_ratio    ellipses ('...' or '…') per word <= 0.1
  gopher_bullet_lines      <= 90% of lines start with a bullet point
  gopher_ellipsis_lines    <= 30% of lines end with an ellipsis
  gopher_alpha_words       >= 80% of words contain an alphabetic character
  gopher_stop_words        >= 2 of the stop words {the, be, to, of, and, that, have, with}
  gopher_dup_para_frac     duplicate paragraphs <= 30% of paragraphs
  gopher_dup_para_chars    characters in duplicate paragraphs <= 20% of the text
  gopher_dup_line_frac     duplicate lines <= 30% of lines
  gopher_dup_line_chars    characters in duplicate lines <= 20% of the text
  gopher_top_{2,3,4}gram   characters of the most frequent word n-gram <= 20%, 18%, 16% of the text
  gopher_dup_{5..10}gram   characters in duplicated word n-grams <= 15%, 14%, 13%, 12%, 11%, 10%
C4 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", section 2.2), its document-level rule:
  c4_lorem_ipsum           the page contains "lorem ipsum"
C4's line-level rules (keep lines ending in terminal punctuation, ...) edit text rather than keep or
drop a document, and its curly-bracket rule drops all code: neither is applied.

Lines are the non-blank lines. Words are the text's word-like and punctuation tokens (`_TOKEN`,
like nltk's word_tokenize); "words" in the counts above leave out single punctuation characters.
Duplicate elements (paragraphs, lines, n-grams) are the occurrences after the first; the duplicate
n-gram fraction counts the characters of the words inside them, each word once however many such
n-grams overlap it (Gopher: "taking care not to count characters that occur in overlapping n-grams
more than once").
"""
from __future__ import annotations

import re
import string
from typing import Callable

import numpy as np

_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_PARAGRAPH = re.compile(r"\n{2,}")
_LOREM = re.compile(r"(?i)lorem ipsum")
_ALPHA = re.compile(r"[^\W\d_]")  # an alphabetic character
_PUNCT = frozenset(string.punctuation)
_BASE = np.uint64(0x100000001B3)
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "‣", "⁃", "◦", "▪", "▫", "●", "○", "■", "□", "➢", "→", "-", "*")
TOP_NGRAM = ((2, 0.20), (3, 0.18), (4, 0.16))
DUP_NGRAM = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


def _dups(items: list[str]) -> tuple[int, int]:
    """(elements that repeat an earlier one, their characters)."""
    seen, n, chars = set(), 0, 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


class Doc:
    """The pieces of one text the rules share (computed once)."""

    def __init__(self, text: str):
        self.text = text
        tokens = _TOKEN.findall(text)
        self.lines = [line for line in text.splitlines() if line.strip()] or [""]
        vocab: dict[str, int] = {}
        self.ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokens), np.int64, len(tokens))
        uniq = list(vocab)  # per distinct token: its length, whether a word, alphabetic, a stop word
        length = np.fromiter(map(len, uniq), np.int64, len(uniq))
        word = np.fromiter((t not in _PUNCT for t in uniq), bool, len(uniq))
        alpha = np.fromiter((_ALPHA.search(t) is not None for t in uniq), bool, len(uniq))
        stop = np.fromiter((t.lower() in STOP_WORDS for t in uniq), bool, len(uniq))
        self.lengths = length[self.ids]
        self.uids = (self.ids.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)  # spread, wrapping
        is_word = word[self.ids]
        self.n_tokens, self.n_words = len(tokens), int(is_word.sum())
        self.word_chars = int(self.lengths[is_word].sum())
        self.alpha_tokens = int(alpha[self.ids].sum())
        self.stop_words = int(stop[self.ids].sum())

    def keys(self, n: int) -> np.ndarray:
        """[tokens - n + 1] uint64: one key per word n-gram (polynomial hash of the token ids),
        each n computed from the one before."""
        if not hasattr(self, "_keys"):
            self._keys = {1: self.uids}
        for m in range(max(self._keys) + 1, n + 1):
            self._keys[m] = self._keys[m - 1][:-1] * _BASE + self.uids[m - 1:]  # wraps mod 2**64
        return self._keys[n]

    def top_ngram_chars(self, n: int) -> int:
        """Characters (with single spaces) of the most frequent word n-gram, times its count (of
        equally frequent ones, the longest)."""
        if len(self.ids) < n:
            return 0
        keys = self.keys(n)
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = first[counts == counts.max()]
        cum = np.concatenate([[0], np.cumsum(self.lengths)])
        return (int((cum[top + n] - cum[top]).max()) + n - 1) * int(counts.max())

    def dup_fraction(self, n: int) -> float:
        if not hasattr(self, "_dup"):
            self._dup = {}
        if n not in self._dup:
            self._dup[n] = self.dup_ngram_chars(n) / max(len(self.text), 1)
        return self._dup[n]

    def dup_ngram_chars(self, n: int) -> int:
        """Characters of the words inside word n-grams that repeat an earlier one, each word once
        however many such n-grams overlap it."""
        if len(self.ids) < n:
            return 0
        keys = self.keys(n)
        repeat = np.ones(len(keys), bool)
        repeat[np.unique(keys, return_index=True)[1]] = False  # first occurrences
        starts = np.flatnonzero(repeat)
        if not len(starts):
            return 0
        cover = np.zeros(len(self.ids) + 1, np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        return int(self.lengths[np.cumsum(cover[:-1]) > 0].sum())


def _word_count(d: Doc):
    n = d.n_words
    return n, 50 <= n <= 100_000


def _mean_word_length(d: Doc):
    m = d.word_chars / max(d.n_words, 1)
    return round(m, 3), 3 <= m <= 10


def _hash_ratio(d: Doc):
    r = d.text.count("#") / max(d.n_words, 1)
    return round(r, 4), r <= 0.1


def _ellipsis_ratio(d: Doc):
    r = (d.text.count("...") + d.text.count("…")) / max(d.n_words, 1)
    return round(r, 4), r <= 0.1


def _bullet_lines(d: Doc):
    r = sum(line.lstrip().startswith(BULLETS) for line in d.lines) / len(d.lines)
    return round(r, 4), r <= 0.9


def _ellipsis_lines(d: Doc):
    r = sum(line.rstrip().endswith(("...", "…")) for line in d.lines) / len(d.lines)
    return round(r, 4), r <= 0.3


def _alpha_words(d: Doc):
    r = d.alpha_tokens / max(d.n_words, 1)
    return round(r, 4), r >= 0.8


def _stop_words(d: Doc):
    n = d.stop_words
    return n, n >= 2


def _paragraphs(d: Doc):
    if not hasattr(d, "_para"):
        paras = _PARAGRAPH.split(d.text.strip())
        d._para = (len(paras), *_dups(paras))
    return d._para


def _dup_para_frac(d: Doc):
    total, n, _ = _paragraphs(d)
    r = n / total
    return round(r, 4), r <= 0.3


def _dup_para_chars(d: Doc):
    _, _, chars = _paragraphs(d)
    r = chars / max(len(d.text), 1)
    return round(r, 4), r <= 0.2


def _line_dups(d: Doc):
    if not hasattr(d, "_line"):
        d._line = _dups(d.lines)
    return d._line


def _dup_line_frac(d: Doc):
    r = _line_dups(d)[0] / len(d.lines)
    return round(r, 4), r <= 0.3


def _dup_line_chars(d: Doc):
    r = _line_dups(d)[1] / max(len(d.text), 1)
    return round(r, 4), r <= 0.2


def _top_ngram(n: int, limit: float):
    def rule(d: Doc):
        r = d.top_ngram_chars(n) / max(len(d.text), 1)
        return round(r, 4), r <= limit
    return rule


def _dup_ngram(n: int, limit: float):
    def rule(d: Doc):
        # the words inside repeated n-grams are inside repeated 5-grams too (the n-gram's first and
        # last 5 words repeat with it): a 5-gram fraction within the limit settles the larger n
        if n > DUP_NGRAM[0][0] and d.dup_fraction(DUP_NGRAM[0][0]) <= limit:
            return 0.0, True
        r = d.dup_fraction(n)
        return round(r, 4), r <= limit
    return rule


def _lorem_ipsum(d: Doc):
    hit = _LOREM.search(d.text) is not None
    return int(hit), not hit


# (name, rule(doc) -> (measured value, passes)), in the order they are applied
RULES: tuple[tuple[str, Callable[[Doc], tuple[float, bool]]], ...] = (
    ("gopher_word_count", _word_count),
    ("gopher_mean_word_length", _mean_word_length),
    ("gopher_hash_ratio", _hash_ratio),
    ("gopher_ellipsis_ratio", _ellipsis_ratio),
    ("gopher_bullet_lines", _bullet_lines),
    ("gopher_ellipsis_lines", _ellipsis_lines),
    ("gopher_alpha_words", _alpha_words),
    ("gopher_stop_words", _stop_words),
    ("c4_lorem_ipsum", _lorem_ipsum),
    ("gopher_dup_para_frac", _dup_para_frac),
    ("gopher_dup_para_chars", _dup_para_chars),
    ("gopher_dup_line_frac", _dup_line_frac),
    ("gopher_dup_line_chars", _dup_line_chars),
    *((f"gopher_top_{n}gram", _top_ngram(n, f)) for n, f in TOP_NGRAM),
    *((f"gopher_dup_{n}gram", _dup_ngram(n, f)) for n, f in DUP_NGRAM),
)
RULE_NAMES = tuple(name for name, _ in RULES)


def check(text: str) -> tuple[str, float] | None:
    """None when `text` passes every rule, else (the first failed rule's name, its measured value)."""
    d = Doc(text)
    for name, rule in RULES:
        value, ok = rule(d)
        if not ok:
            return name, float(value)
    return None
