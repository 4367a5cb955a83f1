"""Evaluation of a checkpoint: held-out loss / perplexity / bits per byte, and multiple choice.

    cfg, flat, step, meta = load_checkpoint("runs/stage1")          # or load_hf_params("hf/dir")
    tok = load_tokenizer("runs/data/spm4k/spm.model")
    heldout_metrics(cfg, flat, {"code": "data/code"}, seq_len=1024, batch_size=8, max_batches=50,
                    tokenizer=tok)
    # -> {"code": {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "batches", "seconds"}}
    multiple_choice(cfg, flat, tok, load_multiple_choice("tiny"))
    # -> {"accuracy", "accuracy_unnormalized", "chance", "examples", "predictions"}

Held-out loss is computed by the training code's own eval step (`lm_loss.make_eval_step`) on
the held-out documents the training run never saw (the same `DatasetSpec(split="heldout")` as the
periodic eval loss), packed exactly as in training; multiple-choice scores use the model's
`hidden` + `lm_loss.token_lse_and_target`. Nothing here re-implements the model or the loss.

Bits per byte = Σ NLL (nats) / ln 2 / Σ bytes over the scored targets, where a scored target is a
token with loss_mask 1 (the next token inside the same document: a row's or document's first
token is never scored, <|endoftext|> ending a document is). Bytes come from a per-token table
(`token_byte_lengths`): the UTF-8 bytes of the raw text each token stands for, so Σ over a
document's tokens is exactly len(text.encode("utf-8")) — byte-level BPE: one byte per byte-level
character; sentencepiece: a `<0xNN>` byte piece is 1 byte, `▁` is a space. The document separator
(<|endoftext|>, added by prepare.py, not part of any text) counts 0 bytes while its NLL counts:
the cost of coding where a document ends is charged to the document's bytes.

Everything runs jitted on one device (no mesh): models that fit one accelerator.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import decoders

from data_pipeline.pipeline import BATCH_KEYS, DatasetSpec, load_stats, make_dataset
from qwen3_jax import storage
from qwen3_jax.checkpoint import restore_params_numpy
from qwen3_jax.config import ModelConfig
from qwen3_jax.hf import load_hf
from qwen3_jax.lm_loss import make_eval_step, token_lse_and_target
from qwen3_jax.params import flat_params, flatten, model_from_flat, nest

# One line per example: {"context": str, "choices": [str, ...], "answer": int (index into choices)}.
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece byte-fallback pieces
MC_SETS = {"tiny": ("data_pipeline", "evalsets/tiny_mc.jsonl")}


# -- loading ----------------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, step: int | None = None):
    """(cfg, flat numpy params, step, meta) from a training workdir, checkpoint root or step folder."""
    return restore_params_numpy(path, step)


def load_hf_params(path: str | os.PathLike, dtype: str = "float32"):
    """(cfg, flat params) from a Hugging Face folder (parameters and compute in `dtype`)."""
    model = load_hf(path, dtype=dtype)
    return model.cfg, flat_params(model)


def _device_params(params: Mapping[str, Any]):
    """Flat or nested parameters -> nested dict of device arrays (what the steps take)."""
    flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    return jax.device_put(nest(flat))


# -- bytes per token --------------------------------------------------------------------------------

def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 / Qwen byte-level BPE: the printable character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """[V] int64: UTF-8 bytes of the raw text each token id stands for (see the module docstring).

    0 for the document separator (eos_id), sentencepiece's <unk> and ids past the tokenizer's
    vocabulary (rows a model may have beyond it). One table per vocabulary, whichever loader reads
    it: a sentencepiece .model and the tokenizer.json our export writes for it (`--checkpoint` with
    the data's tokenizer and `--hf` with the export's) give the same bytes for every id. Special tokens that text can spell (with
    prepare.py --allow-special-tokens) count their spelling.
    """
    n = tokenizer.vocab_size
    V = max(n, vocab_size or 0)
    out = np.zeros(V, np.int64)
    sp = getattr(tokenizer, "_sp", None)  # sentencepiece: byte pieces and ▁ need its own view
    if sp is not None:
        for i in range(n):
            if sp.is_byte(i):
                out[i] = 1
            elif not sp.is_unknown(i):
                out[i] = len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
    else:
        hf = tokenizer._tok  # noqa: SLF001 - the `tokenizers` object behind data_pipeline's HFTokenizer
        added = hf.get_added_tokens_decoder()
        byte_level = isinstance(hf.decoder, decoders.ByteLevel)
        alphabet = _byte_level_alphabet()
        unk = getattr(hf.model, "unk_token", None)
        byte_fallback = bool(getattr(hf.model, "byte_fallback", False))
        for i in range(n):
            tok = tokenizer.id_to_token(i)
            if tok is None or (not byte_level and tok == unk and i not in added):
                continue
            if i in added:  # added tokens are stored as their literal text
                out[i] = len(added[i].content.encode("utf-8"))
            elif byte_level:  # one byte per byte-level character
                out[i] = len(tok) if all(c in alphabet for c in tok) else len(tok.encode("utf-8"))
            elif byte_fallback and _BYTE_PIECE.fullmatch(tok):
                out[i] = 1
            else:  # a sentencepiece vocabulary as a tokenizer.json (our exports): the same rule as above
                out[i] = len(tok.replace("▁", " ").encode("utf-8"))
    out[tokenizer.eos_id] = 0
    return out


# -- held-out loss, perplexity, bits per byte -------------------------------------------------------

def scored_bytes(bytes_V: np.ndarray, batch: Mapping[str, Any]) -> int:
    """UTF-8 bytes of the raw text behind a batch's scored targets (loss_mask > 0)."""
    return int(bytes_V[np.asarray(batch["targets"])][np.asarray(batch["loss_mask"]) > 0].sum())


def bits_per_byte(nll_nats: float, nbytes: int) -> float:
    return nll_nats / math.log(2) / nbytes if nbytes else float("nan")


def _check_vocab(cfg: ModelConfig, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, the model {cfg.name} only "
                         f"{cfg.vocab_size} embedding rows: not the model's tokenizer")


def heldout_metrics(model_cfg: ModelConfig, params: Mapping[str, Any], data_dirs: Mapping[str, str], seq_len: int,
                    batch_size: int, max_batches: int | None, tokenizer, *, split: str | None = "heldout",
                    heldout_fraction: float = 0.02, loss_chunk: int | None = None,
                    progress: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Per dataset name: loss (mean NLL per scored token, nats), perplexity, bits_per_byte, tokens
    (scored), bytes (of the scored tokens), batches, seconds.

    data_dirs: {name: prepared folder}. split="heldout" reads the documents training held out
    (`heldout_fraction` must match training's, 2% by default); None reads the whole folder (a
    dedicated eval set). At most `max_batches` batches of `batch_size` rows × `seq_len` per dataset
    (None: all). `progress(dict)` is called after every batch with dataset, batches, tokens, seconds.
    """
    _check_vocab(model_cfg, tokenizer)
    bytes_V = token_byte_lengths(tokenizer, model_cfg.vocab_size)
    for name, path in data_dirs.items():
        st = load_stats(path)
        if st.get("vocab_size") not in (None, tokenizer.vocab_size) or st.get("eos_id") not in (None, tokenizer.eos_id):
            raise ValueError(f"dataset {name} ({path}) was prepared with tokenizer {st.get('tokenizer')} "
                             f"(vocab {st.get('vocab_size')}), not {tokenizer.name} (vocab {tokenizer.vocab_size})")
    eval_step = jax.jit(make_eval_step(model_cfg, loss_chunk))
    dev_params = _device_params(params)
    results = {}
    for name, path in data_dirs.items():
        spec = DatasetSpec(path=path, name=name, split=split, heldout_fraction=heldout_fraction)
        try:
            it = make_dataset(spec, seq_len=seq_len, global_batch_size=batch_size, num_epochs=1, shuffle=False,
                              process_index=0, process_count=1)
        except ValueError as e:
            raise ValueError(f"dataset {name} ({path}, split={split}): {e}") from None
        nll = tokens = 0.0
        nbytes, batches, t0 = 0, 0, time.perf_counter()
        while max_batches is None or batches < max_batches:
            try:
                batch = next(it)
            except StopIteration:
                break
            out = jax.device_get(eval_step(dev_params, {k: batch[k] for k in BATCH_KEYS}))
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
            nbytes += scored_bytes(bytes_V, batch)
            batches += 1
            if progress is not None:
                progress({"dataset": name, "batches": batches, "tokens": int(tokens),
                          "seconds": time.perf_counter() - t0})
        if not tokens:
            raise ValueError(f"dataset {name} ({path}, split={split}): no tokens to score")
        loss = nll / tokens
        results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                         "bits_per_byte": bits_per_byte(nll, nbytes),
                         "tokens": int(tokens), "bytes": nbytes, "batches": batches,
                         "seconds": time.perf_counter() - t0}
    return results


# -- multiple choice --------------------------------------------------------------------------------

def mc_path(name_or_path: str) -> str:
    """A bundled set's file ('tiny') or the path itself."""
    if name_or_path in MC_SETS:
        package, rel = MC_SETS[name_or_path]
        return os.path.join(os.path.dirname(importlib.import_module(package).__file__), rel)
    return name_or_path


def load_multiple_choice(name_or_path: str) -> list[dict]:
    """Examples from a JSONL file, local or remote (or a bundled set by name); errors name the file and line."""
    path = mc_path(name_or_path)
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"multiple-choice file {path} does not exist")
    out = []
    for n, line in enumerate(storage.path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            check_example(ex)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        out.append(ex)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def check_example(ex: Any) -> None:
    if not isinstance(ex, dict) or not {"context", "choices", "answer"} <= set(ex):
        raise ValueError("an example needs the keys context, choices, answer")
    ch = ex["choices"]
    if not isinstance(ex["context"], str) or not isinstance(ch, list) or len(ch) < 2 \
            or not all(isinstance(c, str) and c for c in ch):
        raise ValueError("context must be a string and choices a list of >= 2 non-empty strings")
    if not isinstance(ex["answer"], int) or not 0 <= ex["answer"] < len(ch):
        raise ValueError(f"answer {ex['answer']!r} is not an index into the {len(ch)} choices")


def _choice_ids(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids). The choice's ids are those of context+choice after the context's
    (lm-eval-harness style), or the choice encoded alone when the joint encoding does not start
    with the context's. An empty context becomes <|endoftext|> (a document start)."""
    ctx = tokenizer.encode(context) if context else []
    if not ctx:
        return [tokenizer.eos_id], tokenizer.encode(choice)
    whole = tokenizer.encode(context + choice)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(choice)


def _logprob_step(cfg: ModelConfig):
    """(params, batch) -> [B] sum of log p(target) over loss_mask, from the model's own pieces."""
    def step(params, batch):
        model = model_from_flat(cfg, flatten(params))
        h_BTD, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
        lse_BT, target_BT = token_lse_and_target(model, h_BTD, batch["targets"])
        return jnp.sum((target_BT - lse_BT) * batch["loss_mask"], axis=-1)

    return jax.jit(step)


def _bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def multiple_choice(model_cfg: ModelConfig, params: Mapping[str, Any], tokenizer, examples: Sequence[dict], *,
                    batch_size: int = 16, max_len: int = 2048) -> dict:
    """Scores each choice by log p(choice tokens | context); picks the best per example.

    accuracy: pick by the mean log-prob per choice token (length-normalised);
    accuracy_unnormalized: pick by the summed log-prob; chance: mean of 1/len(choices).
    One row per (example, choice): context + choice, at most `max_len` tokens (the context is cut
    from the left), rows sorted by length and batched `batch_size` at a time, padded to a power of
    two (a handful of compiled shapes).
    """
    _check_vocab(model_cfg, tokenizer)
    rows = []  # (example, choice, ids, first scored target index)
    for e, ex in enumerate(examples):
        check_example(ex)
        for c, choice in enumerate(ex["choices"]):
            ctx, cont = _choice_ids(tokenizer, ex["context"], choice)
            if len(cont) >= max_len:
                raise ValueError(f"example {e}, choice {c}: {len(cont)} tokens, more than max_len={max_len}")
            ids = (ctx + cont)[-max_len - 1:]
            rows.append((e, c, ids, len(ids) - len(cont) - 1))
    step = _logprob_step(model_cfg)
    dev_params = _device_params(params)
    logp = {}
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))
    for s in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[s:s + batch_size]]
        T = _bucket(max(len(ids) - 1 for _, _, ids, _ in chunk))
        b = {k: np.zeros((batch_size, T), np.float32 if k == "loss_mask" else np.int32)
             for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
        for i, (_, _, ids, first) in enumerate(chunk):
            n = len(ids) - 1
            b["tokens"][i, :n], b["targets"][i, :n] = ids[:-1], ids[1:]
            b["segment_ids"][i, :n], b["positions"][i, :n] = 1, np.arange(n)
            b["loss_mask"][i, first:n] = 1.0
        out = np.asarray(jax.device_get(step(dev_params, b)))
        for i, (e, c, ids, first) in enumerate(chunk):
            logp[e, c] = (float(out[i]), len(ids) - 1 - first)
    preds = []
    for e, ex in enumerate(examples):
        total = [logp[e, c][0] for c in range(len(ex["choices"]))]
        mean = [logp[e, c][0] / logp[e, c][1] for c in range(len(ex["choices"]))]
        preds.append({"answer": ex["answer"], "pred": int(np.argmax(mean)), "pred_unnormalized": int(np.argmax(total)),
                      "mean_logprob": mean, "sum_logprob": total})
    n = len(examples)
    return {"examples": n,
            "accuracy": sum(p["pred"] == p["answer"] for p in preds) / n,
            "accuracy_unnormalized": sum(p["pred_unnormalized"] == p["answer"] for p in preds) / n,
            "chance": sum(1 / len(ex["choices"]) for ex in examples) / n,
            "predictions": preds}
