"""Evaluate a checkpoint: held-out loss, perplexity and bits per byte per dataset; multiple choice.

  python launch/evaluate.py --checkpoint runs/stage1 --data code=data/code --data docs=data/docs \
      [--tokenizer T] [--seq_len 1024] [--batch_size 8] [--max_batches N] [--mc tiny|FILE.jsonl] [--json OUT]
  python launch/evaluate.py --hf hf/qwen3-0.6b --data web=data/web --mc tiny
  python launch/evaluate.py (--checkpoint DIR | --hf DIR) --tasks T1,T2 [--include_path DIR] \
      [--num_fewshot K] [--limit N] [--apply_chat_template] [--enable_thinking true|false] [--json OUT]

--tasks runs lm-evaluation-harness tasks (the [eval] extra: lm-eval, accelerate) through our
backend (qwen3_jax/lm_eval_model.py, fp32) and writes lm-eval's own results JSON to --json
(held-out / multiple-choice results given in the same run are added under "qwen3_jax").
Local tasks: a folder of task YAMLs (`dataset_path: json`, `dataset_kwargs: {data_files: {test:
FILE}}`) passed with --include_path; set HF_DATASETS_OFFLINE=1 to stay offline.

--checkpoint takes a training workdir (its latest step), a checkpoint root or one step folder
(--step picks another); --hf a Hugging Face folder. The tokenizer defaults to the HF folder's,
else the one the first dataset was prepared with (its stats.json). Held-out documents are the 2%
training never saw (--heldout_fraction must match training's); --split all reads whole folders.
Bits per byte: qwen3_jax/evaluate.py's docstring says exactly what is counted.
Every path (--checkpoint, --hf, --tokenizer, --mc, --json) may be a bucket (`gs://...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from data_pipeline.prepare import parse_named_datasets
from qwen3_jax import evaluate as ev
from qwen3_jax import storage
from qwen3_jax.evaluate import mc_path
from qwen3_jax.inference.loading import open_tokenizer


def _parse_data(values: list[str]) -> dict[str, str]:

    return parse_named_datasets(values)


def _default_tokenizer(args, data: dict[str, str]) -> str:
    """--tokenizer, else the HF folder's tokenizer files, else the first dataset's (its stats.json)."""
    if args.tokenizer:
        return args.tokenizer
    if args.hf and any((storage.path(args.hf) / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return args.hf
    for path in data.values():
        name = json.loads((storage.path(path) / "stats.json").read_text()).get("tokenizer", "")
        kind, _, tok = name.partition(":")
        if kind in ("spm", "hf") and storage.path(tok).exists():
            return tok
    raise ValueError("no tokenizer: pass --tokenizer (a .model, 'qwen3', or a tokenizer.json / HF folder)")


def _check_args(args) -> tuple[dict[str, str], str | None]:
    if args.checkpoint and not storage.path(args.checkpoint).exists():
        raise ValueError(f"--checkpoint {args.checkpoint}: does not exist")
    if args.hf and not (storage.path(args.hf) / "config.json").is_file():
        raise ValueError(f"--hf {args.hf}: not a Hugging Face folder (no config.json)")
    if not args.data and not args.mc and not args.tasks:
        raise ValueError("nothing to evaluate: give --data NAME=DIR, --mc and/or --tasks")
    if args.include_path and not storage.path(args.include_path).is_dir():
        raise ValueError(f"--include_path {args.include_path}: not a folder")
    for flag in ("num_fewshot", "limit"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise ValueError(f"--{flag} {v}: must be >= 0")
    for flag in ("seq_len", "batch_size", "max_batches", "lm_eval_batch_size"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise ValueError(f"--{flag} {v}: must be > 0")
    data = _parse_data(args.data)
    mc = None
    if args.mc:
        mc = mc_path(args.mc)
        if not storage.path(mc).is_file():
            raise ValueError(f"--mc {args.mc}: file {mc} does not exist")
    return data, mc


def _progress(every: float):
    last = {"t": time.perf_counter()}

    def report(p: dict) -> None:
        now = time.perf_counter()
        if now - last["t"] >= every:
            last["t"] = now
            print(f"  {p['dataset']}: {p['batches']} batches, {p['tokens']:,} tokens, "
                  f"{p['tokens'] / max(p['seconds'], 1e-9):,.0f} tokens/s", file=sys.stderr, flush=True)
    return report


def _table(held: dict, mc: dict | None, mc_name: str | None) -> str:
    lines = []
    if held:
        lines.append(f"{'dataset':<16} {'tokens':>12} {'bytes':>12} {'loss':>8} {'ppl':>10} {'bits/byte':>10}")
        for name, r in held.items():
            lines.append(f"{name:<16} {r['tokens']:>12,} {r['bytes']:>12,} {r['loss']:>8.4f} "
                         f"{r['perplexity']:>10.2f} {r['bits_per_byte']:>10.4f}")
    if mc is not None:
        lines.append(f"multiple choice {mc_name} ({mc['examples']} examples): accuracy {mc['accuracy']:.3f} "
                     f"(mean log-prob per token), {mc['accuracy_unnormalized']:.3f} (sum), chance {mc['chance']:.3f}")
    return "\n".join(lines)


def _held_out_and_mc(args, data: dict[str, str], mc_file: str | None, tok_path: str):
    """(held-out results, multiple-choice results, source, cfg, tokenizer), or an exit code."""
    t0 = time.time()
    try:
        tok = open_tokenizer(tok_path)
        if args.checkpoint:
            cfg, flat, step, _ = ev.load_checkpoint(args.checkpoint, args.step)
            source = {"checkpoint": str(storage.path(args.checkpoint)), "step": step}
        else:
            cfg, flat = ev.load_hf_params(args.hf, args.dtype)
            source = {"hf": str(storage.path(args.hf))}
        if args.compute_dtype:
            cfg = cfg.replace(compute_dtype=args.compute_dtype)
        examples = ev.load_multiple_choice(mc_file) if mc_file else None
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(f"model {cfg.name} ({cfg.num_layers} layers, vocab {cfg.vocab_size}) from {source}, tokenizer {tok.name}, "
          f"loaded in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    try:
        held = ev.heldout_metrics(cfg, flat, data, args.seq_len, args.batch_size, args.max_batches, tok,
                                  split=None if args.split == "all" else "heldout",
                                  heldout_fraction=args.heldout_fraction, loss_chunk=args.loss_chunk,
                                  progress=_progress(args.log_every)) if data else {}
        mc = ev.multiple_choice(cfg, flat, tok, examples, batch_size=args.mc_batch_size) if examples else None
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return held, mc, source, cfg, tok


def _lm_eval(args, held: dict, mc: dict | None, tok_path: str | None) -> dict:
    """lm-eval's simple_evaluate with our backend; its results dict (and ours under "qwen3_jax")."""
    import lm_eval  # the [eval] extra: only --tasks needs lm-eval
    from lm_eval.tasks import TaskManager  # the [eval] extra
    from lm_eval.utils import make_table  # the [eval] extra

    from qwen3_jax.lm_eval_model import Qwen3LM  # imports lm-eval: only for --tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}" + ("" if args.include_path else
                                                                   " (local YAMLs need --include_path DIR)"))
    lm = Qwen3LM(hf=args.hf, checkpoint=args.checkpoint, tokenizer=args.tokenizer or tok_path,
                 batch_size=args.lm_eval_batch_size, enable_thinking=args.enable_thinking)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                      limit=limit, apply_chat_template=args.apply_chat_template,
                                      log_samples=args.log_samples)
    print(make_table(results))
    if held or mc is not None:
        results["qwen3_jax"] = {"heldout": held, **({"multiple_choice": {"set": args.mc, **mc}} if mc else {})}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training workdir, checkpoint root or step folder")
    src.add_argument("--hf", help="Hugging Face model folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", default="float32", help="--hf: parameter and compute dtype")
    p.add_argument("--compute_dtype", default=None, help="override the model's compute dtype (e.g. float32)")
    p.add_argument("--tokenizer", default=None, help="a .model, 'qwen3', or a tokenizer.json / HF folder")
    p.add_argument("--data", action="append", default=[], metavar="NAME=DIR", help="prepared dataset (repeatable)")
    p.add_argument("--split", choices=("heldout", "all"), default="heldout")
    p.add_argument("--heldout_fraction", type=float, default=0.02)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batches", type=int, default=None, help="per dataset (default: all)")
    p.add_argument("--loss_chunk", type=int, default=None, help="positions per logits chunk (large vocabularies)")
    p.add_argument("--mc", default=None, help="multiple-choice JSONL file, or 'tiny' (bundled)")
    p.add_argument("--mc_batch_size", type=int, default=16)
    p.add_argument("--tasks", default=None, help="lm-eval task names, comma-separated")
    p.add_argument("--include_path", default=None, help="--tasks: a folder of extra task YAMLs")
    p.add_argument("--num_fewshot", type=int, default=None, help="--tasks: few-shot examples")
    p.add_argument("--limit", type=float, default=None, help="--tasks: examples per task (< 1: a fraction)")
    p.add_argument("--lm_eval_batch_size", type=int, default=16, help="--tasks: rows per forward / generation")
    p.add_argument("--apply_chat_template", action="store_true", help="--tasks: prompts through the chat template")
    p.add_argument("--enable_thinking", choices=("true", "false"), default=None,
                   help="--tasks with --apply_chat_template: the template's thinking switch")
    p.add_argument("--log_samples", action="store_true", help="--tasks: every request's responses in --json")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    try:
        data, mc_file = _check_args(args)
        if args.tasks and args.step is not None:
            raise ValueError("--tasks reads --checkpoint's latest step: give the step folder itself instead of --step")
        tok_path = _default_tokenizer(args, data) if data or mc_file else None
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    held, mc = {}, None
    if tok_path is not None:
        code = _held_out_and_mc(args, data, mc_file, tok_path)
        if isinstance(code, int):
            return code
        held, mc, source, cfg, tok = code
    if held or mc is not None:
        print(_table(held, mc, args.mc))
    if args.tasks:
        try:
            results = _lm_eval(args, held, mc, tok_path)
        except (ValueError, FileNotFoundError, KeyError) as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 2
        if args.json:
            storage.write_text(args.json, json.dumps(results, indent=2, default=str))
        return 0
    if args.json and tok_path is not None:
        out = {"model": cfg.name, **source, "tokenizer": tok.name, "seq_len": args.seq_len,
               "batch_size": args.batch_size, "split": args.split, "heldout": held}
        if mc is not None:
            out["multiple_choice"] = {"set": args.mc, **mc}
        storage.write_text(args.json, json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
