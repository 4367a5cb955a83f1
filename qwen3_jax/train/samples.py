"""Samples printed during training (`train.sample_every`): the current parameters, a fixed prompt
list, our own KV-cache decoder (qwen3_jax.inference), the training data's tokenizer."""

from __future__ import annotations

from typing import Sequence

from data_pipeline.pipeline import load_stats
from data_pipeline.text_tokenizer import load_tokenizer
from qwen3_jax.config import ModelConfig
from qwen3_jax.inference import Generator
from qwen3_jax.params import flatten


def data_tokenizer(data_it) -> str:
    """The tokenizer the training data was prepared with (its stats.json), as load_tokenizer takes it."""

    specs = getattr(data_it, "specs", None)
    if not specs:
        raise ValueError("train.sample_every: the data iterator names no prepared dataset; set train.sample_tokenizer")
    name = load_stats(specs[0].path)["tokenizer"]
    return name.split(":", 1)[1] if name.startswith(("spm:", "hf:")) else name


def print_samples(model: ModelConfig, params, mesh, tokenizer: str, prompts: Sequence[str], step: int,
                  max_new_tokens: int, primary: bool) -> list[str]:
    """Greedy continuations of `prompts` from `params` (sharded on `mesh`: every process takes
    part, process 0 prints). Returns the texts."""

    tok = load_tokenizer(tokenizer)
    gen = Generator(model, flatten(params), mesh=mesh)
    outs = gen.generate([tok.encode(p) for p in prompts], max_new_tokens=max_new_tokens, eos_ids=[tok.eos_id])
    texts = [tok.decode([t for t in o.tokens if t != tok.eos_id]) for o in outs]
    if primary:
        for p, t in zip(prompts, texts):
            print(f"[sample] step {step}: {p!r} -> {t!r}", flush=True)
    return texts
