"""Distillation on a CPU: LM-only vs KD students at equal steps, the teacher's cost, and
on-policy vs more off-policy steps.

  python benchmarks/bench_distill.py [--teacher runs/distill_bench/teacher] [--teacher_steps 600]
      [--steps 150] [--seeds 0 1] [--alpha 0.5] [--tau 1.0] [--topk N] [--out runs/distill_bench]
  python benchmarks/bench_distill.py --onpolicy [--onpolicy_steps 60] [--seeds 0]   # after the above

Teacher: the small MoE (configs/cpu_smoke.gin: 4 layers, d_model 128, 8 experts top-2, ~2.3M
parameters) trained `--teacher_steps` steps on the built-in corpus (trained here first when
--teacher holds no checkpoint). Student: configs/distill_offpolicy.gin's default (tiny-dense: 2
layers, d_model 64, ~0.34M parameters, with the same 4,096-token vocabulary), trained from scratch for `--steps` steps of
BATCH x SEQ tokens of the code/docs mixture (50/50) through configs/distill_offpolicy.gin and the
library exactly as launch/train.py runs it, once as a plain LM (train.teacher=None) and once with
KD (train.teacher = the teacher, loss = (1-α)·LM + α·τ²·KD), same seed, same batches.

Columns: held-out loss (nats/token) and bits per byte per domain (qwen3_jax.evaluate.heldout_metrics
on the documents training never saw; the teacher's own numbers on the first line), final train LM
loss (mean of the last 10 steps), teacher-student top-1 agreement (last 10 steps), median step time
(steps 3+) and its ratio to the LM-only student's: the cost of the teacher's forward and its
output head (run twice per step: the KD chunks are rematerialised in the backward pass).
`--cost_only` measures just the step cost (report: distill_cost.json).

On-policy (`--onpolicy`): from each seed's KD student above, `--onpolicy_steps` more steps,
either on-policy (configs/distill_onpolicy.gin: prompts from the code/docs mixture, sampled
completions, reverse KL, α = 1) or off-policy (distill_offpolicy.gin, same steps, tokens, lr).
Measured on each student's own samples of held-out prompts (fixed keys): per-token reverse and
forward KL to the teacher, the student's own NLL, and held-out loss.

Each mode writes its report (date, machine, command line, settings, every run's numbers) to
`--json` (default benchmarks/reports/distill.json, or distill_onpolicy.json with --onpolicy) as
well as OUT/. The saved reports' tables, without running anything:

  python benchmarks/bench_distill.py --from_json benchmarks/reports/distill_2026-11-29.json
  python benchmarks/bench_distill.py --from_json benchmarks/reports/distill_onpolicy_2026-11-29.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_report  # noqa: E402

DOMAINS = ("code", "docs")


def common_bindings(args, seed: int, steps: int) -> list[str]:
    return [f"STEPS={steps}", f"SEQ_LEN={args.seq_len}", f"BATCH_SIZE={args.batch_size}", f"CHECKPOINT_EVERY={steps}",
            f"SEED={seed}", "train.eval_every=0", "train.sample_every=0", "train.async_checkpoint=False",
            f"train.log_every={max(steps // 5, 1)}", "train.keep_last=1", "train.loss_chunk=128",
            "stage_mixture.weights={'code': 0.5, 'docs': 0.5}", f"stage_mixture.builtin_dir='{args.data_dir}'"]


def variant_bindings(args, variant: str, teacher: str) -> list[str]:
    if variant == "lm":
        return ["TEACHER=None", f"lr_schedule.peak_lr={args.lr}"]
    return [f"TEACHER='{teacher}'", f"train.kd_alpha={args.alpha}", f"train.kd_temperature={args.tau}",
            f"train.kd_topk={args.topk}", f"lr_schedule.peak_lr={args.lr}"]


def read_train_rows(workdir: Path) -> list[dict]:
    rows = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split", "train") == "train" and "lm_loss" in rec:
            rows[rec["step"]] = rec
    return [rows[s] for s in sorted(rows)]


def train_fresh(workdir: Path, gin_file: str, bindings: list[str]) -> list[dict]:
    """Trains `gin_file` + `bindings` into a new `workdir` (a previous benchmark run there is
    removed, never resumed), the gin config saved beside it; returns its train metric rows."""
    import gin

    from qwen3_jax import configurables
    from qwen3_jax.train.loop import train

    if workdir.exists():
        shutil.rmtree(workdir)
    configurables.parse_gin([gin_file], bindings)
    model, tc = configurables.run_config()
    workdir.mkdir(parents=True)
    (workdir / "config.gin").write_text(gin.config_str())
    train(workdir, model, tc)
    return read_train_rows(workdir)


def train_teacher(args) -> None:
    from qwen3_jax import configurables
    from qwen3_jax.train.loop import train

    configurables.parse_gin(["cpu_smoke.gin"], common_bindings(args, 0, args.teacher_steps)
                            + ["lr_schedule.kind='cosine'", "lr_schedule.peak_lr=2e-3"])
    model, tc = configurables.run_config()
    train(args.teacher, model, tc)


def heldout(args, workdir, data, tokenizer) -> dict:
    from qwen3_jax.evaluate import heldout_metrics
    from qwen3_jax.checkpoint import restore_params_numpy

    cfg, flat, step, _ = restore_params_numpy(workdir)
    held = heldout_metrics(cfg, flat, data, args.seq_len, args.batch_size, args.eval_batches, tokenizer)
    return {k: {"loss": v["loss"], "bpb": v["bits_per_byte"]} for k, v in held.items()}


def run_student(args, variant: str, seed: int, data, tokenizer) -> dict:
    import numpy as np

    workdir = Path(args.out) / f"student-{variant}-seed{seed}"
    bindings = common_bindings(args, seed, args.steps) + variant_bindings(args, variant, args.teacher)
    t0 = time.time()
    rows = train_fresh(workdir, "distill_offpolicy.gin", bindings)
    last = rows[-10:]
    times = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    result = {"variant": variant, "seed": seed, "train_seconds": time.time() - t0,
              "train_lm_loss": float(np.mean([r["lm_loss"] for r in last])),
              "agree": float(np.mean([r["kd_top1_agree"] for r in last])) if variant == "kd" else None,
              "kd_loss": float(np.mean([r["kd_loss"] for r in last])) if variant == "kd" else None,
              "step_time_s": float(np.median(times)), "heldout": heldout(args, workdir, data, tokenizer),
              "bindings": bindings}
    print(f"[{variant} seed {seed}] train LM {result['train_lm_loss']:.4f}, held-out "
          + ", ".join(f"{k} {v['loss']:.4f} ({v['bpb']:.4f} bpb)" for k, v in result["heldout"].items())
          + f", {result['step_time_s']:.2f} s/step ({result['train_seconds']:.0f}s)", flush=True)
    return result


def step_cost(args, repeats: int = 15) -> dict:
    """The teacher's cost in one process, free of the run-to-run noise of a shared machine: the
    compiled LM-only and KD steps' FLOPs (XLA cost analysis) and their times, interleaved
    (LM, KD, LM, KD, ...) on the same batch, medians over `repeats` calls each."""
    import jax
    import numpy as np

    from qwen3_jax import configurables
    from qwen3_jax.train.build import build
    from qwen3_jax.train.distill import load_teacher_params

    out, progs, states, extra, compiled = {}, {}, {}, {}, {}
    for variant in ("lm", "kd"):
        configurables.parse_gin(["distill_offpolicy.gin"], common_bindings(args, 0, args.steps)
                                + variant_bindings(args, variant, args.teacher))
        model, tc = configurables.run_config()
        prog = progs[variant] = build(model, tc, jax.devices()[:1])
        compiled[variant] = prog.compiled or prog.lower().compile()
        cost = compiled[variant].cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[f"{variant}_gflops"] = float(cost.get("flops", float("nan"))) / 1e9
        states[variant] = prog.init_state()
        extra[variant] = (load_teacher_params(prog.distill),) if prog.distill is not None else ()
    rng = np.random.RandomState(0)
    B, T = args.batch_size, args.seq_len
    tokens = rng.randint(0, 4096, (B, T)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((B, T), np.float32),
             "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    times = {"lm": [], "kd": []}
    for i in range(repeats + 2):
        for variant in ("lm", "kd"):
            t0 = time.perf_counter()
            states[variant], m = compiled[variant](states[variant], batch, *extra[variant])
            jax.block_until_ready(m["loss"])
            if i >= 2:
                times[variant].append(time.perf_counter() - t0)
    for variant in ("lm", "kd"):
        out[f"{variant}_step_s"] = float(np.median(times[variant]))
    out["time_ratio"] = out["kd_step_s"] / out["lm_step_s"]
    out["flops_ratio"] = out["kd_gflops"] / out["lm_gflops"]
    print(f"step cost (same process, interleaved, median of {repeats}): LM-only {out['lm_step_s'] * 1e3:.0f} ms "
          f"({out['lm_gflops']:.2f} GFLOP), KD {out['kd_step_s'] * 1e3:.0f} ms ({out['kd_gflops']:.2f} GFLOP): "
          f"{out['time_ratio']:.2f}x time, {out['flops_ratio']:.2f}x FLOPs", flush=True)
    return out


def onpolicy_bindings(args, seed: int, steps: int, variant: str, start: Path) -> list[str]:
    """Continuing a KD student: 'on' = configs/distill_onpolicy.gin (reverse KL on its own samples),
    'off' = more off-policy KD (distill_offpolicy.gin's settings), both from `start`'s parameters."""
    out = common_bindings(args, seed, steps) + [f"TEACHER='{args.teacher}'", f"lr_schedule.peak_lr={args.onpolicy_lr}",
                                                "lr_schedule.warmup_steps=5",
                                                f"SEQ_LEN={args.prompt_len + args.completion_len - 1}"]
    if variant == "on":
        return out + [f"PREVIOUS_STAGE='{start}'", f"PROMPT_LEN={args.prompt_len}"]
    return out + [f"train.init_from='{start}'", f"train.kd_alpha={args.alpha}", "train.kd_divergence='forward'"]


def on_samples_kl(args, workdir: Path, seed: int, start: Path) -> dict:
    """The on-policy objective, measured: the student samples completions of held-out prompts
    (fixed prompts and keys, the rollout train.py runs), and the mean per-token reverse
    KL(student‖teacher) and forward KL(teacher‖student) on those samples, plus the student's own NLL."""
    import jax
    import numpy as np

    from data_pipeline.pipeline import DatasetSpec, make_dataset
    from qwen3_jax import configurables
    from qwen3_jax.params import nest
    from qwen3_jax.train.build import build
    from qwen3_jax.checkpoint import restore_params_numpy
    from qwen3_jax.train.distill import load_teacher_params
    from qwen3_jax.train.loop import _global_batch, onpolicy_eos_id
    from qwen3_jax.train.step import make_loss_fn

    configurables.parse_gin(["distill_onpolicy.gin"], onpolicy_bindings(args, seed, 1, "on", start))
    model, tc = configurables.run_config()
    prog = build(model, tc, jax.devices()[:1])
    teacher = load_teacher_params(prog.distill)
    _, flat, step, _ = restore_params_numpy(workdir)
    params = jax.device_put(nest(flat))
    out = {}
    for div in ("reverse", "forward"):
        prog.distill.kd = dataclasses.replace(prog.distill.kd, divergence=div, alpha=1.0)
        loss_fn = jax.jit(make_loss_fn(model, tc.loss, distill=prog.distill))
        kd = lm = tokens = 0.0
        for d in DOMAINS:
            spec = DatasetSpec(path=args.parts[d], name=d, split="heldout", heldout_fraction=0.02)
            it = make_dataset(spec, seq_len=args.prompt_len, global_batch_size=args.batch_size, shuffle=False,
                              packing="first_fit", process_index=0, process_count=1)
            eos = onpolicy_eos_id(tc, it)
            for i in range(args.eval_batches):
                prompts = _global_batch(next(it), prog)
                batch = prog.rollout(params, {k: prompts[k] for k in ("tokens", "segment_ids")},
                                     np.int32(1_000_000 + i), np.int32(eos))
                n = float(np.sum(batch["loss_mask"]))
                _, (lm_i, _, _, _, stats) = loss_fn(params, batch, 1.0, None, teacher)
                kd, lm, tokens = kd + float(stats["kd"]), lm + float(lm_i), tokens + n
        out[f"{div}_kl"] = kd / tokens
        out["own_nll"] = lm / tokens
    out["tokens"] = tokens
    return out


def run_onpolicy(args, seed: int, data, tokenizer) -> list[dict]:
    """From the off-policy KD student of `seed`: `--onpolicy_steps` more steps on-policy vs off-policy."""
    start = Path(args.out) / f"student-kd-seed{seed}"
    if not (start / "checkpoints").exists():
        raise SystemExit(f"error: {start}: no off-policy KD student (run without --onpolicy first)")
    rows = [{"variant": "start", "seed": seed, "heldout": heldout(args, start, data, tokenizer),
             "samples": on_samples_kl(args, start, seed, start)}]
    for variant in ("off", "on"):
        workdir = Path(args.out) / f"student-{variant}policy-seed{seed}"
        gin_file = "distill_onpolicy.gin" if variant == "on" else "distill_offpolicy.gin"
        t0 = time.time()
        r = train_fresh(workdir, gin_file, onpolicy_bindings(args, seed, args.onpolicy_steps, variant, start))
        rows.append({"variant": variant, "seed": seed, "train_seconds": time.time() - t0,
                     "step_time_s": sum(x["step_time_s"] for x in r[2:]) / max(len(r) - 2, 1),
                     "heldout": heldout(args, workdir, data, tokenizer),
                     "samples": on_samples_kl(args, workdir, seed, start)})
    for r in rows:
        print(f"[{r['variant']}-policy seed {seed}] held-out " + ", ".join(
            f"{k} {v['loss']:.4f}" for k, v in r["heldout"].items()) + f"; on its own samples: reverse KL "
            f"{r['samples']['reverse_kl']:.4f}, forward KL {r['samples']['forward_kl']:.4f}, own NLL "
            f"{r['samples']['own_nll']:.4f}", flush=True)
    return rows


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def onpolicy_table(rows: list[dict]) -> str:
    lines = ["| student | seed | " + " | ".join(f"held {d}" for d in DOMAINS) + " | rev KL | fwd KL | own NLL | s/step |",
             "|---|---|" + "---|" * (len(DOMAINS) + 4)]
    for r in rows:
        name = {"start": "off-policy", "off": "+off-policy", "on": "+on-policy"}[r["variant"]]
        smp = r["samples"]
        lines.append(f"| {name} | {r['seed']} | " + " | ".join(f"{r['heldout'][d]['loss']:.3f}" for d in DOMAINS)
                     + f" | {smp['reverse_kl']:.3f} | {smp['forward_kl']:.3f} | {_num(smp.get('own_nll'), '.3f')} | "
                     f"{_num(r.get('step_time_s'), '.2f')} |")
    return "\n".join(lines)


def table(teacher: dict, results: list[dict]) -> str:
    lm_times = [r["step_time_s"] for r in results if r["variant"] == "lm" and r.get("step_time_s") is not None]
    ref = sum(lm_times) / len(lm_times) if lm_times else None
    lines = ["| run | seed | " + " | ".join(f"held {d} (bpb)" for d in DOMAINS)
             + " | train LM | top-1 agreement | s/step | vs LM |", "|---|---|" + "---|" * (len(DOMAINS) + 4),
             "| teacher | | " + " | ".join(f"{teacher[d]['loss']:.3f} ({teacher[d]['bpb']:.3f})" for d in DOMAINS)
             + " | | | | |"]
    for r in results:
        t = r.get("step_time_s")
        rel = f"{t / ref:.2f}x" if ref and t is not None else "-"
        lines.append(f"| {r['variant']} | {r['seed']} | "
                     + " | ".join(f"{r['heldout'][d]['loss']:.3f} ({r['heldout'][d]['bpb']:.3f})" for d in DOMAINS)
                     + f" | {_num(r.get('train_lm_loss'), '.3f')} | {_num(r.get('agree'), '.3f')} | "
                     f"{_num(t, '.2f')} | {rel} |")
    return "\n".join(lines)


def cost_line(cost: dict) -> str:
    return (f"Teacher's cost per step (one process, LM-only and KD steps interleaved, medians): LM-only "
            f"{cost['lm_step_s'] * 1e3:.0f} ms ({cost['lm_gflops']:.2f} GFLOP), KD {cost['kd_step_s'] * 1e3:.0f} ms "
            f"({cost['kd_gflops']:.2f} GFLOP): {cost['time_ratio']:.2f}x time, {cost['flops_ratio']:.2f}x FLOPs.")


def markdown(report: dict) -> str:
    """The tables of a report written by this script (or transcribed into its format)."""
    lines = [bench_report.provenance(report) + ".",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in report["settings"].items()) + "."]
    if report.get("note"):
        lines.append(report["note"])
    lines.append("")
    if report["kind"] == "onpolicy":
        lines.append(onpolicy_table(report["rows"]))
    else:
        if report.get("results"):
            lines += [table(report["teacher"], report["results"]), ""]
        if report.get("step_cost"):
            lines.append(cost_line(report["step_cost"]))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(ROOT / "runs" / "distill_bench" / "teacher"))
    p.add_argument("--teacher_steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", default="lm,kd")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--data_dir", default=str(ROOT / "runs" / "data" / "stdlib"))
    p.add_argument("--out", default=str(ROOT / "runs" / "distill_bench"))
    p.add_argument("--cost_only", action="store_true", help="only the step-cost comparison (no training runs)")
    p.add_argument("--onpolicy", action="store_true", help="from each seed's KD student: on-policy vs more "
                   "off-policy steps (--onpolicy_steps), compared on held-out loss and KL on their own samples")
    p.add_argument("--onpolicy_steps", type=int, default=60)
    p.add_argument("--onpolicy_lr", type=float, default=5e-4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--completion_len", type=int, default=97)
    p.add_argument("--json", default=None, help="where the report goes (default benchmarks/reports/"
                   "distill.json, or distill_onpolicy.json with --onpolicy)")
    p.add_argument("--from_json", metavar="FILE", help="print the tables of a saved report; run nothing")
    args = p.parse_args(argv)
    if args.from_json:
        print(markdown(bench_report.load(args.from_json)), end="")
        return 0
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - {"lm", "kd"}:
        print(f"error: --variants {args.variants!r}: choose from lm,kd", file=sys.stderr)
        return 2
    for flag in ("steps", "teacher_steps", "seq_len", "batch_size", "eval_batches"):
        if getattr(args, flag) <= 0:
            print(f"error: --{flag} {getattr(args, flag)}: must be > 0", file=sys.stderr)
            return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from data_pipeline.prepare import prepare_builtin
    from data_pipeline.text_tokenizer import load_tokenizer
    from qwen3_jax import checkpoint as ckpt

    parts = prepare_builtin(os.path.join(args.data_dir, "spm4096"), "spm", spm_vocab_size=4096)  # no-op once done
    data = {d: parts[d] for d in DOMAINS}
    with open(os.path.join(data["code"], "stats.json")) as f:
        tokenizer = load_tokenizer(json.load(f)["tokenizer"].partition(":")[2])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    has_teacher = Path(args.teacher).exists() and ckpt.latest_step(ckpt.checkpoint_root(args.teacher)[0]) is not None
    if not has_teacher:
        print(f"training the teacher ({args.teacher_steps} steps) in {args.teacher}", flush=True)
        train_teacher(args)
    teacher = heldout(args, args.teacher, data, tokenizer)
    print("teacher held-out: " + ", ".join(f"{k} {v['loss']:.4f} ({v['bpb']:.4f} bpb)" for k, v in teacher.items()),
          flush=True)
    if args.onpolicy:
        args.parts = data
        rows = [r for s in args.seeds for r in run_onpolicy(args, s, data, tokenizer)]
        report = {**bench_report.header("bench_distill"), "kind": "onpolicy",
                  "settings": {k: getattr(args, k) for k in (
                      "teacher", "seeds", "onpolicy_steps", "onpolicy_lr", "prompt_len", "completion_len",
                      "batch_size", "eval_batches", "alpha")},
                  "teacher_heldout": teacher, "rows": rows, "seconds": time.time() - t0}
        out = bench_report.write(args.json or bench_report.REPORTS / "distill_onpolicy.json", report)
        bench_report.write(Path(args.out) / "results_onpolicy.json", report)
        print(markdown(report), end="")
        print(f"({time.time() - t0:.0f}s; results in {out})")
        return 0
    cost = step_cost(args)
    results = [] if args.cost_only else [run_student(args, v, s, data, tokenizer)
                                         for s in args.seeds for v in variants]
    settings = {k: getattr(args, k) for k in ("teacher", "steps", "seeds", "alpha", "tau", "topk", "seq_len",
                                                "batch_size", "lr", "eval_batches")}
    report = {**bench_report.header("bench_distill"), "kind": "students", "settings": settings,
              "teacher": teacher, "step_cost": cost, "results": results, "seconds": time.time() - t0}
    name = "distill_cost.json" if args.cost_only else "distill.json"
    out = bench_report.write(args.json or bench_report.REPORTS / name, report)
    bench_report.write(Path(args.out) / name.replace("distill", "results"), report)
    print(markdown(report), end="")
    print(f"({time.time() - t0:.0f}s; results in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
