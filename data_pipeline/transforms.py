"""The grain transforms of `pipeline.make_dataset`: record → document features → packed row → batch.

Document features (one array per document, all of its length):
  tokens  int32  the record's token ids
  pos     int32  0, 1, … (split_positions="continue": positions that survive packing splits)
  doc     int32  the document's index in its dataset (with_ids)
  src     int32  the dataset's index in the iterator's specs (with_ids)
  resp    int32  1 on response tokens, 0 on prompt tokens: only in runs that read a response
                 dataset (stats.json "loss_on": "response", launch/make_responses.py), all ones
                 for the plain datasets of such a run. The packers carry it like any feature
                 and `Finish` ANDs it into the loss mask: position t is scored only when its
                 target, token t+1, is a response token.
Runs without a response dataset carry no `resp`: their features, grain state and batches are
what they were before response datasets existed.
"""
from __future__ import annotations

import grain
import numpy as np

# The arrays of a training batch, all [B, T], and their dtypes.
BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
                "loss_mask": np.float32}
BATCH_KEYS = tuple(BATCH_DTYPES)


class Parse(grain.transforms.MapWithIndex):
    """uint16/uint32 record bytes → the document's features (see the module doc).

    prompt_lengths: leading prompt tokens per document of the dataset (by document index; None
    = a plain dataset); masked: emit `resp` (the run reads a response dataset)."""

    def __init__(self, dtype: str, n: int, index_map: np.ndarray | None, continue_pos: bool, with_ids: bool,
                 dataset_id: int, prompt_lengths: np.ndarray | None = None, masked: bool = False):
        self._dtype, self._n, self._index_map = np.dtype(dtype), n, index_map
        self._continue_pos, self._with_ids, self._id = continue_pos, with_ids, dataset_id
        self._prompt_lengths, self._masked = prompt_lengths, masked

    def map_with_index(self, index: int, record: bytes):
        t = np.frombuffer(record, self._dtype).astype(np.int32)
        out = {"tokens": t}
        if self._continue_pos:
            out["pos"] = np.arange(len(t), dtype=np.int32)
        index %= self._n  # later epochs see indices past the end
        doc = index if self._index_map is None else int(self._index_map[index])
        if self._with_ids:
            out["doc"] = np.full(len(t), doc, np.int32)
            out["src"] = np.full(len(t), self._id, np.int32)
        if self._masked:
            prompt = 0 if self._prompt_lengths is None else int(self._prompt_lengths[doc])
            out["resp"] = (np.arange(len(t)) >= prompt).astype(np.int32)
        return out


class SplitLong(grain.experimental.FlatMapTransform):
    """Documents longer than seq_len → consecutive seq_len pieces, every feature alike (for the
    fit packers)."""
    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self._n = seq_len

    def flat_map(self, el):
        L = len(el["tokens"])
        if L <= self._n:
            return [el]
        return [{k: v[s:s + self._n] for k, v in el.items()} for s in range(0, L, self._n)]


class Row(grain.transforms.Map):
    """A packed row (grain's `*_segment_ids` / `*_positions`) → tokens, segment_ids, positions
    (+ doc, src with ids, + resp in a masked run)."""

    def __init__(self, continue_pos: bool, with_ids: bool, masked: bool = False):
        self._continue_pos, self._with_ids, self._masked = continue_pos, with_ids, masked

    def map(self, r):
        out = {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
               "positions": r["pos"] if self._continue_pos else r["tokens_positions"]}
        if self._with_ids:
            out["doc"], out["src"] = r["doc"], r["src"]
        if self._masked:
            out["resp"] = r["resp"]
        return out


class Finish(grain.transforms.Map):
    """Stacked rows → the training batch: pads a short last batch, adds targets and loss mask
    (the target must be a response token when the rows carry `resp`)."""

    def __init__(self, batch_size: int):
        self._b = batch_size

    def map(self, rows):
        b = rows["tokens"].shape[0]
        if b < self._b:  # finite epochs: the last batch is filled with padding rows
            rows = {k: np.concatenate([v, np.zeros((self._b - b,) + v.shape[1:], v.dtype)])
                    for k, v in rows.items()}
        tok, seg = rows["tokens"].astype(np.int32), rows["segment_ids"].astype(np.int32)
        pos = np.where(seg > 0, rows["positions"], 0).astype(np.int32)
        targets = np.zeros_like(tok)
        targets[:, :-1] = tok[:, 1:]
        valid = np.zeros(tok.shape, bool)
        valid[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
        if "resp" in rows:  # score only predictions of response tokens
            valid[:, :-1] &= rows["resp"][:, 1:] > 0
        out = {"tokens": np.where(seg > 0, tok, 0), "targets": np.where(valid, targets, 0),
               "segment_ids": seg, "positions": pos, "loss_mask": valid.astype(BATCH_DTYPES["loss_mask"])}
        if "doc" in rows:
            out["doc_ids"] = np.where(seg > 0, rows["doc"], -1).astype(np.int32)
            out["dataset_ids"] = np.where(seg > 0, rows["src"], -1).astype(np.int32)
        return out


def fix_json_state(state):
    """grain's concat-then-split state holds (start, stop) tuples; JSON turns them into lists."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in s.items()} if k == "remainder_slices" else fix_json_state(s))
                for k, s in state.items()}
    if isinstance(state, list):
        return [fix_json_state(s) for s in state]
    return state
