"""A faster encoder for Qwen-style byte-level BPE, with the ids `tokenizers` gives.

`tokenizers` spends most of its time in its pre-tokenizer (the split regex runs in Oniguruma):
measured on the built-in corpus, ~0.5M tokens/s in one thread, of which the BPE merges are the
smaller part. tiktoken's Rust core splits with the same regex (fancy-regex) and merges by rank,
~5x faster. The two agree when the BPE is "rank ordered": every merge makes a new token whose id
is its merge's position after the 256 byte tokens (Qwen2/Qwen3's vocabulary was built that way,
the ids ARE the ranks), so "merge the pair of lowest merge index" and "merge the pair whose
result has the lowest id" are the same rule.

`RankBPE.build(tokenizer)` returns None unless the tokenizer is exactly of that kind: BPE with no
dropout, unknown token, word prefix/suffix or byte fallback, a pre-tokenizer that is one
Split(regex, isolated) followed by ByteLevel(no prefix space, no regex), no normaliser or NFC,
and a rank-ordered vocabulary. `tokenizers` itself encodes the documents where the two could
differ, rare in a corpus: those that spell one of the tokenizer's added tokens (`<|endoftext|>`,
`<think>`, ...; its rules for matching them are the caller's), those NFC would change (the
libraries' Unicode versions order some combining marks differently), and those with characters
this Python's Unicode database does not know (so the regex classes agree on the rest).
tests/data/test_tokenizers.py checks the ids against `tokenizers` on the built-in corpus and on
text chosen to differ (every Unicode space, combining marks, NFC pairs, contractions, CJK).
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Callable, Sequence

try:
    import tiktoken  # optional: a speed-up (setup.cfg installs it; without it tokenizers does the work)
except ImportError:  # an optional speed-up: without it `tokenizers` encodes everything
    tiktoken = None


def _byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class RankBPE:
    """Encodes like the `tokenizers` BPE it was built from (see module doc)."""

    def __init__(self, enc, nfc: bool, added: Sequence[str]):
        self._enc, self._nfc = enc, nfc
        longest_first = sorted(added, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, longest_first))) if added else None
        self.slow_documents = 0  # documents left to `tokenizers` so far

    @classmethod
    def build(cls, tok) -> RankBPE | None:
        """A RankBPE for the `tokenizers.Tokenizer` `tok`, or None when it is not rank-ordered byte BPE."""
        if tiktoken is None:
            return None
        spec = json.loads(tok.to_str())
        norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if norm not in (None, {"type": "NFC"}):
            return None
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        if len(steps) != 2:
            return None
        split, byte_level = steps
        if (split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {})
                or split.get("behavior") != "Isolated" or split.get("invert")
                or byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space")
                or byte_level.get("use_regex")):
            return None
        if (model.get("type") != "BPE" or model.get("dropout") or model.get("unk_token")
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                or model.get("byte_fallback") or model.get("ignore_merges")):
            return None
        ranks = _ranks(model["vocab"], model["merges"])
        if ranks is None:
            return None
        enc = tiktoken.Encoding("rank_bpe", pat_str=split["pattern"]["Regex"], mergeable_ranks=ranks,
                                special_tokens={})
        return cls(enc, norm is not None, [t["content"] for t in spec.get("added_tokens", [])])

    def encode_batch(self, texts: Sequence[str], slow: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
        """Ids of each text; `slow` encodes (with `tokenizers`) the texts that spell an added token."""
        out: list = [None] * len(texts)
        hard = []
        for i, t in enumerate(texts):
            if (self._added is not None and self._added.search(t)) or not t.isascii() and (
                    _unknown_chars(t) or self._nfc and not unicodedata.is_normalized("NFC", t)):
                hard.append(i)
                continue
            out[i] = self._enc.encode_ordinary(t)
        if hard:
            self.slow_documents += len(hard)
            for i, ids in zip(hard, slow([texts[i] for i in hard])):
                out[i] = ids
        return out


def _unknown_chars(text: str) -> bool:
    """Whether `text` has characters this Python's Unicode database does not know: the Unicode
    versions of Python, Oniguruma and fancy-regex differ, and with them letters, spaces and
    combining classes."""
    return any(unicodedata.category(c) == "Cn" for c in set(text) if c > "\x7f")


def _ranks(vocab: dict[str, int], merges: list) -> dict[bytes, int] | None:
    """{token bytes: id} when the vocabulary is the 256 bytes then one token per merge, in merge
    order (the id of merge k's result is 256 + k); else None."""
    if len(vocab) != 256 + len(merges):
        return None
    chars = _byte_chars()
    if any(c not in chars for c in set("".join(vocab))):  # a character outside the byte alphabet: not byte-level
        return None
    table = str.maketrans({c: chr(b) for c, b in chars.items()})
    ranks = {token.translate(table).encode("latin-1"): i for token, i in vocab.items()}
    if sorted(len(b) == 1 for b in ranks) != [False] * len(merges) + [True] * 256:
        return None
    single = sorted(i for b, i in ranks.items() if len(b) == 1)
    if single != list(range(256)):
        return None
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if vocab.get(a + b) != 256 + k:
            return None
    return ranks
