"""Data made readable: a prepared dataset's stats, and packed rows decoded to text with their
document boundaries (⟦seg S: doc D of dataset, pos P–Q, N tokens⟧ … ⟦/⟧, padding as ⟦pad ×N⟧).

`launch/inspect_data.py` is the command (a dataset folder, or the training command's gin files).
"""
from __future__ import annotations

import numpy as np

from data_pipeline.pipeline import load_stats


def format_stats(path: str) -> str:
    st = load_stats(path)
    h = st["length_histogram"]
    lines = [f"{path}: {st['documents']:,} documents, {st['tokens']:,} tokens, {st['bytes'] / 1e6:.1f} MB text, "
             f"mean {st['mean_length']:.0f} tokens/doc, {len(st['shards'])} shards ({st['dtype']}), "
             f"tokenizer {st['tokenizer']}",
             "  skipped: " + ", ".join(f"{k} {v:,}" for k, v in st["skipped"].items()),
             *([f"  loss on the responses only: {st['response_tokens']:,} response tokens "
                f"({st['response_tokens'] / max(st['tokens'], 1):.1%}), {st['prompt_tokens']:,} prompt tokens"]
               if st.get("loss_on") == "response" else []),
             "  length (tokens)      docs     tokens  share"]
    for lo, d, t in zip(h["bucket_lower"], h["documents"], h["tokens"]):
        if d:
            lines.append(f"  [{lo:>7,}, {2 * lo:>7,})  {d:>7,}  {t:>10,}  {t / max(st['tokens'], 1):5.1%}  "
                         + "#" * int(40 * t / max(st["tokens"], 1)))
    return "\n".join(lines)


def format_row(batch: dict, r: int, tok, specs, max_chars: int = 600) -> str:
    seg = batch["segment_ids"][r]
    out = []
    cuts = np.flatnonzero(np.diff(seg)) + 1
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(seg)]):
        if seg[a] == 0:
            out.append(f"⟦pad ×{b - a}⟧")
            continue
        head = f"⟦seg {seg[a]}"
        if "doc_ids" in batch:
            head += f": doc {batch['doc_ids'][r, a]} of {specs[batch['dataset_ids'][r, a]].key}"
        head += f", pos {batch['positions'][r, a]}–{batch['positions'][r, b - 1]}, {b - a} tokens⟧"
        text = tok.decode(batch["tokens"][r, a:b].tolist())
        if len(text) > max_chars:
            text = text[:max_chars // 2] + f" … [{len(text) - max_chars:,} chars] … " + text[-max_chars // 2:]
        out.append(f"{head}\n{text}\n⟦/⟧")
    return "\n".join(out)
