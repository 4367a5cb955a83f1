"""Generation in JAX with a KV cache: batched prompts, sampling, chat and thinking modes.

    from qwen3_jax.inference import Generator, SamplingConfig, load_text_generator

    gen = Generator(cfg, flat_params)                  # or Generator.from_model(qwen3_jax.load_hf(dir))
    outs = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, eos_ids=[151645],
                        sampling=SamplingConfig(temperature=0.7, top_k=40, top_p=0.95), seed=0)
    outs[0].tokens, outs[0].stop_reason                # Generation: prompt_tokens, tokens, thinking_tokens, stop_reason

    tg = load_text_generator(hf="hf/qwen3-0.6b")       # params + tokenizer + chat template + EOS ids
    tg.generate(["Why is the sky blue?"], chat=True, thinking_budget=256)   # [{prompt_tokens, tokens, text, ...}]

Modules:
  engine.py    `Generator`: left-padded batch, one prefill (the training attention kernel with
               padding as segment 0), then jitted chunks of decode steps in a while_loop; buckets
               of (batch, prompt length, cache length) compile once; EOS ids, stop strings,
               thinking phases and the budget's forced stop text; `mesh=` places the parameters
               by the logical-axis rules and traces under `sharding.use_rules`.
  cache.py     the KV cache: per layer stack (k, v) of [layers, B, S, K kv heads, H].
  sampling.py  `SamplingConfig` (greedy, or temperature -> top-k -> top-p) and `sample`.
  chat.py      `ChatTemplate` (the tokenizer folder's own jinja), `TextGenerator` (text in,
               dicts out), THINKING_STOP_TEXT and the thinking modes.
  loading.py   `load_params` (Hugging Face folder or checkpoint), `resolve_tokenizer`,
               `load_text_generator`.
The model side is `Qwen3.extend` (qwen3_jax/model/transformer.py): T new tokens against a cache,
through the model's own layers, RoPE, QK-norm, attention and MoE routing (no router statistics).
"""

from qwen3_jax.inference.cache import cache_bytes, cache_bytes_formula, cache_shapes, init_cache  # noqa: F401
from qwen3_jax.inference.chat import THINKING_STOP_TEXT, ChatTemplate, TextGenerator  # noqa: F401
from qwen3_jax.inference.engine import Generation, Generator, ThinkingSpec, bucket  # noqa: F401
from qwen3_jax.inference.loading import load_params, load_text_generator, resolve_tokenizer  # noqa: F401
from qwen3_jax.inference.sampling import SamplingConfig, sample  # noqa: F401
