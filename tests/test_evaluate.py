"""qwen3_jax.evaluate and launch/evaluate.py: bits per byte, multiple choice, the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from data_pipeline.pipeline import BATCH_KEYS, DatasetSpec, load_stats, make_dataset
from data_pipeline.text_tokenizer import load_tokenizer
from qwen3_jax import evaluate as ev
from qwen3_jax.config import get_config
from qwen3_jax.model import create_model
from qwen3_jax.params import flat_params, model_from_flat
from train_utils import xla_flags

ROOT = Path(__file__).resolve().parents[1]
CFG = get_config("tiny-dense", compute_dtype="float32")  # vocab 512, d_model 64, untied head
V, D = CFG.vocab_size, CFG.d_model
DOCS = ["def f(x):\n    return x + 1\n", "Grüße aus Köln — 日本語 😀 and some plain text.", "a = [1, 2, 3]"]


@pytest.fixture(scope="module")
def spm_data(spm512, tmp_path_factory):
    """{'docs': folder, 'tokenizer': spm.model, 'tiny': folder with the three DOCS} (the session's
    prepared corpus, tests/conftest.py)."""
    from data_pipeline.prepare import prepare
    root = tmp_path_factory.mktemp("eval_data")
    src = root / "tiny.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    prepare([str(src)], spm512["tokenizer"], str(root / "tiny"), shards=1, workers=0, progress=False)
    return {"docs": spm512["docs"], "tokenizer": spm512["tokenizer"], "tiny": str(root / "tiny")}


def _random_flat(seed=0):
    return {k: np.asarray(v) for k, v in flat_params(create_model(CFG, seed)).items()}


def _controlled_flat(logit: float = 0.0, token: int = 0):
    """Layers that add nothing (all zero), every embedding row e_0, so the final hidden state is
    h0·e_0 everywhere; the head gives `token` the logit `logit` and every other token 0."""
    flat = {k: np.zeros_like(v) for k, v in _random_flat().items()}
    flat["final_norm/scale"][:] = 1.0
    flat["embed/embedding"][:, 0] = 1.0
    h0 = 1.0 / math.sqrt(1.0 / D + CFG.rms_eps)  # RMSNorm(e_0)[0]
    flat["lm_head"][0, token] = logit / h0
    return flat


class CharTokenizer:
    """One id per character (ASCII < 512), for hand-computable multiple-choice scores."""
    name, vocab_size, eos_id = "chars", 128, 1

    def encode(self, text, allow_special=False):
        return [ord(c) for c in text]


def test_byte_lengths_sum_to_the_text_bytes(spm_data):
    tok = load_tokenizer(spm_data["tokenizer"])
    bytes_V = ev.token_byte_lengths(tok, V)
    st = load_stats(spm_data["docs"])
    import grain
    src = grain.sources.ArrayRecordDataSource([os.path.join(spm_data["docs"], s) for s in st["shards"]])
    total = sum(int(bytes_V[np.frombuffer(src[i], st["dtype"])].sum()) for i in range(len(src)))
    assert total == st["bytes"]  # prepare.py's count of the documents' UTF-8 bytes (separators: 0)
    for text in DOCS:
        assert bytes_V[tok.encode(text)].sum() == len(text.encode("utf-8"))
    try:
        qwen = load_tokenizer("qwen3")
    except FileNotFoundError:
        return
    bq = ev.token_byte_lengths(qwen)
    for text in DOCS + ["<|im_start|>user<think>x</think><|im_end|>"]:
        for allow in (False, True):
            assert bq[qwen.encode(text, allow)].sum() == len(text.encode("utf-8"))
    assert bq[qwen.eos_id] == 0


def test_bits_per_byte_of_a_uniform_model_by_hand(spm_data):
    """Uniform logits: NLL = ln V per scored token, so bpb = tokens·ln V / ln 2 / bytes; tokens and
    bytes counted by hand: all three documents share one row, every token but each document's
    first is scored (the <|endoftext|> ending each one too, with 0 bytes)."""
    tok = load_tokenizer(spm_data["tokenizer"])
    out = ev.heldout_metrics(CFG, _controlled_flat(), {"tiny": spm_data["tiny"]}, seq_len=256, batch_size=2,
                             max_batches=None, tokenizer=tok, split=None)["tiny"]
    ids = [tok.encode(t) for t in DOCS]
    assert sum(len(i) + 1 for i in ids) < 256  # one row
    tokens = sum(len(i) for i in ids)  # len + 1 separator - 1 unscored first token
    nbytes = sum(len(t.encode("utf-8")) - len(tok.decode(i[:1]).encode("utf-8")) for t, i in zip(DOCS, ids))
    assert (out["tokens"], out["bytes"], out["batches"]) == (tokens, nbytes, 1)
    assert out["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert out["perplexity"] == pytest.approx(V, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(tokens * math.log(V) / math.log(2) / nbytes, rel=1e-6)


def test_heldout_loss_matches_the_full_logits(spm_data):
    """A random model: the same mean NLL as log_softmax over model(tokens) on the held-out batches."""
    tok = load_tokenizer(spm_data["tokenizer"])
    flat = _random_flat(1)
    out = ev.heldout_metrics(CFG, flat, {"docs": spm_data["docs"]}, seq_len=64, batch_size=2, max_batches=2,
                             tokenizer=tok)["docs"]
    it = make_dataset(DatasetSpec(path=spm_data["docs"], split="heldout", heldout_fraction=0.02), seq_len=64,
                      global_batch_size=2, num_epochs=1, shuffle=False, process_index=0, process_count=1)
    model = model_from_flat(CFG, flat)
    nll = tokens = 0.0
    for _ in range(2):
        b = {k: v for k, v in next(it).items() if k in BATCH_KEYS}
        logp = jax.nn.log_softmax(model(b["tokens"], b["positions"], b["segment_ids"]), -1)
        tgt = np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0]
        nll -= float((tgt * b["loss_mask"]).sum())
        tokens += float(b["loss_mask"].sum())
    assert out["tokens"] == tokens and out["batches"] == 2
    assert out["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert 0 < out["bytes"] and out["bits_per_byte"] == pytest.approx(nll / math.log(2) / out["bytes"], rel=1e-5)


def test_multiple_choice_scores_by_hand():
    c, x = 5.0, ord("x")
    L = math.log(math.exp(c) + V - 1)
    lp_x, lp_other = c - L, -L  # log p of 'x' and of any other token, after every context
    examples = [{"context": "ab", "choices": ["abc", "xxx", "xyz"], "answer": 1},
                # the sum prefers the 1-token choice, the mean per token the long one of mostly 'x'
                {"context": "q", "choices": ["xxxxxxxxbb", "b"], "answer": 0},
                {"context": "", "choices": ["b", "x"], "answer": 1}]
    out = ev.multiple_choice(CFG, _controlled_flat(c, x), CharTokenizer(), examples, batch_size=4)
    assert (out["examples"], out["accuracy"], out["accuracy_unnormalized"]) == (3, 1.0, 2 / 3)
    assert out["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    p = out["predictions"]
    assert [q["pred"] for q in p] == [1, 0, 1] and [q["pred_unnormalized"] for q in p] == [1, 1, 1]
    np.testing.assert_allclose(p[0]["sum_logprob"], [3 * lp_other, 3 * lp_x, lp_x + 2 * lp_other], rtol=1e-5)
    np.testing.assert_allclose(p[1]["mean_logprob"], [(8 * lp_x + 2 * lp_other) / 10, lp_other], rtol=1e-5)
    uniform = ev.multiple_choice(CFG, _controlled_flat(), CharTokenizer(), examples, batch_size=2)
    for q in uniform["predictions"]:
        np.testing.assert_allclose(q["mean_logprob"], -math.log(V), rtol=1e-6)


def test_bundled_set_and_bad_examples(tmp_path):
    tiny = ev.load_multiple_choice("tiny")
    assert 10 <= len(tiny) <= 20 and len({e["answer"] for e in tiny}) > 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "choices": ["b"], '
                   '"answer": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*choices"):
        ev.load_multiple_choice(str(bad))

    class Wide(CharTokenizer):
        vocab_size = V + 1
    with pytest.raises(ValueError, match=f"{V + 1} ids"):  # not this model's tokenizer
        ev.multiple_choice(CFG, {}, Wide(), tiny)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_cli_end_to_end(spm_data, tmp_path):
    from qwen3_jax.checkpoint import save_params
    save_params(tmp_path / "ckpt", 7, _random_flat(), CFG)
    r = _cli("--checkpoint", tmp_path / "ckpt", "--data", f"docs={spm_data['docs']}", "--data",
             f"tiny={spm_data['tiny']}", "--split", "all", "--seq_len", 64, "--batch_size", 2, "--max_batches", 3,
             "--mc", "tiny", "--json", tmp_path / "out.json")
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "multiple choice tiny" in r.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["step"] == 7 and out["tokenizer"].endswith("spm.model")  # from the data's stats.json
    for name in ("docs", "tiny"):
        h = out["heldout"][name]
        assert h["tokens"] > 0 and h["bytes"] > 0 and 0 < h["bits_per_byte"] < 20
        assert h["loss"] == pytest.approx(math.log(V), abs=0.2)  # a random model: near uniform
    assert out["heldout"]["docs"]["batches"] == 3
    assert out["multiple_choice"]["examples"] == len(ev.load_multiple_choice("tiny"))


@pytest.mark.parametrize("ckpt, args, names", [
    ("ckpt", ["--data", "docs"], "'docs'"),
    ("ckpt", ["--data", "docs=/no/such/folder"], "/no/such/folder"),
    ("ckpt", ["--mc", "/no/such.jsonl"], "/no/such.jsonl"),
    ("nothing", ["--mc", "tiny"], "nothing"),
])
def test_cli_errors_are_one_line(tmp_path, ckpt, args, names, capsys):
    """In this process (a subprocess per case cost ~5 s of imports); one case also as a real command."""
    import importlib.util

    (tmp_path / "ckpt").mkdir()
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launch" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--checkpoint", str(tmp_path / ckpt), *args]
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and names in err, err
    assert len(err.strip().splitlines()) == 1, err
    if ckpt == "nothing":
        r = _cli(*argv)
        assert r.returncode == 2 and r.stderr == err, r.stderr
