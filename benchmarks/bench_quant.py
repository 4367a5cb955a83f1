"""8-bit training (issue 28): loss curves and CPU step time of float vs int8 vs fp8, dense and MoE.

One invocation trains, per model, the three variants side by side: the same initial parameters,
the same batches of the built-in corpus (prepared once), their steps interleaved (float, int8,
fp8, float, ...) so that the box's load falls on all three alike. Each variant's program is the
one `qwen3_jax.train.build` makes (`ModelConfig.quantization`). Step time: the median and spread
of the steps after the first 5 (compile excluded). Writes benchmarks/reports/quant.json and a PNG
of the curves beside it; `--from_json` prints the table again.

CPU has no 8-bit matmul unit that XLA:CPU uses for training here: the quantized step does the
same matmuls plus quantize/rescale work, so it is slower on CPU; the speed-up is a TPU/GPU
matter (the AOT report's estimate: `launch/aot_compile.py ... model_config.quantization=...`).

  python benchmarks/bench_quant.py [--steps 300] [--seq_len 128] [--batch 8]
  python benchmarks/bench_quant.py --aot benchmarks/aot_reports/235b_s1.json \
      benchmarks/aot_reports/235b_s1_int8.json ...   # the AOT table (benchmarks/reports/quant_aot.json)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import numpy as np  # noqa: E402

VARIANTS = (None, "int8", "fp8")
MODELS = ("tiny-dense", "tiny-moe")


def _run_model(preset: str, args, data_dir: str) -> dict:
    import functools  # (imports here: --from_json prints without loading jax)

    import jax  # jax only when measuring

    from data_pipeline.pipeline import make_dataset  # jax only when measuring
    from qwen3_jax.config import get_config  # jax only when measuring
    from qwen3_jax.train.build import build  # jax only when measuring
    from qwen3_jax.train.config import OptimConfig, ScheduleConfig, TrainConfig  # jax only when measuring

    tc = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch, checkpoint_every=args.steps,
                     async_checkpoint=False, make_data=functools.partial(make_dataset, data_dir),
                     optim=OptimConfig(schedule=ScheduleConfig(peak_lr=2e-3, warmup_steps=10)))
    device = jax.devices()[:1]
    programs = {q: build(get_config(preset, remat="none", quantization=q), tc, device) for q in VARIANTS}
    states = {q: p.init_state() for q, p in programs.items()}  # same seed: the same initial parameters
    data = tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    losses = {q: [] for q in VARIANTS}
    times = {q: [] for q in VARIANTS}
    for step in range(args.steps):
        batch = next(data)
        for q, program in programs.items():
            b = {k: jax.device_put(np.asarray(batch[k]), program.batch_sharding) for k in program.abstract_batch}
            t0 = time.perf_counter()
            states[q], metrics = program.step(states[q], b)
            loss = float(metrics["lm_loss"])  # blocks until the step is done
            times[q].append(time.perf_counter() - t0)
            losses[q].append(loss)
        if step % 50 == 0:
            print(f"{preset} step {step}: " + ", ".join(f"{q or 'float'} {losses[q][-1]:.3f}" for q in VARIANTS),
                  flush=True)
    return {"losses": {str(q): v for q, v in losses.items()}, "step_s": {str(q): v for q, v in times.items()},
            "compute_dtype": programs[None].model.compute_dtype, "moe_impl": programs[None].model.moe_impl}


def _summary(run: dict, warm: int = 5) -> dict:
    out = {}
    base = np.asarray(run["step_s"]["None"][warm:])
    for q in map(str, VARIANTS):
        t = np.asarray(run["step_s"][q][warm:])
        last = np.mean(run["losses"][q][-20:])
        out[q] = {"final_loss_mean20": float(last), "step_ms_median": float(np.median(t) * 1e3),
                  "step_ms_p10_p90": [float(np.percentile(t, 10) * 1e3), float(np.percentile(t, 90) * 1e3)],
                  "slowdown_vs_float_median": float(np.median(t / base)),
                  "slowdown_p10_p90": [float(np.percentile(t / base, 10)), float(np.percentile(t / base, 90))]}
    return out


def _plot(report: dict, path: Path) -> None:
    import matplotlib  # optional: matplotlib (the PNG only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib

    fig, axes = plt.subplots(1, len(report["runs"]), figsize=(6 * len(report["runs"]), 4))
    for ax, (preset, run) in zip(np.atleast_1d(axes), report["runs"].items()):
        for q in map(str, VARIANTS):
            y = np.convolve(run["losses"][q], np.ones(10) / 10, mode="valid")
            ax.plot(np.arange(len(y)) + 10, y, label={"None": run["compute_dtype"]}.get(q, q))
        ax.set_title(f"{preset}: train loss (10-step mean)")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def measure(args) -> dict:
    from data_pipeline.prepare import prepare_builtin  # jax only when measuring

    report = bench_report.header("bench_quant")
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        parts = prepare_builtin(str(Path(tmp) / "spm512"), "spm", spm_vocab_size=512)
        runs = {}
        for m in MODELS:
            runs[m] = _run_model(m, args, parts["code"])
            bench_report.write(str(args.json) + ".partial", {**report, "runs": runs})  # a slow box: keep what ran
    report.update(steps=args.steps, seq_len=args.seq_len, batch=args.batch, box_load_start_end=[load0[0],
                  os.getloadavg()[0]], runs=runs, summary={m: _summary(r) for m, r in runs.items()},
                  note="CPU: no 8-bit unit used, the quantized step adds quantize/rescale work; the GPU fp8 MFU "
                       "(bench_gpu.py) needs a lent GPU and is not measured here")
    png = Path(args.json).with_suffix(".png")
    _plot(report, png)
    report["png"] = str(png.relative_to(bench_report.ROOT)) if png.is_relative_to(bench_report.ROOT) else str(png)
    return report


def aot_row(rep: dict, moe_impl: str = "") -> dict:
    """One AOT report (launch/aot_compile.py --report) as a row of the comparison."""
    from qwen3_jax import step_time  # jax only when comparing reports

    st = rep.get("step_time") or {}
    cal = st.get("calibrated")
    if cal is None and st:  # a report written before calibration was part of it: the same formula now
        cal = step_time.calibrate(step_time.family(rep["libtpu_topology"]), st, rep["model_flops_per_chip"])
    cal = cal or {}
    if not moe_impl and rep.get("libtpu_topology", "").split(":")[0] != "cpu":  # TPU: the experts' form
        moe_impl = "megablox" if rep.get("quantization") is None else "ragged_dot + tgmm wgrad"
    return {"source": rep.get("_path", ""), "model": rep["model"], "topology": rep["topology"],
            "quantization": str(rep.get("quantization")), "moe_impl_note": moe_impl, "remat": rep.get("remat"),
            "bytes_per_chip_peak": rep["bytes_per_chip_peak"], "hbm_bytes_per_chip": rep["hbm_bytes_per_chip"],
            "fits": rep["fits"], "flops_per_chip": rep["flops_per_chip"],
            "flops_ratio_compiled_to_model": rep["flops_ratio_compiled_to_model"],
            "eight_bit_flops_share": rep.get("eight_bit_flops_share", 0.0),
            "compute_s": st.get("compute_s"), "hbm_s": st.get("hbm_s"), "ici_s": st.get("ici_s"),
            "estimate_s": st.get("estimate_s"), "calibrated_estimate_s": cal.get("estimate_s"),
            "notes": rep.get("notes", []), "flops_breakdown_per_chip": rep.get("flops_breakdown_per_chip")}


def compare_reports(paths: list[str], reading: str = "") -> dict:
    """The AOT comparison of saved reports (e.g. benchmarks/aot_reports/235b_s1*.json)."""
    import json

    report = bench_report.header("bench_quant")
    if reading:  # the command as typed, the reading (below the table) named, not repeated
        report["command"] = report["command"].split(" --reading")[0] + " --reading TEXT"
    rows = {}
    for path in paths:
        rep = json.loads(Path(path).read_text())
        rep["_path"] = str(Path(path).resolve().relative_to(bench_report.ROOT)) \
            if Path(path).resolve().is_relative_to(bench_report.ROOT) else str(path)
        rows[f"{rep.get('quantization')} {rep['topology']}"] = aot_row(rep)
    first = next(iter(rows.values()))
    report.update(model=first["model"], topology=", ".join(dict.fromkeys(r["topology"] for r in rows.values())),
                  rows=rows, reading=reading,
                  label="AOT estimates (compiled on this CPU box for the TPU slice; FLOPs and memory read from the "
                        "compiled program, step times modelled: qwen3_jax/step_time.py), not measurements")
    return report


def markdown_aot(report: dict) -> str:
    """The AOT comparison (`rows`: one compile per quantization / slice) as a table."""
    lines = [bench_report.provenance(report), "", f"{report['model']} on {report['topology']}"
             + (f" ({report['label']})" if report.get("label") else ""), "",
             "| quantization | experts | peak GiB/chip | compiled FLOPs/chip | vs model | 8-bit share | compute s "
             "| HBM s | bound s | calibrated s |", "|---|---|---|---|---|---|---|---|---|---|"]
    sec = lambda s: "-" if s is None else f"{s:.4g}"  # noqa: E731
    for q, r in report["rows"].items():
        lines.append(f"| {q} | {r.get('moe_impl_note', '')} | {r['bytes_per_chip_peak'] / 2 ** 30:.3g} of "
                     f"{r['hbm_bytes_per_chip'] / 2 ** 30:.0f} | {r['flops_per_chip']:.3g} | "
                     f"{r['flops_ratio_compiled_to_model']:.2f}x | {r['eight_bit_flops_share']:.0%} | "
                     f"{sec(r.get('compute_s'))} | {sec(r.get('hbm_s'))} | {sec(r['estimate_s'])} | "
                     f"{sec(r['calibrated_estimate_s'])} |")
    notes = sorted({n for r in report["rows"].values() for n in r.get("notes", [])})
    return "\n".join(lines + [""] + [f"NOTE: {n}" for n in notes] + ["", report.get("reading", ""), ""])


def markdown(report: dict) -> str:
    if "rows" in report:
        return markdown_aot(report)
    lines = [bench_report.provenance(report), "", f"8-bit training, {report['steps']} steps of {report['batch']} x {report['seq_len']} tokens "
             f"(box load {report['box_load_start_end'][0]:.1f} -> {report['box_load_start_end'][1]:.1f})", "",
             "| model | matmuls | final loss (mean of last 20) | vs float | CPU step ms (p10-p90) | slowdown vs float "
             "(p10-p90) |", "|---|---|---|---|---|---|"]
    for m, s in report["summary"].items():
        base = s["None"]["final_loss_mean20"]
        for q, r in s.items():
            lines.append(f"| {m} | {q if q != 'None' else report['runs'][m]['compute_dtype']} | "
                         f"{r['final_loss_mean20']:.4f} | {(r['final_loss_mean20'] / base - 1):+.2%} | "
                         f"{r['step_ms_median']:.0f} ({r['step_ms_p10_p90'][0]:.0f}-{r['step_ms_p10_p90'][1]:.0f}) | "
                         f"{r['slowdown_vs_float_median']:.2f}x ({r['slowdown_p10_p90'][0]:.2f}-"
                         f"{r['slowdown_p10_p90'][1]:.2f}) |")
    lines += ["", report.get("note", ""), f"curves: {report.get('png')}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=str(bench_report.REPORTS / "quant.json"))
    p.add_argument("--from_json", default=None)
    p.add_argument("--aot", nargs="+", default=None, metavar="REPORT",
                   help="compare saved AOT reports (launch/aot_compile.py --report) instead of training; "
                        "writes --json (default benchmarks/reports/quant_aot.json)")
    p.add_argument("--reading", default="", help="--aot: the table's one-paragraph reading")
    args = p.parse_args(argv)
    if args.aot:
        report = compare_reports(args.aot, args.reading)
        out = args.json if args.json != str(bench_report.REPORTS / "quant.json") else \
            str(bench_report.REPORTS / "quant_aot.json")
        bench_report.write(out, report)
        print(markdown(report))
        return 0
    return bench_report.measure_or_print(args, measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
