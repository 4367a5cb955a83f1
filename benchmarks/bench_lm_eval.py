"""lm-eval throughput on this CPU: our backend (qwen3_jax/lm_eval_model.py) vs lm-eval's `hf` backend.

  python benchmarks/bench_lm_eval.py [--examples 64] [--layers 2] [--d_model 256] [--batch_size 16]
  python benchmarks/bench_lm_eval.py --from_json benchmarks/reports/lm_eval.json   # print a report

One random fp32 model (`tiny-dense` widened to --d_model, --layers, the real Qwen3 tokenizer and
its 151,936-row vocabulary, tied) exported with write_hf_folder; both backends read that folder.
Tasks (local YAMLs written to a temporary folder): multiple choice (--examples x 4 choices,
`loglikelihood`), perplexity over --examples texts (`loglikelihood_rolling`) and greedy generation
of 16 tokens (`generate_until`, --examples // 4 prompts). Each backend runs every task twice;
requests/s is from the second run (compiles and caches warm; the first run's seconds are reported
apart). Requests = lm-eval's instances of the task (one per choice for multiple choice).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has "
         "had one first new two their after also who they been its time but into other when she there all "
         "def return print class import self value list data file code run test model token").split()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402  (benchmarks/bench_report.py: report header, provenance line)

OUT = Path(__file__).resolve().parent / "reports" / "lm_eval.json"


def _tasks(folder: Path, n: int) -> dict[str, int]:
    rng = random.Random(0)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    mc = [{"context": sentence(24).capitalize(), "choices": [" " + sentence(6) for _ in range(4)], "answer": 0}
          for _ in range(n)]
    text = [{"text": sentence(rng.randint(100, 300))} for _ in range(n)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in text))
    head = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: bench_mc\n{head}dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list: [{metric: acc}]\n")
    (folder / "ppl.yaml").write_text(
        f"task: bench_ppl\n{head}dataset_kwargs: {{data_files: {{test: {folder / 'text.jsonl'}}}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: bits_per_byte}]\n")
    (folder / "gen.yaml").write_text(
        f"task: bench_gen\n{head}dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{choices[answer]}}'\n"
        "generation_kwargs: {until: ['\\n\\n'], max_gen_toks: 16, do_sample: false}\n"
        "metric_list: [{metric: exact_match}]\n")
    return {"bench_mc": 4 * n, "bench_ppl": n, "bench_gen": max(1, n // 4)}


def measure(args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import qwen3_jax
    from qwen3_jax import hf
    from qwen3_jax.lm_eval_model import Qwen3LM
    from qwen3_jax.params import param_specs

    import numpy as np

    cfg = qwen3_jax.get_config("tiny-dense", vocab_size=151_936, d_model=args.d_model, ffn_dim=3 * args.d_model,
                               num_layers=args.layers, tie_embeddings=True, max_position_embeddings=2048,
                               compute_dtype="float32", param_dtype="float32")
    rng = np.random.RandomState(0)
    flat = {k: (1.0 if k.endswith("scale") else 0.0) + 0.05 * rng.standard_normal(s.shape).astype(np.float32)
            for k, s in param_specs(cfg).items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as tmp:
        tmp = Path(tmp)
        hf.write_hf_folder(flat, cfg, tmp / "hf", dtype="float32", tokenizer="qwen3")
        (tmp / "tasks").mkdir()
        requests = _tasks(tmp / "tasks", args.examples)
        manager = TaskManager(include_path=str(tmp / "tasks"))
        ours = Qwen3LM(hf=str(tmp / "hf"), batch_size=args.batch_size)
        backends = {"qwen3_jax": lambda: ours,
                    "hf": lambda: lm_eval.api.registry.get_model("hf").create_from_arg_string(
                        f"pretrained={tmp / 'hf'},dtype=float32,device=cpu", {"batch_size": args.batch_size})}
        for name, make in backends.items():
            lm = make()
            for task, n in requests.items():
                secs = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0)
                    secs.append(time.perf_counter() - t0)
                rows.append({"backend": name, "task": task, "requests": n, "first_s": secs[0], "seconds": secs[1],
                             "requests_per_s": n / secs[1]})
                print(f"  {name} {task}: {n} requests, {secs[1]:.1f} s (first {secs[0]:.1f} s)", file=sys.stderr)
    return {**bench_report.header("bench_lm_eval"), "model": {"d_model": args.d_model, "layers": args.layers, "vocab": cfg.vocab_size},
            "batch_size": args.batch_size, "examples": args.examples, "rows": rows}


def markdown(report: dict) -> str:
    """The report as the docs show it (bench_report.render)."""
    m = report["model"]
    lines = [bench_report.provenance(report) + ".", "",
             f"lm-eval on CPU: d_model {m['d_model']}, {m['layers']} layers, vocab {m['vocab']:,}, "
             f"batch {report['batch_size']}, requests/s of the second run", "",
             "| task | requests | qwen3_jax req/s | hf req/s | ratio |", "|---|---:|---:|---:|---:|"]
    by = {(r["backend"], r["task"]): r for r in report["rows"]}
    for task in dict.fromkeys(r["task"] for r in report["rows"]):
        a, b = by.get(("qwen3_jax", task)), by.get(("hf", task))
        if a and b:
            lines.append(f"| {task} | {a['requests']} | {a['requests_per_s']:.2f} | {b['requests_per_s']:.2f} | "
                         f"{a['requests_per_s'] / b['requests_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--json", default=str(OUT), help="where the report goes")
    p.add_argument("--from_json", default=None, help="print this report and exit")
    args = p.parse_args(argv)
    return bench_report.measure_or_print(args, measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
