"""A corpus with planted problems, for the data QA stages (tests/data/test_data_qa.py) and by hand:

    python tests/data/planted_corpus.py OUT_DIR [--clean 400] [--seed 0]
    python data_pipeline/prepare.py --input OUT_DIR/corpus.jsonl --tokenizer qwen3 --out OUT_DIR/prepared \
        --dedup --decontaminate OUT_DIR/bench.jsonl --quality rules

OUT_DIR gets corpus.jsonl, bench.jsonl (benchmark items: long synthetic questions with choices,
plus the bundled tiny multiple-choice set) and truth.jsonl (one line per corpus record: its kind,
and for a planted copy the record it copies and their Jaccard similarity). Kinds:
  clean         synthetic prose: sentences of words drawn from the Python docs' vocabulary (by
                frequency), 150-900 words, passes every Gopher / C4 rule
  exact_dup     a clean document again, with its case and whitespace changed
  near_dup      a clean document with words replaced until the Jaccard similarity of the word
                5-gram sets is in [0.81, 0.97] (must be removed)
  similar       the same at [0.45, 0.74] (must be kept: counted with the clean documents)
  leak          a clean document with a benchmark question and its answer pasted in; or a bundled
                tiny-set item as a document of its own ("Question 3. The sun rises in the east")
  junk          symbol soup, a few words, repeated lines, lorem ipsum, bullet lists, hashtags,
                ellipsis lines, random letter strings, spam phrases
A copy always comes after the record it copies, so the lowest record index of a cluster is the
original. Similarities are those of data_pipeline/qa_text.py (normalised words, 5-gram shingles).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

from data_pipeline import qa_text  # noqa: E402

TINY_MC = os.path.join(ROOT, "data_pipeline", "evalsets", "tiny_mc.jsonl")


def vocabulary() -> tuple[list[str], np.ndarray]:
    """Lower-case words of the Python docs (pydoc topics) with sampling weights."""
    from pydoc_data.topics import topics
    counts = collections.Counter(w for text in topics.values() for w in re.findall(r"[a-z]{2,12}", text.lower()))
    words = sorted(w for w, c in counts.items() if c >= 3)
    weights = np.array([counts[w] for w in words], float) ** 0.8
    return words, weights / weights.sum()


class Writer:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.words, self.p = vocabulary()

    def sentence(self, n: int | None = None) -> str:
        n = n or int(self.rng.integers(8, 21))
        ws = list(self.rng.choice(self.words, n, p=self.p))
        return " ".join(ws).capitalize() + "."

    def document(self) -> str:
        paras = []
        for _ in range(int(self.rng.integers(3, 8))):
            paras.append(" ".join(self.sentence() for _ in range(int(self.rng.integers(2, 6)))))
        return "\n\n".join(paras)


def shingles(text: str) -> np.ndarray:
    return qa_text.shingles(qa_text.word_hashes(qa_text.words(text)))


def jaccard(a: str, b: str) -> float:
    return qa_text.jaccard(shingles(a), shingles(b))


def variant(w: Writer, text: str, lo: float, hi: float) -> tuple[str, float] | None:
    """`text` with words replaced until its Jaccard similarity to `text` is near a target drawn
    from [lo, hi] (bisection on how many of a fixed random choice of words are replaced)."""
    tokens = text.split(" ")
    target = float(w.rng.uniform(lo, hi))
    positions = w.rng.permutation(len(tokens))
    fresh = list(w.rng.choice(w.words, len(tokens), p=w.p))

    def make(k: int) -> str:
        new = list(tokens)
        for pos in positions[:k]:
            new[pos] = str(fresh[pos])
        return " ".join(new)

    a, b = 0, len(tokens)  # J(make(a)) >= target > J(make(b)), roughly
    while b - a > 1:
        m = (a + b) // 2
        a, b = (m, b) if jaccard(text, make(m)) >= target else (a, m)
    for k in (a, b):
        out = make(k)
        j = jaccard(text, out)
        if lo <= j <= hi and out != text:
            return out, j
    return None


JUNK = ("symbols", "short", "repeated_lines", "lorem", "bullets", "hashtags", "ellipsis", "random_letters", "spam")


def junk(w: Writer, kind: str) -> str:
    r = w.rng
    if kind == "symbols":
        return " ".join("".join(r.choice(list("#$%&*@!^~+=<>|"), int(r.integers(2, 6)))) for _ in range(120))
    if kind == "short":
        return w.sentence(int(r.integers(4, 15)))
    if kind == "repeated_lines":
        line = w.sentence()
        return "\n".join([line] * 30 + [w.sentence() for _ in range(3)])
    if kind == "lorem":
        return ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " + w.document())
    if kind == "bullets":
        return "\n".join("• " + w.sentence(int(r.integers(5, 10))) for _ in range(40))
    if kind == "hashtags":
        return " ".join(f"#{r.choice(w.words)}" for _ in range(150))
    if kind == "ellipsis":
        return "\n".join(w.sentence(int(r.integers(6, 12)))[:-1] + "..." for _ in range(30))
    if kind == "random_letters":
        return " ".join("".join(r.choice(list("abcdefghijklmnopqrstuvwxyz"), int(r.integers(14, 30))))
                        for _ in range(100))
    phrase = "buy cheap pills online now best price"
    return " ".join([phrase] * 40)


def benchmark(w: Writer, n: int) -> list[dict]:
    """n multiple-choice items with long questions (16-30 words) and short choices."""
    items = []
    for _ in range(n):
        q = w.sentence(int(w.rng.integers(16, 31)))[:-1] + "?"
        choices = [w.sentence(int(w.rng.integers(2, 5)))[:-1] for _ in range(4)]
        items.append({"question": q, "choices": choices, "answer": int(w.rng.integers(0, 4))})
    return items


def build(out: str, clean: int = 400, seed: int = 0) -> dict:
    """Writes corpus.jsonl, bench.jsonl and truth.jsonl into `out`; returns the counts per kind."""
    os.makedirs(out, exist_ok=True)
    w = Writer(seed)
    docs = [(w.document(), {"kind": "clean"}) for _ in range(clean)]
    originals = list(range(clean))
    n = max(clean // 10, 8)
    for i in w.rng.choice(originals, n, replace=False):
        text = docs[i][0]
        text = re.sub(r" ", "  ", text.upper() if w.rng.random() < 0.5 else text, count=5) + "\n"
        docs.append((text, {"kind": "exact_dup", "of": int(i), "jaccard": 1.0}))
    for kind, lo, hi in (("near_dup", 0.81, 0.97), ("similar", 0.45, 0.74)):
        for i in w.rng.choice(originals, n, replace=False):
            v = variant(w, docs[i][0], lo, hi)
            if v is not None:
                docs.append((v[0], {"kind": kind, "of": int(i), "jaccard": round(v[1], 4)}))
    items = benchmark(w, n)
    tiny = [json.loads(line) for line in open(TINY_MC)]
    for k, item in enumerate(items):
        paras = w.document().split("\n\n")
        paras.insert(int(w.rng.integers(0, len(paras) + 1)), f"{item['question']} {item['choices'][item['answer']]}.")
        docs.append(("\n\n".join(paras), {"kind": "leak", "benchmark": "bench", "item": k}))
    for k, item in enumerate(tiny):
        docs.append((f"Question {k + 1}. {item['context']}{item['choices'][item['answer']]}",
                     {"kind": "leak", "benchmark": "tiny_mc", "item": k}))
    for k in range(n * 2):
        kind = JUNK[k % len(JUNK)]
        docs.append((junk(w, kind), {"kind": "junk", "junk": kind}))
    order = list(w.rng.permutation(len(docs)))
    pos = {old: new for new, old in enumerate(order)}
    for old, (_, t) in enumerate(docs):  # a copy after its original
        if "of" in t and pos[old] < pos[t["of"]]:
            a, b = pos[old], pos[t["of"]]
            order[a], order[b] = order[b], order[a]
            pos[old], pos[t["of"]] = b, a
    with open(os.path.join(out, "corpus.jsonl"), "w") as f, open(os.path.join(out, "truth.jsonl"), "w") as g:
        for old in order:
            text, t = docs[old]
            f.write(json.dumps({"text": text}) + "\n")
            g.write(json.dumps({**t, **({"of": pos[t["of"]]} if "of" in t else {})}) + "\n")
    with open(os.path.join(out, "bench.jsonl"), "w") as f:
        for item in items + tiny:
            f.write(json.dumps(item) + "\n")
    return dict(collections.Counter(t["kind"] for _, t in docs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--clean", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(build(a.out, a.clean, a.seed)))


if __name__ == "__main__":
    main()
