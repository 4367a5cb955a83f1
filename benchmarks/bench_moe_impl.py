"""Forward + backward time of each MoE expert-computation form (qwen3_jax.model.moe_compute) on
this machine, one MoE layer's experts at the side-by-side shapes (bench_vs_maxtext.py): 4,096
tokens (batch 4 x 1,024), d_model 512, 16 experts top-4, expert FFN 256, fp32.

  python benchmarks/bench_moe_impl.py [--reps 5] [--forms dense,ragged,blocked] [--blocks 64,128,256]
      [--json benchmarks/reports/moe_impl.json]
  python benchmarks/bench_moe_impl.py --from_json benchmarks/reports/moe_impl.json   # print, run nothing

Each form is one jitted value_and_grad (loss = Σ y·probe, gradients to x, the router weights
and the three expert matrices); routing is a softmax top-4 of random logits, passed as an input
(not a constant XLA could fold). Each form is compiled and run once (warm-up), then the forms run
interleaved, `--reps` rounds, so a busy machine slows every form alike. The table shows each
form's median and min over the rounds, its routed-rows GFLOP/s, its speed relative to the dense
form and its compile time; `auto` marks the form moe_impl='auto' picks on this backend. Every
round's time goes to the JSON file with the date, machine and load average.

The saved reports in benchmarks/reports/moe_impl*.json are where moe_compute.BLOCK_ROWS (the
blocked form's rows per block) was chosen.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402

REPORT = bench_report.REPORTS / "moe_impl.json"


def routed_flops(s: dict) -> float:
    """FLOPs of the routed rows: 3 matmuls, forward + twice that backward."""
    return 2 * s["tokens"] * s["top_k"] * s["d_model"] * s["ffn"] * 3 * 3


def markdown(report: dict) -> str:
    """The table of a report written by this script (or transcribed into its format): per form the
    median and min over rounds (a transcribed report may hold the median only)."""
    s = report["settings"]
    lines = [bench_report.provenance(report) + ".",
             f"{s['tokens']} tokens, d_model {s['d_model']}, {s['experts']} experts top-{s['top_k']}, expert FFN "
             f"{s['ffn']}, {s.get('dtype', 'float32')}; {s['reps']} interleaved rounds"
             + (f"; auto = {report['auto']}" if report.get("auto") else "")
             + (f"; blocked default C = {report['block_rows_default']}" if report.get("block_rows_default") else "")
             + (f"; device {report['device']}" if report.get("device") else "") + "."]
    if report.get("note"):
        lines.append(report["note"])
    lines += ["", "| form | fwd+bwd median ms | min ms | routed GFLOP/s (median) | vs dense | compile s |",
              "|---|---|---|---|---|---|"]
    medians = {f["name"]: statistics.median(f["times_s"]) if "times_s" in f else f["median_s"]
               for f in report["forms"]}
    ref = medians.get("dense")
    for f in report["forms"]:
        med = medians[f["name"]]
        low = f"{min(f['times_s']) * 1e3:.0f}" if "times_s" in f else "-"
        rel = f"{ref / med:.2f}x" if ref else "-"
        comp = f"{f['compile_s']:.1f}" if "compile_s" in f else "-"
        tag = " (auto)" if f["name"] == report.get("auto") else ""
        lines.append(f"| {f['name']}{tag} | {med * 1e3:.0f} | {low} | {routed_flops(s) / med / 1e9:.1f} | {rel} | "
                     f"{comp} |")
    return "\n".join(lines) + "\n"


def measure(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen3_jax.model import moe_compute

    N, D, E, k, F = args.tokens, args.d_model, args.experts, args.top_k, args.ffn
    r = np.random.default_rng(0)
    logits = r.normal(size=(N, E)) + np.eye(E)[0] * args.skew
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = np.argsort(-probs, 1)[:, :k]
    w = np.take_along_axis(probs, ids, 1)
    w /= w.sum(1, keepdims=True)
    arrays = dict(x=r.normal(size=(N, D)), w=w, gate=r.normal(size=(E, D, F)) / D ** 0.5,
                  up=r.normal(size=(E, D, F)) / D ** 0.5, down=r.normal(size=(E, F, D)) / F ** 0.5,
                  probe=r.normal(size=(N, D)))
    a = {kk: jnp.asarray(v, jnp.float32) for kk, v in arrays.items()}
    call_args = (a["x"], a["w"], a["gate"], a["up"], a["down"], a["probe"], jnp.asarray(ids, jnp.int32))

    fns = {"dense": moe_compute.experts_dense, "ragged": moe_compute.experts_sorted,
           "blocked": moe_compute.experts_blocked}
    forms = {f: fns[f] for f in args.forms.split(",") if f}
    for c in filter(None, args.blocks.split(",")):
        forms[f"blocked C={int(c)}"] = functools.partial(moe_compute.experts_blocked, block=int(c))

    def program(fn):
        def loss(x, w, gate, up, down, probe, ids):
            return jnp.sum(fn(x, w, ids, gate, up, down) * probe)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))

    compiled, compile_s = {}, {}
    for name, fn in forms.items():
        t = time.perf_counter()
        compiled[name] = program(fn).lower(*call_args).compile()
        compile_s[name] = time.perf_counter() - t
        jax.block_until_ready(compiled[name](*call_args))  # warm-up
    times = {name: [] for name in forms}
    loads = []
    for _ in range(args.reps):  # interleaved: a busy machine slows every form alike
        loads.append(os.getloadavg()[0])
        for name, c in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(*call_args))
            times[name].append(time.perf_counter() - t)
    return {**bench_report.header("bench_moe_impl"),
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
            "settings": dict(tokens=N, d_model=D, experts=E, top_k=k, ffn=F, dtype="float32", reps=args.reps,
                             skew=args.skew),
            "auto": moe_compute.resolve_impl("auto", jax.default_backend(), D, F),
            "block_rows_default": moe_compute.BLOCK_ROWS, "load_average_per_round": loads,
            "forms": [dict(name=n, times_s=times[n], compile_s=compile_s[n]) for n in forms]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--forms", default="dense,ragged,blocked")
    p.add_argument("--blocks", default="", help="extra blocked-form block sizes C to time, e.g. 64,128,512")
    p.add_argument("--skew", type=float, default=0.0, help="added to expert 0's router logit (0: balanced)")
    p.add_argument("--json", default=str(REPORT), help="where the results go")
    p.add_argument("--from_json", metavar="FILE", help="print the table of a saved report; run nothing")
    args = p.parse_args(argv)
    return bench_report.measure_or_print(args, measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
