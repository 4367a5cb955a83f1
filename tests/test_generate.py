"""Generation with a KV cache (qwen3_jax.inference, launch/generate.py) against transformers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen3_jax
from hf_utils import hf_config, random_hf_model
from qwen3_jax.inference import (THINKING_STOP_TEXT, Generator, SamplingConfig, ThinkingSpec, cache_bytes,
                                 cache_bytes_formula, init_cache, load_text_generator, sample)
from qwen3_jax.inference.engine import AFTER, FREE, THINK
from train_utils import xla_flags

ROOT = Path(__file__).resolve().parents[1]
NEW = 40  # new tokens per parity run


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The transformers reference runs tiny models: one thread (OpenMP threads spinning against
    other jobs on a shared 2-core box made its generate 25x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_greedy(model, prompt, n):
    """transformers' greedy continuation of one unpadded prompt (no EOS)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_greedy_batch(model, prompts, n):
    """transformers' greedy continuations of left-padded prompts in one batch (no EOS)."""
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, P:].tolist()


def random_params(cfg, seed=0):
    """Random flat parameters at the scales of `random_hf_model` (numpy: an eager `create_model`
    compiles one small program per initialiser, tens of seconds on a busy box)."""
    from qwen3_jax.params import param_specs

    rng = np.random.default_rng(seed)
    return {k: ((1 + 0.2 * rng.standard_normal(s.shape)) if "norm" in k else 0.15 * rng.standard_normal(s.shape))
            .astype(np.float32) for k, s in param_specs(cfg).items()}


def prompts_for(vocab, lengths=(5, 13, 9), seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in lengths]


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
# Every case: 3 prompts of 5, 13 and 9 tokens in one left-padded batch, 40 new tokens. (Dense, MQA
# and tied embeddings together: the real-vocabulary model of the chat test.)
CASES = {
    "dense-gqa-untied-headdim-yarn": dict(head_dim=16, hidden_size=24, num_attention_heads=6, num_key_value_heads=3,
                                          rope_parameters=YARN),
    "moe-gqa-sparse-step-no-scan-dense-experts": dict(num_experts=8, norm_topk_prob=True, decoder_sparse_step=2,
                                                      num_hidden_layers=4),
    "moe-mqa-tied-no-norm": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=1,
                                 tie_word_embeddings=True, norm_topk_prob=False),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny fp32 dense model (transformers and ours) and its Generator, shared by several tests."""
    ref = random_hf_model(hf_config(), seed=7)
    path = tmp_path_factory.mktemp("dense")
    ref.save_pretrained(path)
    model = qwen3_jax.load_hf(path, dtype="float32")
    return ref, model, Generator.from_model(model, steps_per_call=16)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, tmp_path):
    ref = random_hf_model(hf_config(**CASES[case]), seed=len(case))
    ref.save_pretrained(tmp_path)
    model = qwen3_jax.load_hf(tmp_path, dtype="float32", scan_layers="no-scan" not in case,
                              moe_impl="dense" if "dense-experts" in case else "ragged_dot")
    if "rope_parameters" in CASES[case]:
        assert model.cfg.rope_scaling is not None
    prompts = prompts_for(97)
    outs = Generator.from_model(model, steps_per_call=16).generate(prompts, max_new_tokens=NEW)
    for p, o, want in zip(prompts, outs, hf_greedy_batch(ref, prompts, NEW)):
        assert o.prompt_tokens == p and o.stop_reason == "length"
        assert o.tokens == want, (case, len(p))
    assert outs[0].tokens == hf_greedy(ref, prompts[0], NEW)  # = the shortest prompt alone, unpadded


def test_cache_decode_logits_equal_full_forward():
    """Left-padded prefill + one-token decode steps through `Qwen3.extend`: at every step each
    row's logits equal the full forward of that row alone (dense and MoE stacks, 2 rows)."""
    from qwen3_jax.params import model_from_flat

    cfg = qwen3_jax.get_config("tiny-moe", compute_dtype="float32", num_layers=4, mlp_only_layers=(1,),
                               moe_impl="dense")
    params = random_params(cfg, seed=1)
    assert [n for _, _, n in cfg.layer_runs()] == [1, 1, 2]
    P, S, steps = 8, 16, 5  # prompts: the first 5 and 3 tokens of each row, left-padded to 8
    lens = [5, 3]
    rows = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    tokens = np.zeros((2, P), np.int32)
    start = np.array([P - n for n in lens], np.int32)
    for b, n in enumerate(lens):
        tokens[b, P - n:] = rows[b, :n]

    @jax.jit
    def prefill(params, tokens, start):
        seg = (jnp.arange(P)[None] >= start[:, None]).astype(jnp.int32)
        pos = jnp.maximum(jnp.arange(P)[None] - start[:, None], 0)
        model = model_from_flat(cfg, params)
        h, cache = model.extend(tokens, pos, init_cache(cfg, 2, S), 0, segment_ids_BT=seg)
        return model.logits(h[:, -1:])[:, 0], cache

    @jax.jit
    def decode(params, token, start, cache, index):
        mask = (jnp.arange(S)[None, None] >= start[:, None, None]) & (jnp.arange(S)[None, None] <= index)
        model = model_from_flat(cfg, params)
        h, cache = model.extend(token[:, None], (index - start)[:, None], cache, index, mask_BTS=mask)
        return model.logits(h)[:, 0], cache

    logits, cache = prefill(params, tokens, start)
    got = [np.asarray(logits)]
    for t in range(steps):
        feed = np.array([rows[b, n + t] for b, n in enumerate(lens)], np.int32)
        logits, cache = decode(params, feed, start, cache, np.int32(P + t))
        got.append(np.asarray(logits))
    full = np.asarray(jax.jit(lambda p, x: model_from_flat(cfg, p)(x))(params, rows))  # causal: row b alone
    for b, n in enumerate(lens):
        want = full[b, n - 1:n + steps]  # the logits after the prompt, then after each fed token
        np.testing.assert_allclose(np.stack([g[b] for g in got]), want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert cache_bytes(cache) == cache_bytes_formula(cfg, 2, S) == 2 * 4 * 2 * S * 2 * 16 * 4


def test_thinking_state_machine_and_budget(dense):
    """With stand-in think tokens taken from the model's own greedy output: the phases, the count
    and the forced stop ids after exactly B thinking tokens, then transformers' continuation."""
    ref, _, gen = dense
    prompt = prompts_for(97, (6,), seed=5)[0]
    free = gen.generate([prompt], max_new_tokens=24)[0].tokens
    assert free == hf_greedy(ref, prompt, 24)
    i_open = next(i for i in range(1, 6) if free[i] not in free[:i])  # answer tokens, then <open>
    i_close = next(i for i in range(i_open + 4, 24) if free[i] not in free[:i])
    spec = ThinkingSpec(open_id=free[i_open], close_id=free[i_close])
    out = gen.generate([prompt], max_new_tokens=24, thinking=spec)[0]
    assert out.tokens == free  # no budget: nothing changes, the block is counted
    assert out.thinking_tokens == i_close - i_open - 1
    budget, stop = 2, (11, 22, free[i_close])
    spec = ThinkingSpec(open_id=free[i_open], close_id=free[i_close], budget=budget, stop_ids=stop)
    out = gen.generate([prompt], max_new_tokens=24, thinking=spec)[0]
    k = i_open + 1 + budget  # <open>, then B thinking tokens, then the stop ids
    assert out.tokens[:k] == free[:k] and tuple(out.tokens[k:k + len(stop)]) == stop
    assert out.thinking_tokens == budget and len(out.tokens) == 24
    prefix = prompt + out.tokens[:k + len(stop)]
    assert out.tokens[k + len(stop):] == hf_greedy(ref, prefix, 24 - k - len(stop))
    # a prompt that ends inside the block starts in THINK; budget 0 forces the stop ids at once
    spec0 = ThinkingSpec(open_id=free[i_open], close_id=free[i_close], budget=0, stop_ids=stop)
    out = gen.generate([prompt + [free[i_open]]], max_new_tokens=8, thinking=spec0)[0]
    assert tuple(out.tokens[:3]) == stop and out.thinking_tokens == 0
    assert [spec.initial_phase(p) for p in ([1, 2], [free[i_open], 3], [free[i_open], free[i_close]])] == \
        [FREE, THINK, AFTER]


@pytest.fixture(scope="module")
def qwen_vocab_hf(tmp_path_factory):
    """A tiny fp32 model with the real Qwen3 vocabulary, exported with the Qwen3 tokenizer files."""
    from data_pipeline.text_tokenizer import qwen3_tokenizer_dir

    cfg = hf_config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                    max_position_embeddings=1024)
    ref = random_hf_model(cfg, seed=3)
    path = tmp_path_factory.mktemp("qwen_vocab")
    ref.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(qwen3_tokenizer_dir()) / f, path / f)
    return ref, path


def _hf_template_ids(hf_tok, messages, **kw):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def test_chat_thinking_budget_against_transformers(qwen_vocab_hf):
    from transformers import AutoTokenizer

    ref, path = qwen_vocab_hf
    hf_tok = AutoTokenizer.from_pretrained(path)
    tg = load_text_generator(hf=path, steps_per_call=16)
    msgs = [{"role": "user", "content": "What is 17 * 3?"}]
    stop_ids = hf_tok(THINKING_STOP_TEXT, add_special_tokens=False)["input_ids"]
    assert list(tg.stop_ids) == stop_ids and stop_ids[-2] == hf_tok.convert_tokens_to_ids("</think>")
    B, n = 6, 48
    out = tg.generate([msgs, "Hi"], chat=True, thinking_budget=B, max_new_tokens=n)
    for o, m in zip(out, (msgs, [{"role": "user", "content": "Hi"}])):
        # the template, then the forced `<think>\n`
        assert o["prompt_tokens"] == _hf_template_ids(hf_tok, m) + hf_tok("<think>\n")["input_ids"]
        toks = o["tokens"]
        assert o["thinking_tokens"] == B and toks[B:B + len(stop_ids)] == stop_ids
        assert toks[:B] == hf_greedy(ref, o["prompt_tokens"], B)
        prefix = o["prompt_tokens"] + toks[:B + len(stop_ids)]
        assert toks[B + len(stop_ids):] == hf_greedy(ref, prefix, n - B - len(stop_ids))
        assert o["text"] == hf_tok.decode(toks) and THINKING_STOP_TEXT in o["text"]
    # budget off: the plain template (the turn open, no forced <think>), transformers' greedy tokens
    off = tg.generate([msgs], chat=True, max_new_tokens=12)[0]
    assert off["prompt_tokens"] == _hf_template_ids(hf_tok, msgs)
    assert off["tokens"] == hf_greedy(ref, off["prompt_tokens"], 12) and off["thinking_tokens"] == 0
    on = tg.generate([msgs], chat=True, thinking=True, max_new_tokens=12)[0]
    assert on["prompt_tokens"] == _hf_template_ids(hf_tok, msgs, enable_thinking=True) == off["prompt_tokens"]
    # no thinking: the template's empty block
    no = tg.generate([msgs], chat=True, thinking=False, max_new_tokens=12)[0]
    assert no["prompt_tokens"] == _hf_template_ids(hf_tok, msgs, enable_thinking=False)
    assert hf_tok.decode(no["prompt_tokens"]).endswith("<think>\n\n</think>\n\n") and no["thinking_tokens"] == 0
    with pytest.raises(ValueError, match="thinking off"):
        tg.generate([msgs], chat=True, thinking=False, thinking_budget=4)


def test_sampler_support_and_frequencies():
    """Fixed seed, 20,000 draws: top-k and top-p never leave their support and the frequencies
    follow the renormalised probabilities."""
    logits = jnp.log(jnp.array([[0.05, 0.3, 0.02, 0.25, 0.2, 0.08, 0.1]], jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)

    def freqs(cfg):
        draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, cfg)[0]))(keys))
        return np.bincount(draws, minlength=7) / len(draws)

    p = np.array([0.05, 0.3, 0.02, 0.25, 0.2, 0.08, 0.1])

    def expect(keep):
        q = np.where(keep, p, 0)
        return q / q.sum()

    f = freqs(SamplingConfig(temperature=1.0, top_k=3))
    assert set(np.nonzero(f)[0]) == {1, 3, 4}
    np.testing.assert_allclose(f, expect(np.isin(np.arange(7), [1, 3, 4])), atol=0.015)
    f = freqs(SamplingConfig(temperature=1.0, top_p=0.6))  # 0.3 + 0.25 < 0.6 <= 0.3 + 0.25 + 0.2
    assert set(np.nonzero(f)[0]) == {1, 3, 4}
    f = freqs(SamplingConfig(temperature=1.0, top_p=0.5))  # 0.3 < 0.5 <= 0.55
    np.testing.assert_allclose(f, expect(np.isin(np.arange(7), [1, 3])), atol=0.015)
    f = freqs(SamplingConfig(temperature=1.0, top_k=4))
    assert set(np.nonzero(f)[0]) == {1, 3, 4, 6}
    f = freqs(SamplingConfig(temperature=1.0, top_k=4, top_p=0.8))  # top-p over the renormalised top 4
    assert set(np.nonzero(f)[0]) == {1, 3, 4}
    f = freqs(SamplingConfig(temperature=2.0))
    t = p ** 0.5
    np.testing.assert_allclose(f, t / t.sum(), atol=0.015)
    assert int(sample(logits, keys[0], SamplingConfig())[0]) == 1


def test_sampling_reproducible_for_a_seed(dense):
    _, _, gen = dense
    prompts = prompts_for(97, (4, 9))
    hot = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95)
    a = [o.tokens for o in gen.generate(prompts, max_new_tokens=20, sampling=hot, seed=1)]
    b = [o.tokens for o in gen.generate(prompts, max_new_tokens=20, sampling=hot, seed=1)]
    c = [o.tokens for o in gen.generate(prompts, max_new_tokens=20, sampling=hot, seed=2)]
    assert a == b and a != c
    greedy = [o.tokens for o in gen.generate(prompts, max_new_tokens=20)]
    assert greedy != a
    # top-k 1 is greedy whatever the temperature and seed
    one = [o.tokens for o in gen.generate(prompts, max_new_tokens=20, sampling=SamplingConfig(1.5, top_k=1), seed=3)]
    assert one == greedy


def test_eos_and_stop_strings(dense):
    _, _, gen = dense
    prompts = prompts_for(97, (4, 9))
    greedy = [o.tokens for o in gen.generate(prompts, max_new_tokens=20)]
    eos = greedy[0][6]
    out = gen.generate(prompts, max_new_tokens=20, eos_ids=[eos])
    cut = greedy[0].index(eos) + 1
    assert out[0].tokens == greedy[0][:cut] and out[0].stop_reason == "eos"
    # stop strings over a toy detokenizer: the tokens end with the one that completes the string
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    stop = f"<{greedy[1][3]}><{greedy[1][4]}>"
    out = gen.generate(prompts[1:], max_new_tokens=20, stop_strings=[stop], decode=decode)[0]
    assert out.stop_reason == "stop_string" and decode(out.tokens).endswith(stop)
    assert out.tokens == greedy[1][:len(out.tokens)]


@pytest.mark.slow
def test_sharded_decode_equals_one_device():
    """8 fake devices: data 2 x expert 2 x tensor 2 (expert-parallel MoE, heads over tensor); 3
    prompts are padded to 4 rows. The same tokens and cache layout as one device."""
    from qwen3_jax import sharding
    from qwen3_jax.inference.cache import cache_shardings

    assert jax.device_count() == 8
    cfg = qwen3_jax.get_config("tiny-moe", compute_dtype="float32", moe_impl="dense")
    params = random_params(cfg, seed=2)
    mesh = sharding.make_mesh(sharding.MeshConfig(ici_data=2, ici_fsdp=1, ici_expert=2, ici_tensor=2))
    prompts = prompts_for(cfg.vocab_size, (5, 11, 7), seed=4)
    hot = SamplingConfig(temperature=1.0, top_k=20)
    one = Generator(cfg, params, steps_per_call=8)
    many = Generator(cfg, params, mesh=mesh, steps_per_call=8)
    assert many.params["stacks/0/layer/attn/k_proj"].sharding.spec[2] == "tensor"
    a = one.generate(prompts, max_new_tokens=24, sampling=hot, seed=5)
    b = many.generate(prompts, max_new_tokens=24, sampling=hot, seed=5)
    assert many.last_stats["padded_batch"] == 4
    assert [o.tokens for o in a] == [o.tokens for o in b]
    (k_sh, _), = cache_shardings(cfg, 4, 64, mesh)
    assert tuple(k_sh.spec) == (None, ("data", "expert"), None, "tensor", None)
    # a context axis (training's context parallelism): prefill sees each whole prompt, the cache is
    # split along its length over `context`; the same tokens
    cp_mesh = sharding.make_mesh(sharding.MeshConfig(ici_data=2, ici_fsdp=1, ici_context=2, ici_tensor=2))
    c = Generator(cfg, params, mesh=cp_mesh, steps_per_call=8).generate(prompts, max_new_tokens=24, sampling=hot,
                                                                        seed=5)
    assert [o.tokens for o in a] == [o.tokens for o in c]
    (k_sh, _), = cache_shardings(cfg, 4, 64, cp_mesh)
    assert tuple(k_sh.spec)[2] == "context"


def _cli(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    return subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cli_json_contract(qwen_vocab_hf, tmp_path):
    _, path = qwen_vocab_hf
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
    r = _cli("--hf", path, "--prompt", "Hello there", "--prompts_file", prompts, "--chat", "--thinking_budget", 3,
             "--max_new_tokens", 30, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2
    tg = load_text_generator(hf=path)
    want = tg.generate(["Hello there", [{"role": "user", "content": "2+2?"}]], chat=True, thinking_budget=3,
                       max_new_tokens=30)
    for got, w in zip(lines, want):
        assert {"prompt_tokens", "tokens", "text", "thinking_tokens"} <= set(got)
        assert (got["prompt_tokens"], got["tokens"], got["text"], got["thinking_tokens"]) == \
            (w["prompt_tokens"], w["tokens"], w["text"], 3)
        assert got["tokens"][3:3 + len(tg.stop_ids)] == list(tg.stop_ids)
    # the same model as a checkpoint of ours (as `convert_hf.py import` writes it: the tokenizer is
    # found through the imported folder); without --json the text streams to the terminal
    from qwen3_jax import hf
    from qwen3_jax import checkpoint

    cfg = hf.from_hf_config(hf.read_config(path))
    checkpoint.save_params(tmp_path / "ckpt", 0, hf.read_hf_params(path, cfg), cfg, meta={"source": str(path)})
    r = _cli("--checkpoint", tmp_path / "ckpt" / "0", "--prompt", "Hello there", "--chat", "--thinking_budget", 3,
             "--max_new_tokens", 30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want[0]["text"] + "\n"


@pytest.mark.parametrize("args,needle", [
    (["--hf", "/nonexistent/model", "--prompt", "x"], "/nonexistent/model"),
    (["--hf", ".", "--prompt", "x", "--chat", "--no_thinking", "--thinking_budget", "4"], "--thinking_budget 4"),
    (["--hf", ".", "--prompt", "x", "--thinking"], "--chat"),
    (["--hf", ".", "--prompt", "x", "--top_p", "1.5"], "--top_p 1.5"),
    (["--hf", ".", "--checkpoint", ".", "--prompt", "x"], "--checkpoint"),
    (["--hf", ".", "--prompts_file", "/nonexistent/p.jsonl"], "/nonexistent/p.jsonl"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle, capsys):
    """In this process (each case as a subprocess cost ~5 s of imports); the first one also as a
    real command, for the exit status."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "launch" / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    if needle == "/nonexistent/model":
        r = _cli(*args, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == lines, (r.stdout, r.stderr)
