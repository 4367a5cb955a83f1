"""The quality_model stage: each document's bits per byte under a reference model, and the cut.

    prepare.py ... --quality rules,model:runs/ref --quality_keep_fraction 0.8
    prepare.py ... --quality model:hf/qwen3-0.6b --quality_threshold 1.1

PATH is a training workdir / checkpoint root / step folder (our layout) or a Hugging Face folder
(config.json + safetensors, e.g. an imported Qwen3). The score is computed with the model's own
pieces, as qwen3_jax/evaluate.py does: `model.hidden` and `lm_loss.token_lse_and_target` (fp32),
no model code of its own. A document is scored as one row, <|endoftext|> (a document start)
followed by its first --quality_max_chars characters (4,096) and, when that is the whole text,
the <|endoftext|> that ends it: bits per byte = Σ NLL / ln 2 / UTF-8 bytes of the scored text.
Every byte is scored (the leading separator is context); the closing separator's NLL counts, its
bytes are 0 (evaluate.py's rule). Lower is better: text the model finds likely.

Which documents: those the earlier stages kept. Scores go to qa/scores-SSSSS-of-NNNNN.npz keyed by
record index and a hash of the text, so a re-run (a crash, or another --quality_threshold /
--quality_keep_fraction in the same --out) scores only what is not there. The cut: a threshold
removes documents above it; a kept fraction keeps the lowest-scoring share ((score, record index)
order: ties broken by index), the cut going to qa/selection.json.

The model runs in the main process (the local runner with one worker), on its accelerator if it
has one: worker processes would each load the model (and JAX preallocates most of a GPU per
process). Loading an HF folder goes through qwen3_jax.hf, which sits above data_pipeline (it
imports the tokenizer export, which imports data_pipeline.text_tokenizer): it is bound by name when
such a folder is scored, so data_pipeline's static imports keep to the floors below it.
"""
from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import corpus, qa_store, qa_text
from data_pipeline.beam_run import Progress, beam, relay
from data_pipeline.shard_writer import PrepareError
from data_pipeline.text_tokenizer import load_tokenizer
from qwen3_jax import storage
from qwen3_jax.checkpoint import restore_params_numpy
from qwen3_jax.lm_loss import token_lse_and_target
from qwen3_jax.params import flat_params, flatten, model_from_flat, nest

BATCH_TOKENS = 8192  # rows x positions per forward pass (rows = BATCH_TOKENS // padded length)
PIECE_TOKENS = 1024  # positions x rows whose logits exist at once (token_lse_and_target's chunks)


def _row_nll(cfg, params, batch):
    """[B] Σ NLL (nats) over each row's loss_mask, from the model's own pieces."""
    model = model_from_flat(cfg, flatten(params))
    h_BTD, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
    B, T = batch["tokens"].shape
    lse_BT, target_BT = token_lse_and_target(model, h_BTD, batch["targets"], max(PIECE_TOKENS // B, 16))
    return jnp.sum((lse_BT - target_BT) * batch["loss_mask"], axis=-1)


def load_model(path: str):
    """(ModelConfig, flat numpy params, the folder's tokenizer or None) from a checkpoint or HF folder."""
    p = storage.path(path)
    if (p / "config.json").is_file():
        hf = importlib.import_module("qwen3_jax.hf")  # above data_pipeline: bound by name (module docstring)
        model = hf.load_hf(path, dtype="float32")
        has_tok = any((p / f).exists() for f in ("tokenizer.json", "vocab.json"))
        return model.cfg, {k: np.asarray(v) for k, v in flat_params(model).items()}, (path if has_tok else None)
    try:
        cfg, flat, _, _ = restore_params_numpy(path)
    except FileNotFoundError as e:
        raise PrepareError(f"--quality model:{path}: not a checkpoint or a Hugging Face folder ({e})") from None
    return cfg, flat, None


class DocScorer:
    """Bits per byte of documents under one model (see the module docstring)."""

    def __init__(self, model: str, tokenizer: str | None, max_chars: int, fallback_tokenizer: str):
        cfg, flat, folder_tok = load_model(model)
        self.tok = load_tokenizer(tokenizer or folder_tok or fallback_tokenizer)
        if self.tok.vocab_size > cfg.vocab_size:
            raise PrepareError(f"--quality model:{model}: its {cfg.vocab_size} embedding rows do not cover tokenizer "
                               f"{self.tok.name} ({self.tok.vocab_size} ids); pass --quality_tokenizer")
        self.max_chars = max_chars
        self.params = jax.device_put(nest({k: np.asarray(v, np.float32) for k, v in flat.items()}))
        self.step = jax.jit(functools.partial(_row_nll, cfg))

    def score(self, texts: list[str]) -> list[float]:
        eos = self.tok.eos_id
        cut = [t[:self.max_chars] for t in texts]
        ids = self.tok.encode_batch(cut)
        rows = [[eos, *x, *([eos] if len(c) == len(t) else [])] for x, c, t in zip(ids, cut, texts)]
        nbytes = [len(c.encode("utf-8")) for c in cut]
        nll = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
        k = 0
        while k < len(order):
            T = max(16, 1 << (len(rows[order[k]]) - 2).bit_length())  # padded targets per row
            B = max(1, BATCH_TOKENS // T)
            group = []
            for r in order[k:k + B]:  # ascending lengths: the rows that fit T
                if len(rows[r]) - 1 > T:
                    break
                group.append(r)
            b = {key: np.zeros((B, T), np.float32 if key == "loss_mask" else np.int32)
                 for key in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
            for row, r in enumerate(group):
                x, m = rows[r], len(rows[r]) - 1
                b["tokens"][row, :m], b["targets"][row, :m] = x[:-1], x[1:]
                b["segment_ids"][row, :m], b["positions"][row, :m], b["loss_mask"][row, :m] = 1, np.arange(m), 1.0
            out = np.asarray(jax.device_get(self.step(self.params, b)))
            for row, r in enumerate(group):
                nll[r] = float(out[row])
            k += len(group)
        return [n / math.log(2) / max(nb, 1) for n, nb in zip(nll, nbytes)]


class ScoreFn(beam.DoFn):
    """Shard s -> qa/scores-SSSSS-of-NNNNN.npz for the documents the earlier stages kept."""

    def __init__(self, job: dict):
        self.job = job

    def setup(self):
        m = self.job["qa"]["quality_model"]
        self.scorer = DocScorer(m["model"], m["tokenizer"], m["max_chars"], self.job["tokenizer"])
        self.progress = Progress(self.job["ctl"], "score")

    @relay(lambda self: self.job["ctl"])
    def process(self, s: int):
        job, plan = self.job, self.job["plan"]
        n, lo, hi = plan["shards"], job["bounds"][s], job["bounds"][s + 1]
        rem = qa_store.read(job["out"], "removed", s, n)
        gone = set(rem["idx"].tolist()) if rem is not None else set()
        old = qa_store.read(job["out"], "scores", s, n)
        cache = ({(i, h): b for i, h, b in zip(old["idx"].tolist(), old["text_hash"].tolist(), old["bpb"].tolist())}
                 if old is not None else {})
        rows, todo = [], []
        for i, raw in corpus.iter_range(plan["inputs"], plan["counts"], lo, hi, plan["text_key"]):
            d = corpus.decode(raw, plan["text_key"])
            if d.text is None or i in gone:
                continue
            h = qa_text.text_hash(d.text)
            if (i, h) in cache:
                rows.append((i, h, cache[i, h]))
            else:
                todo.append((i, h, d.text))
            if len(todo) >= 256:
                rows += self._score(todo)
                todo = []
        rows += self._score(todo)
        qa_store.write(job["out"], "scores", s, n, rows)
        self.progress.flush()
        yield s

    def _score(self, todo: list[tuple[int, int, str]]) -> list[tuple[int, int, float]]:
        if not todo:
            return []
        bpb = self.scorer.score([t for _, _, t in todo])
        self.progress.add(len(todo), 0, sum(len(t.encode("utf-8")) for _, _, t in todo))
        return [(i, h, b) for (i, h, _), b in zip(todo, bpb)]


def build(p, job: dict) -> None:
    n = job["plan"]["shards"]
    (p | "shards" >> beam.Create(list(range(n))) | "spread" >> beam.Reshuffle()
     | "score" >> beam.ParDo(ScoreFn(job)))


def select(out: str, n: int, settings: dict) -> dict:
    """qa/selection.json's cut from the scores: {"threshold": T} or {"keep_fraction": F, "cut": [bpb, index]}."""
    if "threshold" in settings:
        return {"threshold": settings["threshold"]}
    parts = [qa_store.read(out, "scores", s, n) for s in range(n)]
    bpb = np.concatenate([p["bpb"] for p in parts if p is not None] or [np.zeros(0, np.float32)])
    idx = np.concatenate([p["idx"] for p in parts if p is not None] or [np.zeros(0, np.int64)])
    keep = math.ceil(settings["keep_fraction"] * len(bpb))
    if keep >= len(bpb):
        return {"keep_fraction": settings["keep_fraction"], "cut": [1e30, 1 << 62]}
    order = np.lexsort((idx, bpb))[keep - 1] if keep else None
    cut = [float(bpb[order]), int(idx[order])] if keep else [-1e30, -1]
    return {"keep_fraction": settings["keep_fraction"], "cut": cut}
