"""A teacher's answers to a prompt file → a prepared response dataset (the loss on the response only).

    python launch/make_responses.py --teacher hf/qwen3-8b --prompts prompts.jsonl --out runs/data/responses
    python launch/make_responses.py --teacher runs/stage3 --prompts prompts.txt --out runs/data/responses \\
        --modes think,no_think --thinking_budget 1024 --max_new_tokens 2048 --shards 8

--teacher: a Hugging Face folder, a training workdir, a checkpoint root or one step folder (the
newest step of a root; `train.teacher` accepts the same). --prompts: .jsonl with {"prompt": text}
or {"messages": [{"role": ..., "content": ...}, ...]} per line, or .txt with one prompt per line
(blank lines skipped); a bad line stops the run naming file:line.

Records: every prompt in every mode, mode by mode (all prompts in the first mode, then all in the
next). A record is the prompt as the chat template renders it (think: the template's default,
the model opens `<think>` itself; no_think: enable_thinking=False, the template closes an empty
block) followed by the teacher's tokens up to its stop token (`<|im_end|>`), then the document
separator (`<|endoftext|>`) unless the teacher ended with it. Its prompt length (the rendered
template) goes to shard-….prompt_lengths.npy, so training scores the response tokens and the
separator only. With --thinking_budget B the think turn starts inside `<think>\\n` (those two
tokens count as response) and the stop-thinking text is inserted after B thinking tokens.
Responses cut at --max_new_tokens are kept (counted in stats.json "counts"), or left out with
--drop_truncated (counted under "skipped").

Output: data_pipeline/prepare.py's layout, through its writer: plan.json (prompts file and its
sha1, modes, teacher, sampling, shards, … : a re-run must match, else it is refused naming the
keys), shard-SSSSS-of-NNNNN.{array_record,lengths.npy,prompt_lengths.npy,json}, stats.json
(prepare.py's fields + "loss_on": "response", prompt/response tokens, teacher, modes, sampling).
Shard s holds records [s*R/N, (s+1)*R/N); a shard is written under a temporary name and renamed,
its .json last, so a killed run re-run with the same arguments redoes only the shards without a
.json. Generation batches never cross a shard or a mode, and a batch's seed comes from --seed
and its first record's index: a redone shard is byte-identical to the one an unbroken run writes.

Train on it: `make_dataset.data = @stage_mixture()`, `stage_mixture.root = 'runs/data'`,
`stage_mixture.weights = {'responses': 1.0}` (the folder's name under the root).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from data_pipeline.cli import ArgumentParser
from data_pipeline.prepare import (
    CRASH_ENV,
    PrepareError,
    ShardWriter,
    aggregate_stats,
    open_output,
    pending_shards,
    read_json,
    shard_bounds,
    write_json,
)
from qwen3_jax import storage
from qwen3_jax.errors import HFConversionError, TrainingError
from qwen3_jax.inference import SamplingConfig, load_text_generator
from qwen3_jax.train.distill import find_teacher

MODES = ("think", "no_think")
TOKENIZER_KEYS = ("tokenizer", "vocab_size", "eos_id", "dtype")  # plan keys known once the tokenizer is loaded


class ResponsesError(ValueError):
    pass


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:

    p = ArgumentParser(prog="make_responses.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--teacher", required=True, help="Hugging Face folder, training workdir or checkpoint")
    p.add_argument("--prompts", required=True, help=".jsonl ({\"prompt\": ...} / {\"messages\": [...]}) or .txt")
    p.add_argument("--out", required=True, help="the dataset folder to write (or resume)")
    p.add_argument("--modes", default="think,no_think", help="comma-separated, from think, no_think")
    p.add_argument("--thinking_budget", type=int, default=None, help="thinking tokens before the forced stop")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: Qwen3's thinking setting)")
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="'qwen3', a folder / tokenizer.json or a .model "
                                                     "(default: the teacher's files, else qwen3)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--drop_truncated", action="store_true", help="leave out responses cut at --max_new_tokens")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the teacher's compute dtype")
    p.add_argument("--steps_per_call", type=int, default=16, help="decode steps per jitted call")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES] or (["(repeated)"] if len(set(a.modes)) != len(a.modes) else [])
    if not a.modes or bad:
        p.error(f"--modes {','.join(a.modes)!r}: give distinct modes from {', '.join(MODES)} ({bad or 'none'})")
    for flag, v, lo in (("--max_new_tokens", a.max_new_tokens, 1), ("--batch_size", a.batch_size, 1),
                        ("--shards", a.shards, 1), ("--steps_per_call", a.steps_per_call, 1),
                        ("--thinking_budget", a.thinking_budget, 0), ("--limit", a.limit, 1)):
        if v is not None and v < lo:
            p.error(f"{flag} must be >= {lo}, got {v}")
    if a.thinking_budget is not None and "think" not in a.modes:
        p.error(f"--thinking_budget {a.thinking_budget} needs the think mode (--modes {','.join(a.modes)})")
    if a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        p.error(f"bad sampling settings: --temperature {a.temperature} (>= 0), --top_k {a.top_k} (>= 0), "
                f"--top_p {a.top_p} (in (0, 1])")
    return a


def read_prompts(path: str, limit: int | None = None) -> list[str | list[dict[str, Any]]]:
    """Prompts of a .jsonl ({"prompt": str} or {"messages": [...]}) or .txt (one per line) file;
    ResponsesError naming file:line for a bad line. `path` may be local or on a bucket (gs://)."""
    f = storage.path(path)
    if not f.is_file():
        raise ResponsesError(f"--prompts {path}: no such file")
    if f.suffix not in (".jsonl", ".txt"):
        raise ResponsesError(f"--prompts {path}: expected a .jsonl or .txt file")
    out: list = []
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ResponsesError(f"{path}: not UTF-8 ({e})") from None
    for n, line in enumerate(lines, 1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        if f.suffix == ".txt":
            out.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ResponsesError(f"{path}:{n}: not JSON ({e})") from None
        msgs = item.get("messages") if isinstance(item, dict) else None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"].strip():
            out.append(item["prompt"])
        elif (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                      and isinstance(m.get("content"), str) for m in msgs)):
            out.append(msgs)
        else:
            raise ResponsesError(f"{path}:{n}: expected {{\"prompt\": non-empty text}} or {{\"messages\": "
                                 f"[{{\"role\": ..., \"content\": ...}}, ...]}}")
    if not out:
        raise ResponsesError(f"{path}: no prompts")
    return out


def arg_plan(a: argparse.Namespace, prompts: list, teacher) -> dict:
    """The plan's keys known before the teacher is loaded (the rest: TOKENIZER_KEYS)."""
    return {"version": 1, "kind": "responses", "loss_on": "response", "inputs": [str(storage.path(a.prompts))],
            "prompts_sha1": hashlib.sha1(json.dumps(prompts).encode()).hexdigest(), "prompts": len(prompts),
            "modes": a.modes, "records": len(prompts) * len(a.modes), "shards": a.shards,
            "teacher": teacher.path, "teacher_step": teacher.step, "teacher_dtype": a.dtype,
            "tokenizer_arg": a.tokenizer if a.tokenizer in (None, "qwen3") else str(storage.path(a.tokenizer)),
            "thinking_budget": a.thinking_budget,
            "max_new_tokens": a.max_new_tokens, "sampling": {"temperature": a.temperature, "top_k": a.top_k,
                                                             "top_p": a.top_p},
            "seed": a.seed, "batch_size": a.batch_size, "drop_truncated": a.drop_truncated}


def batches(start: int, stop: int, prompts: int, batch_size: int) -> Iterator[range]:
    """Records [start, stop) in batches of at most batch_size that never cross a mode."""
    i = start
    while i < stop:
        end = min(stop, (i // prompts + 1) * prompts, i + batch_size)
        yield range(i, end)
        i = end


def batch_seed(seed: int, first: int) -> int:
    return zlib.crc32(f"{seed}/{first}".encode()) & 0x7FFFFFFF


def record(tg, prompt, result: dict[str, Any], thinking: bool) -> tuple[list[int], int]:
    """(token ids: rendered prompt + response + separator, prompt length)."""
    template = tg.prompt_tokens(prompt, chat=True, thinking=thinking)  # without a budget's forced <think>\n
    given = list(result["prompt_tokens"])
    n_prompt = len(template) if given[:len(template)] == template else len(given)
    ids = given + list(result["tokens"])
    if ids[-1] != tg.tokenizer.eos_id:
        ids.append(tg.tokenizer.eos_id)
    return ids, n_prompt


def _complete(out: str, plan: dict) -> dict | None:
    """stats.json of a finished dataset written with these arguments (checked before the teacher loads)."""
    plan_file, stats_file = storage.path(out) / "plan.json", storage.path(out) / "stats.json"
    old = read_json(str(plan_file)) if plan_file.exists() else None
    if not old or any(old.get(k) != v for k, v in plan.items()) or pending_shards(out, old):
        return None
    return read_json(str(stats_file)) if stats_file.exists() else None


def make_responses(a: argparse.Namespace) -> dict:
    """Writes (or finishes) the dataset of `a` (parsed flags); returns its stats."""


    prompts = read_prompts(a.prompts, a.limit)
    if len(prompts) * len(a.modes) < a.shards:
        raise ResponsesError(f"{len(prompts)} prompts x {len(a.modes)} modes cannot fill {a.shards} shards; "
                             f"use fewer --shards")
    teacher = find_teacher(a.teacher)
    plan = arg_plan(a, prompts, teacher)
    if (st := _complete(a.out, plan)) is not None:
        return st

    src = {"hf": teacher.path} if teacher.kind == "hf" else {"checkpoint": teacher.path}
    tg = load_text_generator(**src, tokenizer=a.tokenizer, dtype=a.dtype, steps_per_call=a.steps_per_call)
    tok = tg.tokenizer
    ids_max = max(tok.vocab_size, tg.generator.cfg.vocab_size)  # the teacher may sample any of its rows
    plan.update(tokenizer=tok.name, vocab_size=ids_max, eos_id=tok.eos_id,
                dtype="uint16" if ids_max <= 1 << 16 else "uint32")
    if (st := open_output(a.out, plan)) is not None:
        return st
    P, sampling, t0 = len(prompts), SamplingConfig(a.temperature, a.top_k, a.top_p), time.time()
    bounds, todo, written = shard_bounds(plan), pending_shards(a.out, plan), []
    crash_after = int(os.environ.get(CRASH_ENV, "0"))  # test hook: die mid-shard after this many shards
    bar = None
    if not a.no_progress:

        bar = tqdm(total=sum(bounds[s + 1] - bounds[s] for s in todo), unit="resp", desc=storage.path(a.out).name,
                   smoothing=0.1, file=sys.stderr)
    done_tokens = 0
    try:
        for s in todo:
            writer = ShardWriter(a.out, s, plan)
            try:
                for batch in batches(bounds[s], bounds[s + 1], P, a.batch_size):
                    mode = a.modes[batch[0] // P]
                    think = mode == "think"
                    results = tg.generate([prompts[i % P] for i in batch], chat=True, thinking=think,
                                          thinking_budget=a.thinking_budget if think else None,
                                          max_new_tokens=a.max_new_tokens, sampling=sampling,
                                          seed=batch_seed(a.seed, batch[0]))
                    for i, r in zip(batch, results):
                        writer.counts[f"{mode}_stop_{r['stop_reason']}"] += 1
                        if a.drop_truncated and r["stop_reason"] == "length":
                            writer.skipped["truncated"] += 1
                            continue
                        ids, n_prompt = record(tg, prompts[i % P], r, think)
                        writer.counts[f"{mode}_documents"] += 1
                        writer.counts[f"{mode}_thinking_tokens"] += r["thinking_tokens"]
                        writer.add(np.asarray(ids, plan["dtype"]), len(tok.decode(ids).encode("utf-8")), n_prompt)
                        done_tokens += len(r["tokens"])
                    if crash_after and len(written) >= crash_after:
                        os._exit(3)
                    if bar is not None:
                        el = max(time.time() - t0, 1e-9)
                        bar.set_postfix_str(f"{done_tokens / el:.0f} new tok/s", refresh=False)
                        bar.update(len(batch))
            except BaseException:
                writer.discard()  # leave no partial shard behind, local or staged for a bucket (a re-run redoes it)
                raise
            writer.close()
            written.append(s)
    finally:
        if bar is not None:
            bar.close()
    stats = aggregate_stats(a.out, plan, time.time() - t0, reasons=("truncated",))
    stats.update(teacher=plan["teacher"], teacher_step=plan["teacher_step"], modes=plan["modes"],
                 sampling=plan["sampling"], thinking_budget=plan["thinking_budget"],
                 max_new_tokens=plan["max_new_tokens"], seed=plan["seed"], prompts=P,
                 last_run_shards_written=written)
    write_json(str(storage.path(a.out) / "stats.json"), stats)  # a local folder or a bucket prefix
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)

    try:
        st = make_responses(a)
    except (ResponsesError, PrepareError, TrainingError, HFConversionError, FileNotFoundError, ValueError,
            OSError) as e:
        msg = str(e).replace("train.teacher=", "--teacher ").replace("\n", " ")
        print(f"make_responses.py: error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps({k: st.get(k) for k in ("documents", "tokens", "prompt_tokens", "response_tokens", "skipped",
                                             "counts")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
