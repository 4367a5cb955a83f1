"""Which prepared datasets a stage reads: named mixtures and stage 3's length buckets.

`qwen3_jax.configurables` registers these for the stage files (`stage_mixture.*`,
`long_context_mix.*`)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
from jax.experimental import multihost_utils

from data_pipeline.corpus import BUILTIN_CACHE_DIR
from data_pipeline.pipeline import DatasetSpec, LengthBuckets, Mixture, load_stats
from data_pipeline.prepare import prepare_builtin
from qwen3_jax.errors import TrainingError

BUILTIN = "builtin:python-stdlib"


def stage_mixture(weights: Mapping[str, float], root: str = BUILTIN, *,
                  tokenizer: str = "spm", builtin_dir: str = BUILTIN_CACHE_DIR,
                  spm_vocab_size: int = 4096, split: str | None = "train",
                  heldout_fraction: float = 0.02) -> Mixture:
    """Named datasets with token shares, each a prepared folder `root/<name>`.

    root = "builtin:python-stdlib" stands in for a real corpus on any machine: the built-in
    Python-stdlib corpus is prepared once (idempotent) under `builtin_dir`, `code` reads its
    sources and every other name its documentation, so a stage file runs unchanged on a laptop.
    tokenizer (builtin only): "spm" (a sentencepiece BPE of `spm_vocab_size` trained on the corpus)
    or "qwen3" (the real Qwen3 tokenizer, for the published presets' vocabulary).
    split: "train" leaves out a fixed `heldout_fraction` of each dataset's documents, which
    split="heldout" (the eval data) reads; None reads everything.
    """
    if root != BUILTIN:
        paths = {name: os.path.join(root, name) for name in weights}
    else:
        paths = _builtin_paths(weights, tokenizer, builtin_dir, spm_vocab_size)
    return Mixture(datasets=[DatasetSpec(path=paths[name], name=name, weight=float(w), split=split,
                                         heldout_fraction=heldout_fraction if split else 0.0)
                             for name, w in weights.items()])


def _builtin_paths(weights, tokenizer, builtin_dir, spm_vocab_size) -> dict[str, str]:


    sub = f"{tokenizer}{spm_vocab_size}" if tokenizer == "spm" else tokenizer
    out = os.path.join(builtin_dir, sub)
    if jax.process_count() > 1:  # process 0 prepares first, so processes sharing a disk never race
        if jax.process_index() == 0:
            prepare_builtin(out, tokenizer, spm_vocab_size=spm_vocab_size)
        multihost_utils.sync_global_devices(f"builtin corpus {out}")
    parts = prepare_builtin(out, tokenizer, spm_vocab_size=spm_vocab_size)  # a no-op once prepared
    return {name: parts["code"] if name == "code" else parts["docs"] for name in weights}


def long_context_mix(source, *, buckets: Sequence[tuple[int, int, float]]) -> LengthBuckets:
    """Stage 3's length-bucketed view of `source` (lo < document length <= hi, token share)."""
    return LengthBuckets(source=source, buckets=tuple(tuple(b) for b in buckets))


def check_vocab(data_it, vocab_size: int, what: str = "train.make_data") -> None:
    """Fails before compile when the data was tokenized with more ids than the model's vocabulary
    (those ids would index past the embedding: NaN from the first step). Reads each prepared
    dataset's stats.json (`vocab_size`, written by data_pipeline/prepare.py); iterators that name
    no prepared dataset are not checked."""


    for spec in getattr(data_it, "specs", None) or []:
        stats = load_stats(spec.path)
        data_vocab = stats.get("vocab_size")
        if data_vocab is not None and int(data_vocab) > vocab_size:
            raise TrainingError(
                f"{what}: dataset {spec.path} was tokenized with {stats.get('tokenizer', '?')} (vocab_size "
                f"{data_vocab}) but the model's vocab_size is {vocab_size}: token ids up to {int(data_vocab) - 1} "
                f"would index past the embedding. Use a model with vocab_size >= {data_vocab} "
                f"(model_config.vocab_size) or data prepared with the model's tokenizer")
