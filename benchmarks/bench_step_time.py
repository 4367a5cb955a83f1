"""Calibrate the step-time model (qwen3_jax/step_time.py) on measured steps and print its errors.

  python benchmarks/bench_step_time.py               # fit the points, write the JSON below, print the table
  python benchmarks/bench_step_time.py --from_json   # print the committed table, compute nothing
  python benchmarks/bench_step_time.py --compile NAME[,NAME]  # (re)compile those points' programs first

A point is a measured train step and the program we compile for the same shapes:
- H200 (family h200): our own runs (benchmarks/gpu_reports/*.json, step seconds read from there).
  No GPU compiler here, so the step is compiled for TPU with the GPU's batch on every chip of a
  v5p 2x2x1 (data parallel: each chip runs the one-GPU program; FSDP where the replicated state
  does not fit, each chip still runs the GPU's batch) and its FLOPs and HBM bytes are put on the
  H200's figures, without collectives.
- v5p and v6e: MaxText's published figures for dense models we can compile (the shapes, batch and
  sequence length of its recipe; our own remat and pure FSDP, named per point). Published MFU is
  turned into seconds with MaxText's FLOP count of the time (`mfu_attention`: 'full' = attention
  not halved for causality, before its PR #1988); tokens/s per chip need no FLOP count.
Each point's report (benchmarks/aot_reports/, `--compile` makes it) holds the HLO-derived fields.
The fit (`step_time.fit`): per chip family a compute share and (from 3 points) an HBM share,
least squares in log time; each point is also predicted by the fit of the others (leave-one-out). Written to
benchmarks/aot_reports/step_time_calibration.json with the remat choices of the slice files'
searches re-ranked by the calibrated time (`remat_search.rank`, from the stored rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPORTS = ROOT / "benchmarks" / "aot_reports"
OUT = REPORTS / "step_time_calibration.json"
GPU = ROOT / "benchmarks" / "gpu_reports"

from qwen3_jax import remat_search, step_time  # noqa: E402

_LLAMA = "model_config.overrides={{'num_layers': {L}, 'd_model': {D}, 'num_heads': {N}, 'num_kv_heads': {K}, " \
         "'head_dim': 128, 'ffn_dim': {F}, 'vocab_size': {V}, 'tie_embeddings': False}}"
_GPU_ARGS = ["--gin", "stage1.gin", "--seq_len", "4096", "--global_batch", "32", "--topology", "v5p:2x2x1",
             "--gin_param", "train.loss_chunk=None"]  # bench_gpu.py's program: no loss chunks
_TRAIN_GPU = "h200_train_attention_generate.json"
POINTS = [
    dict(name="h200_0.6b_full", family="h200", report="calibration/h200_0.6b_full.json", single_device=True,
         measured={"gpu_report": _TRAIN_GPU, "row": 0},
         args=[*_GPU_ARGS, "--preset", "qwen3-0.6b", "--remat", "full", "--mesh", "data=4,fsdp=1"]),
    dict(name="h200_0.6b_save_attn_mlp", family="h200", report="calibration/h200_0.6b_save_attn_mlp.json",
         single_device=True, measured={"gpu_report": _TRAIN_GPU, "row": 1},
         args=[*_GPU_ARGS, "--preset", "qwen3-0.6b", "--remat", "save_attn_mlp", "--mesh", "data=4,fsdp=1"]),
    dict(name="h200_1.7b_save_attn_mlp", family="h200", report="calibration/h200_1.7b_save_attn_mlp.json",
         single_device=True, measured={"gpu_report": _TRAIN_GPU, "row": 3},
         args=[*_GPU_ARGS, "--preset", "qwen3-1.7b", "--remat", "save_attn_mlp", "--mesh", "data=4,fsdp=1"]),
    dict(name="h200_30b-a3b_4L_blocked", family="h200", report="calibration/h200_30b-a3b_4L_blocked.json",
         single_device=True, measured={"gpu_report": "h200_moe_forms.json", "row": 0},
         note="4 of the 48 layers, blocked experts; FSDP over the 4 chips (the replicated state would not fit)",
         args=[*_GPU_ARGS, "--preset", "qwen3-30b-a3b", "--remat", "full", "--mesh", "fsdp=4",
               "--gin_param", "model_config.overrides={'num_layers': 4, 'moe_impl': 'blocked'}"]),
    dict(name="maxtext_llama2-70b_v5p-128", family="v5p", report="llama70_check.json",
         measured={"mfu": 0.65, "mfu_attention": "full"},
         source="MaxText getting_started/Run_Llama2.md: Llama2-70B on v5p-128, 65% MFU "
                "(configs/v5p/llama2_70b.sh: 4 sequences of 4,096 per chip, save_dot_except_mlpwi)",
         note="ours: save_qkv_proj (save_attn_out needs 109 GiB); benchmarks/maxtext_llama2_70b_v5p_128.gin"),
    dict(name="maxtext_32b_v5p-128", family="v5p", report="calibration/maxtext_32b_v5p-128.json",
         measured={"mfu": 0.7147, "mfu_attention": "full"},
         source="MaxText configs/v5p/README.md: 32B on 1x v5p-128, 328 TFLOP/s/chip, 71.47% MFU "
                "(configs/v5p/32b.sh: global_parameter_scale 32 = 32 layers x 8192, 64 heads, MLP 28672, "
                "vocab 32000; 7 x 2,048 tokens per chip, fsdp 16 x tensor 4, remat minimal)",
         note="ours: save_attn_out, pure FSDP over the 64 chips",
         args=["--gin", "stage1.gin", "--preset", "qwen3-32b", "--topology", "v5p-128", "--seq_len", "2048",
               "--global_batch", "448", "--remat", "save_attn_out", "--mesh", "fsdp=64",
               "--gin_param", _LLAMA.format(L=32, D=8192, N=64, K=64, F=28672, V=32000)]),
    dict(name="maxtext_llama3.1-8b_v6e-256", family="v6e", report="calibration/maxtext_llama3.1-8b_v6e-256.json",
         measured={"tokens_per_s_per_chip": 7207},
         source="MaxText docs/reference/models/tiering.md (v6e gold): Llama 3.1 8B, 256 chips, BF16, SL=8192, "
                "45.46% MFU, ~7,207 tokens/s/device (benchmarks/maxtext_trillium_model_configs.py "
                "llama3_1_8b_8192: 4 sequences per chip, q/k/v/o projections and layer inputs offloaded)",
         note="ours: offload_attn (q/k/v, attention output, o_proj to host memory)",
         args=["--gin", "stage1.gin", "--preset", "qwen3-32b", "--topology", "v6e-256", "--seq_len", "8192",
               "--global_batch", "1024", "--remat", "offload_attn", "--mesh", "fsdp=256",
               "--gin_param", _LLAMA.format(L=32, D=4096, N=32, K=8, F=14336, V=128256)]),
    dict(name="maxtext_llama2-70b_v6e-256", family="v6e", report="calibration/maxtext_llama2-70b_v6e-256.json",
         measured={"tokens_per_s_per_chip": 900},
         source="MaxText docs/reference/models/tiering.md (v6e gold): Llama 2 70B, 256 chips, BF16, SL=4096, "
                "43.8% MFU, ~900 tokens/s/device (maxtext_trillium_model_configs.py llama2_70b_4096_optimized: "
                "2 sequences per chip, q/k/v projections offloaded)",
         note="ours: full remat (keeping the q/k/v projections in HBM does not fit 32 GB)",
         args=["--gin", "stage1.gin", "--preset", "qwen3-32b", "--topology", "v6e-256", "--seq_len", "4096",
               "--global_batch", "512", "--remat", "full", "--mesh", "fsdp=256",
               "--gin_param", _LLAMA.format(L=80, D=8192, N=64, K=8, F=28672, V=32000)]),
]
# the slice files' remat searches (benchmarks/aot_reports/<case>.json, `remat_search` section)
SLICES = {"8b": "qwen3-8b-v5p-128.gin", "30b": "qwen3-30b-a3b-v5p-128.gin",
          "235b_s1": "qwen3-235b-a22b-v5p-1024-stage1.gin", "235b_s3": "qwen3-235b-a22b-v5p-1024-stage3.gin",
          "distill_32b_8b": "distill-qwen3-8b-v5p-128-from-qwen3-32b.gin"}


def measured(p: dict, report: dict) -> dict:
    """Measured seconds per step of point `p` (and the MFU they mean in our FLOP count), with source."""
    m, peak = p["measured"], step_time.CHIPS[p["family"]].peak_flops
    if "gpu_report" in m:
        row = json.loads((GPU / m["gpu_report"]).read_text())["train"]["rows"][m["row"]]
        s, src = row["step_s"], f"benchmarks/gpu_reports/{m['gpu_report']} train.rows[{m['row']}]: {row['model']}, " \
                                f"{row['remat']}, {row['batch']}, {row['attention']} attention"
        assert int(row["batch"].split("x")[0]) * report["chips"] == report["global_batch"], (row, p["name"])
        flops = report["model_flops_per_chip"]  # each chip of the proxy runs the GPU's batch
    elif "tokens_per_s_per_chip" in m:
        s, src = report["tokens_per_step"] / report["chips"] / m["tokens_per_s_per_chip"], p["source"]
        flops = report["model_flops_per_chip"]
    else:  # MaxText's MFU: its FLOPs (attention not halved for 'full') / (MFU x peak)
        share = report.get("model_attention_share") or 0.0
        theirs = report["model_flops_per_chip"] * (1 + share if m["mfu_attention"] == "full" else 1.0)
        s, src = theirs / (m["mfu"] * peak), p["source"]
        flops = report["model_flops_per_chip"]
    return {"step_s": s, "mfu": flops / (s * peak), "source": src}


def point_inputs(p: dict) -> dict | None:
    path = REPORTS / p["report"]
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    terms = step_time.report_terms(report, p["family"], p.get("single_device", False))
    meas = measured(p, report)
    model_flops = meas["mfu"] * meas["step_s"] * step_time.CHIPS[p["family"]].peak_flops
    return {"name": p["name"], "family": p["family"], "report": f"benchmarks/aot_reports/{p['report']}",
            "remat": report["remat"], "note": p.get("note", ""), "terms": terms, "model_flops_per_chip": model_flops,
            "measured_s": meas["step_s"], "measured_mfu": meas["mfu"], "source": meas["source"]}


def compute() -> dict:
    points = [x for x in map(point_inputs, POINTS) if x is not None]
    cal = step_time.calibrations(points)
    loo = step_time.leave_one_out(points)
    saved = dict(step_time.CALIBRATION)
    step_time.CALIBRATION.clear()
    step_time.CALIBRATION.update(cal)  # the fit just made decides the "after" column
    try:
        rows = [table_row(p, loo[p["name"]]) for p in points]
        slices = {name: rerank(name) for name in SLICES}
    finally:
        step_time.CALIBRATION.clear()
        step_time.CALIBRATION.update(saved)
    return {"points": points, "calibration": {f: vars(c) | {"points": list(c.points)} for f, c in cal.items()},
            "overlap": step_time.OVERLAP, "table": rows, "slices": slices,
            "note": "measured = the point's source; before = step_time.estimate (uncalibrated: peak rates, overlap "
                    f"{step_time.OVERLAP}); after = step_time.calibrate (fitted shares, capped at the chip's best "
                    "published MFU); loo = the point predicted by the fit of the others"}


def table_row(p: dict, loo_s: float) -> dict:
    t, peak = p["terms"], step_time.CHIPS[p["family"]].peak_flops
    after = step_time.calibrate(p["family"], t, p["model_flops_per_chip"])
    before = t["estimate_s"]
    err = lambda s: s / p["measured_s"] - 1  # noqa: E731
    return {"case": p["name"], "chip": p["family"], "measured_s": p["measured_s"], "measured_mfu": p["measured_mfu"],
            "source": p["source"], "before_s": before, "before_mfu": p["model_flops_per_chip"] / (before * peak),
            "after_s": after["estimate_s"], "after_low_s": after["low_s"], "after_high_s": after["high_s"],
            "after_mfu": after["predicted_mfu"], "loo_s": loo_s, "error_before": err(before),
            "error_after": err(after["estimate_s"]), "error_loo": err(loo_s),
            "in_range": after["low_s"] <= p["measured_s"] <= after["high_s"]}


def rerank(name: str) -> dict:
    """A slice's search re-ranked by the calibrated time, from the report's stored rows."""
    report = json.loads((REPORTS / f"{name}.json").read_text())
    search = report["remat_search"]
    fam = step_time.family(report["libtpu_topology"])
    rows = [remat_search.recalibrated(r, report, fam) for r in search["candidates"]]
    choice, runner_up = remat_search.rank(rows)
    return {"slice": f"configs/slices/{SLICES[name]}", "report": f"benchmarks/aot_reports/{name}.json",
            "committed_choice": search["choice"], "choice": choice, "runner_up": runner_up, "rows": rows}


def compile_points(names: list[str]) -> None:
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    for p in POINTS:
        if p["name"] not in names:
            continue
        if "args" not in p:
            raise SystemExit(f"{p['name']}: its report comes from benchmarks/bench_aot.py")
        out = REPORTS / p["report"]
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"compiling {p['name']} ...", flush=True)
        r = subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), *p["args"], "--report", str(out)],
                           env=env, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"{p['name']}: aot_compile failed\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def print_table(d: dict) -> None:
    print(f"{'case':<28} {'chip':<5} {'measured s (MFU)':>17} {'before s (MFU)':>16} {'after s [range] (MFU)':>27} "
          f"{'err before':>10} {'after':>7} {'LOO':>7}")
    for r in d["table"]:
        rng = f"{r['after_s']:.2f} [{r['after_low_s']:.2f}-{r['after_high_s']:.2f}]"
        print(f"{r['case']:<28} {r['chip']:<5} {r['measured_s']:>9.3f} ({r['measured_mfu']:4.0%}) "
              f"{r['before_s']:>8.3f} ({r['before_mfu']:4.0%}) {rng:>20} ({r['after_mfu']:4.0%}) "
              f"{r['error_before']:>+10.0%} {r['error_after']:>+7.0%} {r['error_loo']:>+7.0%}")
    print("\nsources:")
    for r in d["table"]:
        print(f"  {r['case']}: {r['source']}")
    print("\ncalibration (step_time.CALIBRATION; compute / HBM: achieved shares of the peaks):")
    for f, c in d["calibration"].items():
        loo = f"LOO error up to {c['loo_error']:.0%}" if c["loo_error"] is not None else "no points: TPU lowest"
        hbm = f"{c['hbm']:.2f}" + ("" if c["hbm_fitted"] else f" (= compute; slow end {c['hbm_low']:.2f})")
        print(f"  {f:<5} compute {c['compute']:.3f}  HBM {hbm:<28} range x{c['low']:.2f}-x{c['high']:.2f}  "
              f"{loo:<22} cap {c['cap_mfu']:.1%} MFU ({c['cap_source']})")
    print("\nremat choices re-ranked by the calibrated step time (stored search rows):")
    for name, s in d["slices"].items():
        print(f"  {s['slice']}: {s['choice']} (committed: {s['committed_choice']}), runner-up {s['runner_up']}")
        print(remat_search.format_rows(s["rows"], s["choice"], remat_search.HEADROOM))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_json", action="store_true", help="print the committed table, compute nothing")
    p.add_argument("--compile", default=None, help="comma-separated point names to compile first: "
                   + ",".join(x["name"] for x in POINTS if "args" in x))
    args = p.parse_args(argv)
    if args.from_json:
        print_table(json.loads(OUT.read_text()))
        return 0
    if args.compile:
        compile_points(args.compile.split(","))
    d = compute()
    OUT.write_text(json.dumps(d, indent=1) + "\n")
    print_table(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
