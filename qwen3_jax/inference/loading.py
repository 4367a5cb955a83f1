"""Where a model for generation comes from: a Hugging Face folder or one of our checkpoints, and
the tokenizer, chat template and EOS ids that go with it.

Every path may be local or a bucket (`gs://...`, through `qwen3_jax.storage`): JSON files are read
where they lie; safetensors and tokenizer files are staged into a local temporary folder while the
libraries that need local files read them."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from data_pipeline.text_tokenizer import load_tokenizer, qwen3_tokenizer_dir
from qwen3_jax import hf as hf_lib
from qwen3_jax import storage
from qwen3_jax.checkpoint import restore_params_numpy
from qwen3_jax.config import ModelConfig
from qwen3_jax.hf_tokenizer import is_tokenizer_file
from qwen3_jax.inference.chat import ChatTemplate, TextGenerator
from qwen3_jax.inference.engine import Generator

QWEN3_TOKENIZER_SIZE = 151_669  # ids of the Qwen3 tokenizer (151,643 BPE + 26 added tokens)


def load_params(hf: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                dtype: str = "float32") -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """(config, flat host parameters in `dtype`, info) from exactly one of `hf` / `checkpoint` (a
    training workdir, a checkpoint root or one step folder). Parameters and compute use `dtype`.
    info: `tokenizer_dir` (a folder that may hold tokenizer files), `eos_ids` (from
    generation_config.json), `source`, `step`."""

    if (hf is None) == (checkpoint is None):
        raise ValueError("give exactly one of hf / checkpoint")
    hf_lib.np_dtype(dtype)  # a known dtype, or an error naming it
    if hf is not None:
        path = storage.path(hf)
        if not path.is_dir():
            raise FileNotFoundError(f"--hf {path}: no such folder")
        cfg = hf_lib.from_hf_config(hf_lib.read_config(path), source=str(path / "config.json"),
                                    param_dtype=dtype, compute_dtype=dtype)
        flat = hf_lib.read_hf_params(path, cfg, dtype=dtype)
        return cfg, flat, {"source": str(path), "tokenizer_dir": str(path), "eos_ids": generation_eos_ids(path)}

    if not storage.path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
    cfg, flat, step, meta = restore_params_numpy(checkpoint)
    cfg = cfg.replace(param_dtype=dtype, compute_dtype=dtype)
    target = hf_lib.np_dtype(dtype)
    flat = {k: np.asarray(v).astype(target, copy=False) for k, v in flat.items()}
    source = meta.get("source")  # an imported Hugging Face folder (convert_hf.py import)
    folder = source if source and storage.path(source).is_dir() else None
    info = {"source": str(checkpoint), "step": step, "tokenizer_dir": folder,
            "eos_ids": generation_eos_ids(folder) if folder else []}
    return cfg, flat, info


def generation_eos_ids(folder: str | os.PathLike) -> list[int]:
    """eos_token_id of a Hugging Face folder's generation_config.json (else config.json)."""
    for name in ("generation_config.json", "config.json"):
        f = storage.path(folder) / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def resolve_tokenizer(tokenizer: str | None, cfg: ModelConfig, info: dict[str, Any]) -> str:
    """The tokenizer to use: `tokenizer` if given ('qwen3', a folder, tokenizer.json or a
    sentencepiece .model), else the model folder's tokenizer files, else the real Qwen3 tokenizer
    when the model's vocabulary holds its ids."""
    if tokenizer is not None:
        if tokenizer != "qwen3" and not storage.path(tokenizer).exists():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file or folder")
        return tokenizer
    folder = info.get("tokenizer_dir")
    if folder and any((storage.path(folder) / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return str(folder)
    if cfg.vocab_size >= QWEN3_TOKENIZER_SIZE:
        return "qwen3"
    raise FileNotFoundError(f"{info.get('source')}: no tokenizer files and vocab_size={cfg.vocab_size} is smaller "
                            f"than the Qwen3 tokenizer's {QWEN3_TOKENIZER_SIZE}; pass --tokenizer")


def template_folder(tokenizer: str) -> str | None:
    """The folder whose tokenizer_config.json may hold the chat template for `tokenizer`."""
    if tokenizer == "qwen3":

        return qwen3_tokenizer_dir()
    p = storage.path(tokenizer)
    return str(p if p.is_dir() else p.parent)


def open_tokenizer(spec: str):
    """data_pipeline's tokenizer for 'qwen3' or a tokenizer file / folder, local or remote (a remote
    one's tokenizer files are staged locally while it loads); its `name` says where it lives."""

    if spec == "qwen3":
        return load_tokenizer(spec)
    with storage.staged(spec, include=is_tokenizer_file) as local:
        tok = load_tokenizer(os.fspath(local))
    tok.name = f"{tok.name.split(':', 1)[0]}:{storage.path(spec)}"
    return tok


def load_text_generator(hf: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                        tokenizer: str | None = None, dtype: str = "float32", **generator_kw: Any):
    """A ready `TextGenerator`: parameters (`load_params`), tokenizer (`resolve_tokenizer`), the
    chat template of the tokenizer's folder and EOS ids (`<|im_end|>`, `<|endoftext|>` and the
    folder's generation_config.json). `generator_kw` go to `Generator` (mesh, steps_per_call, ...)."""

    cfg, flat, info = load_params(hf, checkpoint, dtype)
    tok_path = resolve_tokenizer(tokenizer, cfg, info)
    tok = open_tokenizer(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} ids but the model only {cfg.vocab_size} "
                         f"embedding rows")
    template = ChatTemplate.from_folder(template_folder(tok_path))
    text_gen = TextGenerator(Generator(cfg, flat, **generator_kw), tok, template)
    text_gen.eos_ids = tuple(sorted(set(text_gen.eos_ids) | set(info["eos_ids"])))
    return text_gen
