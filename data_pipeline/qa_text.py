"""Text fingerprints for the data QA stages: exact-duplicate keys, MinHash signatures and LSH bands
(near duplicates), and word n-grams (benchmark decontamination). Everything here is a pure function
of the text, the same in every worker process and on every run (no Python `hash`, whose seed
changes per process).

Normalised words: the text in Unicode NFKC, lower-cased, split into runs of word characters
(`\\w+`): "The Sun—rises!" and "the sun rises" have the same words. They feed both near-duplicate
shingles and benchmark n-grams. A word's 64-bit hash is blake2b's; an n-gram's is a polynomial of
its words' hashes mod 2**64 (`ngram_hashes`).

Exact duplicates: blake2b of the NFKC, lower-cased text with whitespace runs collapsed to one space
(punctuation kept: two programs that differ in an operator are not duplicates).

Near duplicates: the document's shingles are its word 5-grams (the whole word sequence when it is
shorter), as 32-bit hashes; Jaccard similarity is that of the two shingle sets. A MinHash signature
holds, for each of `num_perm` hash functions h(x) = (a*x + b mod 2**64) >> 32 (multiply-shift,
a odd), the minimum over the shingles; the chance that two documents agree in one position is their
Jaccard similarity. LSH cuts the signature into `bands` bands of `rows` rows; documents sharing a
band are candidates (probability 1 - (1 - J**rows)**bands: 0.99995 at J = 0.8 for 25 x 5).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_P = 0x100000001B3  # the n-gram polynomial's base (odd)
_MASK64 = (1 << 64) - 1
_word_cache: dict[str, int] = {}


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def words(text: str) -> list[str]:
    """The normalised words of `text` (see the module docstring)."""
    return _WORD.findall(normalise(text))


def exact_key(text: str) -> bytes:
    """16 bytes naming the text up to case, Unicode form and whitespace."""
    return hashlib.blake2b(_SPACE.sub(" ", normalise(text)).strip().encode("utf-8"), digest_size=16).digest()


def text_hash(text: str) -> int:
    """A 63-bit hash of the exact text (a record's identity in the quality-score file)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") >> 1


def word_hashes(ws: list[str]) -> np.ndarray:
    """[len(ws)] uint64: each word's hash (cached per process; the cache is bounded)."""
    cache = _word_cache
    if len(cache) > 2_000_000:
        cache.clear()
    out = np.empty(len(ws), np.uint64)
    for i, w in enumerate(ws):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                          "little")
        out[i] = h
    return out


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """[len(wh) - n + 1] uint64: the hash of every word n-gram (empty when there are fewer words):
    H_n(i) = H_(n-1)(i) * P + wh[i + n - 1] mod 2**64, H_1 = wh (`ngrams` gives every n on the way)."""
    out = np.zeros(0, np.uint64)
    for m, h in ngrams(wh, n):
        out = h if m == n else out
    return out


def ngrams(wh: np.ndarray, n: int):
    """(m, hashes of the word m-grams) for m = 1 .. n (while there are m words)."""
    h = wh
    p = np.uint64(_P)
    for m in range(1, min(n, len(wh)) + 1):
        if m > 1:
            h = h[:-1] * p + wh[m - 1:]  # wraps mod 2**64
        yield m, h


def shingles(wh: np.ndarray, n: int = 5) -> np.ndarray:
    """Sorted distinct uint32 shingle hashes: word n-grams, or the whole text when shorter."""
    if len(wh) == 0:
        return np.zeros(0, np.uint32)
    h = ngram_hashes(wh, min(n, len(wh)))
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted distinct shingle arrays."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """MinHash signatures with `num_perm` multiply-shift hash functions drawn from `seed`."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)

    def signature(self, sh: np.ndarray) -> np.ndarray:
        """[num_perm] uint32 (all 0xFFFFFFFF for a document without shingles)."""
        out = np.full(self.num_perm, 0xFFFFFFFF, np.uint32)
        if not len(sh):
            return out
        x = sh.astype(np.uint64)[None, :]
        step = max(1, (1 << 20) // len(sh))  # hash functions per block: ~8 MB of temporaries
        for k in range(0, self.num_perm, step):
            a, b = self.a[k:k + step, None], self.b[k:k + step, None]
            out[k:k + step] = ((a * x + b) >> np.uint64(32)).min(axis=1)
        return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per LSH band: the band's number and its rows' bytes."""
    return [bytes((k,)) + sig[k * rows:(k + 1) * rows].tobytes() for k in range(bands)]


def candidate_probability(j: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - j ** rows) ** bands


class NgramIndex:
    """Benchmark text as word n-grams, for decontamination (qa_decontam.py).

    add(unit, tag): a unit of benchmark text (a question, a choice, an answer, ...) of W normalised
    words: W >= n gives its n-grams; min_words <= W < n the unit as one W-gram; shorter units
    (W >= 1) match only a document that is little more than the unit (at most `short_factor` x W
    words). `matches(words)` -> the set of tags of the units a document's words contain."""

    def __init__(self, n: int = 13, min_words: int = 8, short_factor: float = 2.0):
        self.n, self.min_words, self.short_factor = n, min_words, short_factor
        self._grams: dict[int, dict[int, int]] = {}   # length -> {n-gram hash: tag bitmask}
        self._short: dict[int, dict[int, int]] = {}   # length -> {unit hash: tag bitmask}
        self.units = 0

    def add(self, unit: str, tag: int) -> None:
        ws = words(unit)
        if not ws:
            return
        self.units += 1
        wh, W = word_hashes(ws), len(ws)
        bit = 1 << min(tag, 62)
        if W >= self.n:
            table, hashes = self._grams.setdefault(self.n, {}), ngram_hashes(wh, self.n)
        elif W >= self.min_words:
            table, hashes = self._grams.setdefault(W, {}), ngram_hashes(wh, W)
        else:
            table, hashes = self._short.setdefault(W, {}), ngram_hashes(wh, W)
        for h in hashes.tolist():
            table[h] = table.get(h, 0) | bit
        self._arrays = None

    def _sorted(self):
        if getattr(self, "_arrays", None) is None:
            def arr(tables):
                return {n: (np.array(sorted(t), np.uint64), t) for n, t in tables.items()}
            self._arrays = (arr(self._grams), arr(self._short))
        return self._arrays

    def matches(self, wh: np.ndarray) -> int:
        """Bitmask of the tags whose units the document (its word hashes) contains; 0 when clean."""
        grams, short = self._sorted()
        wanted = {**{n: t for n, t in grams.items()},
                  **{n: t for n, t in short.items() if len(wh) <= self.short_factor * n}}
        tags = 0
        if wanted:
            for m, h in ngrams(wh, max(wanted)):
                if m in wanted:
                    tags |= _hits(h, *wanted[m])
        return tags


def _hits(hashes: np.ndarray, keys: np.ndarray, table: dict[int, int]) -> int:
    if not len(hashes) or not len(keys):
        return 0
    at = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
    found = hashes[keys[at] == hashes]
    tags = 0
    for h in np.unique(found).tolist():
        tags |= table[h]
    return tags
