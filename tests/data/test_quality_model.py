"""prepare.py --quality model:PATH: bits per byte under a checkpoint or a Hugging Face folder (the
same figure as the evaluation path's eval step), the cut by threshold or kept fraction, and a
re-run with another cut that rewrites the shards without scoring again."""
import json
import math

import jax
import numpy as np
import pytest

from data_pipeline import qa_model, qa_store
from data_pipeline.prepare import prepare
from data_pipeline.text_tokenizer import load_tokenizer
from qwen3_jax.checkpoint import save_params
from qwen3_jax.config import get_config
from qwen3_jax.evaluate import bits_per_byte
from qwen3_jax.lm_loss import make_eval_step
from qwen3_jax.model import create_model
from qwen3_jax.params import flat_params, nest

CFG = get_config("tiny-dense", compute_dtype="float32")  # vocab 512: the session's spm512 tokenizer


@pytest.fixture(scope="module")
def models(spm512, tmp_path_factory):
    """{'ckpt': checkpoint root, 'hf': Hugging Face folder (with the tokenizer), 'flat': params}."""
    from qwen3_jax.hf import save_hf
    root = tmp_path_factory.mktemp("ref_model")
    model = create_model(CFG, 0)
    flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
    save_params(str(root / "ckpt"), 1, flat, CFG)
    save_hf(model, str(root / "hf"), tokenizer=spm512["tokenizer"], dtype="float32")
    return {"ckpt": str(root / "ckpt"), "hf": str(root / "hf"), "flat": flat}


TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog. " * 5,
         "zq xv kj wp " * 10, "Grüße aus Köln — 日本語 and some plain text.", "abc " * 400]  # the last one cut
MAX_CHARS = 600


def test_bits_per_byte_is_the_eval_steps_figure_from_checkpoint_and_hf(models, spm512):
    tok = load_tokenizer(spm512["tokenizer"])
    ckpt = qa_model.DocScorer(models["ckpt"], None, MAX_CHARS, spm512["tokenizer"]).score(TEXTS)
    hf = qa_model.DocScorer(models["hf"], None, MAX_CHARS, "qwen3").score(TEXTS)  # the folder's own tokenizer
    np.testing.assert_allclose(ckpt, hf, rtol=1e-5)
    step = jax.jit(make_eval_step(CFG))
    params = jax.device_put(nest(models["flat"]))
    for text, got in zip(TEXTS, ckpt):
        cut = text[:MAX_CHARS]
        ids = [tok.eos_id, *tok.encode(cut), *([tok.eos_id] if cut == text else [])]
        n = len(ids) - 1
        batch = {"tokens": np.array([ids[:-1]], np.int32), "targets": np.array([ids[1:]], np.int32),
                 "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n, dtype=np.int32)[None],
                 "loss_mask": np.ones((1, n), np.float32)}
        out = jax.device_get(step(params, batch))
        assert got == pytest.approx(bits_per_byte(float(out["nll_sum"]), len(cut.encode("utf-8"))), rel=2e-5)
    assert all(math.isfinite(x) and x > 0 for x in ckpt)


def test_keep_fraction_threshold_and_a_recut_without_rescoring(models, spm512, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(300)]
    docs = [" ".join(rng.choice(words, 20 + i % 50)) for i in range(60)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "out"
    args = dict(shards=3, workers=0, progress=False, quality=f"model:{models['ckpt']}")
    st = prepare([str(tmp_path / "in.jsonl")], spm512["tokenizer"], str(out), quality_keep_fraction=0.5, **args)
    assert st["documents"] == 30 and st["qa"]["removed"] == {"low_quality": 30}
    scores = {}
    for s in range(3):
        sc = qa_store.read(str(out), "scores", s, 3)
        scores.update(zip(sc["idx"].tolist(), sc["bpb"].tolist()))
    assert sorted(scores) == list(range(60))
    kept_scores = sorted(scores.values())[:30]
    assert st["qa"]["quality_model"]["selection"]["cut"][0] == pytest.approx(kept_scores[-1])
    assert (out / "report" / "quality_model.png").exists()
    samples = [json.loads(x) for x in (out / "removed_samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reason"] == "low_quality" and "bits per byte" in s["detail"] for s in samples)

    def no_scoring(*a, **k):
        raise AssertionError("scored again")
    monkeypatch.setattr(qa_model.DocScorer, "__init__", no_scoring)
    threshold = float(np.median(list(scores.values())))
    st = prepare([str(tmp_path / "in.jsonl")], spm512["tokenizer"], str(out), quality_threshold=threshold, **args)
    assert st["documents"] == sum(v <= threshold for v in scores.values())
    assert "the quality cut changed" in capsys.readouterr().err
    assert json.loads((out / "plan.json").read_text())["qa"]["quality_model"]["threshold"] == threshold
    assert st["last_run_shards_written"] == [0, 1, 2]
