"""Gin glue between the training loop and data_pipeline: which prepared datasets a stage reads."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import gin

from data_pipeline.pipeline import LengthBuckets, Mixture

BUILTIN = "builtin:python-stdlib"


@gin.configurable
def stage_mixture(weights: Mapping[str, float] = gin.REQUIRED, root: str = BUILTIN, *,
                  tokenizer: str = "spm", builtin_dir: str = "runs/data/stdlib",
                  spm_vocab_size: int = 4096) -> Mixture:
    """Named datasets with token shares, each a prepared folder `root/<name>`.

    root = "builtin:python-stdlib" stands in for a real corpus on any machine: the built-in
    Python-stdlib corpus is prepared once (idempotent) under `builtin_dir`, `code` reads its
    sources and every other name its documentation, so a stage file runs unchanged on a laptop.
    tokenizer (builtin only): "spm" (a sentencepiece BPE of `spm_vocab_size` trained on the corpus)
    or "qwen3" (the real Qwen3 tokenizer, for the published presets' vocabulary).
    """
    if root != BUILTIN:
        return Mixture(weights=dict(weights), root=root)
    from data_pipeline.prepare import prepare_builtin

    sub = f"{tokenizer}{spm_vocab_size}" if tokenizer == "spm" else tokenizer
    parts = prepare_builtin(os.path.join(builtin_dir, sub), tokenizer, spm_vocab_size=spm_vocab_size)
    paths = {name: parts["code"] if name == "code" else parts["docs"] for name in weights}
    return Mixture(weights=dict(weights), paths=paths)


@gin.configurable
def long_context_mix(source=gin.REQUIRED, *, buckets: Sequence[tuple[int, int, float]] = gin.REQUIRED) -> LengthBuckets:
    """Stage 3's length-bucketed view of `source` (lo < document length <= hi, token share)."""
    return LengthBuckets(source=source, buckets=tuple(tuple(b) for b in buckets))
