"""AOT-compile the train step for the TPU slices we plan on, and print one table.

  python benchmarks/bench_aot.py                 # compile every case (minutes each, CPU + libtpu)
  python benchmarks/bench_aot.py --only 30b,8b   # a subset
  python benchmarks/bench_aot.py --from_json     # just print the saved reports (benchmarks/aot_reports/)
  python benchmarks/bench_aot.py --distill       # the teacher+student (distillation) cases only

Columns: mesh, batch, remat policy (the slice file's; `--search DIR` runs `--remat auto`), per-chip
peak memory vs HBM, FLOPs per chip counted from the compiled HLO vs the model's own count
(qwen3_jax.train.metrics.flops_per_token) and their ratio (measured: read from the compiled
program), the calibrated step time [range] and MFU (modelled: qwen3_jax/step_time.py, fitted by
benchmarks/bench_step_time.py; llama70_check is one of its points, MaxText's published 65%), and bytes
per chip per step by collective kind (ragged all-to-all: the rows really sent, not the worst-case
buffer; "AR 47 (as AG 32, RS 12)": all-reduces that libtpu uses for FSDP's all-gathers and
gradient reduce-scatters, see qwen3_jax.hlo_stats.collective_summary). Each compile runs
`launch/aot_compile.py` in a subprocess and saves its JSON report.

Distillation cases (DISTILL): the step of `launch/train.py --gin distill_offpolicy.gin --gin
model/<student>.gin --gin slices/distill-*.gin --gin_param TEACHER=DIR`, the frozen teacher's
forward inside it. The teacher is compiled from its config alone: DIR = runs/teachers/<preset>/,
a Hugging Face config.json written from our preset by qwen3_jax.hf.to_hf_config (no weights;
made here when missing, not committed). The model FLOPs of the table are the student's 6·N·tokens
(+ attention); the report's `distill` entry adds the teacher's forward (2·N_teacher·tokens +
attention, and its output head once more: the KD loss's checkpointed chunks remake the teacher's
logits in the backward pass), the teacher's share of the two, and the compiled FLOPs against both.
A MoE teacher's expert matmuls and ragged all-to-alls are also counted at their expected rows
(`teacher_expert_rows`, from the step's HLO; not with --search, whose compiles keep no HLO): the
report itself takes the dropless buffers' worst case, as qwen3_jax.aot reads the rows from the
student's config. On-policy cases also show the rollout program's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "aot_reports"
GIB = 1024 ** 3

# name -> aot_compile.py arguments: the training command's gin files for each slice (configs/slices/)
def _gins(*files: str) -> list[str]:
    return [a for f in files for a in ("--gin", f)]


CASES = {
    "235b_s1": [*_gins("stage1.gin", "model/qwen3-235b-a22b.gin", "slices/qwen3-235b-a22b-v5p-1024-stage1.gin"),
                "--topology", "v5p-1024"],
    "235b_s3": [*_gins("stage3.gin", "model/qwen3-235b-a22b.gin", "slices/qwen3-235b-a22b-v5p-1024-stage3.gin"),
                "--topology", "v5p-1024"],
    "30b": [*_gins("stage1.gin", "model/qwen3-30b-a3b.gin", "slices/qwen3-30b-a3b-v5p-128.gin"),
            "--topology", "v5p-128"],
    "8b": [*_gins("stage1.gin", "model/qwen3-8b.gin", "slices/qwen3-8b-v5p-128.gin"), "--topology", "v5p-128"],
    # stage 4 (131,072 tokens) under context parallelism, and the same slice without it (`_nocp`)
    "235b_s4": [*_gins("stage4.gin", "model/qwen3-235b-a22b.gin", "slices/qwen3-235b-a22b-v5p-1024-stage4.gin"),
                "--topology", "v5p-1024"],
    "235b_s4_nocp": [*_gins("stage4.gin", "model/qwen3-235b-a22b.gin", "slices/qwen3-235b-a22b-v5p-1024-stage4.gin"),
                     "--mesh", "fsdp=128,expert=4", "--global_batch", "512", "--topology", "v5p-1024"],
    "32b_s4": [*_gins("stage4.gin", "model/qwen3-32b.gin", "slices/qwen3-32b-v5p-128-stage4.gin"), "--topology", "v5p-128"],
    "32b_s4_nocp": [*_gins("stage4.gin", "model/qwen3-32b.gin", "slices/qwen3-32b-v5p-128-stage4.gin"),
                    "--mesh", "fsdp=64", "--global_batch", "64", "--topology", "v5p-128"],
    # the other README slices (v5p-128) at stage 4's 131,072 tokens: context 4 (one host's chips),
    # full remat, splash's separate dQ kernel, as the stage-4 slices above
    "8b_s4": [*_gins("stage4.gin", "model/qwen3-8b.gin", "slices/qwen3-8b-v5p-128.gin"), "--mesh", "fsdp=16,context=4",
              "--global_batch", "16", "--remat", "full", "--splash_fused_bwd", "false", "--topology", "v5p-128"],
    "30b_s4": [*_gins("stage4.gin", "model/qwen3-30b-a3b.gin", "slices/qwen3-30b-a3b-v5p-128.gin"),
               "--mesh", "fsdp=4,context=4,expert=4", "--global_batch", "16", "--remat", "full",
               "--splash_fused_bwd", "false", "--topology", "v5p-128"],
}
# The step-time model's check against a published figure: MaxText's Llama2-70B on v5p-128, 65% MFU
# (getting_started/Run_Llama2.md), the same shapes, batch, mesh and remat in our model
CASES["llama70_check"] = [*_gins("stage1.gin", str(ROOT / "benchmarks" / "maxtext_llama2_70b_v5p_128.gin")),
                          "--topology", "v5p-128"]
PUBLISHED_MFU = {"llama70_check": 0.65}
TEACHERS = Path("runs") / "teachers"  # relative to ROOT (aot_compile.py runs there): the reports name it so
# distillation cases: name -> (teacher preset, training gin files, topology)
DISTILL = {
    "distill_32b_8b": ("qwen3-32b", ("distill_offpolicy.gin", "model/qwen3-8b.gin",
                                     "slices/distill-qwen3-8b-v5p-128-from-qwen3-32b.gin"), "v5p-128"),
    "distill_235b_8b": ("qwen3-235b-a22b", ("distill_offpolicy.gin", "model/qwen3-8b.gin",
                                            "slices/distill-qwen3-8b-v5p-128-from-qwen3-235b-a22b.gin"), "v5p-128"),
    # on-policy: the report adds the student's rollout program (its own peak) to the same step
    "onpolicy_32b_8b": ("qwen3-32b", ("distill_onpolicy.gin", "model/qwen3-8b.gin",
                                      "slices/distill-onpolicy-qwen3-8b-v5p-128-from-qwen3-32b.gin"), "v5p-128"),
}
for _name, (_teacher, _files, _topo) in DISTILL.items():
    CASES[_name] = [*_gins(*_files), "--gin_param", f"TEACHER='{TEACHERS / _teacher}'", "--topology", _topo]
SHORT = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
         "ragged-all-to-all": "rA2A", "collective-permute": "CP"}


def teacher_dir(preset: str, root: Path = ROOT / TEACHERS) -> Path:
    """A teacher folder for compiling without weights: config.json of the preset, written by our
    converter (qwen3_jax.hf.to_hf_config, as save_hf writes it; `_name_or_path` keeps the preset's
    name), which `qwen3_jax.train.distill.find_teacher` reads like a downloaded Hugging Face folder."""
    from qwen3_jax import hf
    from qwen3_jax.config import get_config

    path = Path(root) / preset
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        d = {**hf.to_hf_config(get_config(preset)), "_name_or_path": preset}
        (path / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    return path


def distill_fields(report: dict, teacher, hlo_text: str | None = None) -> dict:
    """The teacher's part of a distillation step's FLOPs and memory (not in the student's model
    count); `teacher`: a preset name or a ModelConfig; `hlo_text` (the compiled step): for a MoE
    teacher with expert parallelism, the counts at its expected rows (`teacher_expert_rows`)."""
    from qwen3_jax.config import get_config
    from qwen3_jax.params import count_params
    from qwen3_jax.train.metrics import flops_per_token

    t = get_config(teacher) if isinstance(teacher, str) else teacher
    seq, tokens = report["seq_len"], report["tokens_per_step"]
    head = 2 * t.d_model * t.vocab_size  # the KD chunks' checkpoint remakes the teacher's logits once more
    per_token = flops_per_token(t, seq, training=False) + head
    teacher_flops = per_token * tokens / report["devices"]
    student_flops = report["model_flops_per_chip"]
    params = count_params(t)
    out = {"teacher": t.name, "teacher_params": params["total_params"],
           "teacher_active_params": params["active_params"],
           # bf16 (the student's compute dtype), sharded like the student's parameters
           "teacher_param_bytes_per_chip": 2 * params["total_params"] / report["devices"],
           "teacher_flops_per_token": per_token, "teacher_flops_per_chip": teacher_flops,
           "student_model_flops_per_chip": student_flops,
           "teacher_share_of_model_flops": teacher_flops / (teacher_flops + student_flops),
           "teacher_to_student_flops": teacher_flops / student_flops,
           "note": "teacher FLOPs: forward (2 per multiply-add, attention included) + its output head again "
                   "(the KD loss's checkpointed chunks); model_flops_per_chip is the student's 6·N·tokens alone"}
    if report.get("flops_per_chip"):
        out["flops_ratio_compiled_to_student_plus_teacher"] = report["flops_per_chip"] / (teacher_flops + student_flops)
    if (hlo_text is not None and report.get("flops_per_chip") and t.is_moe and report["mesh"].get("expert", 1) > 1
            and report.get("expected_expert_rows_per_device") is None):
        out["teacher_expert_rows"] = teacher_expert_rows(report, t, hlo_text, teacher_flops + student_flops)
    return out


def teacher_expert_rows(report: dict, t, hlo_text: str, model_flops_per_chip: float) -> dict:
    """A MoE teacher under expert parallelism (`expert` > 1) with a dense student, for a report whose
    compile_report did not know the expected rows per device (reports saved before it took them
    from the teacher's config; it does now, and then this is not called): the same HLO counted
    with the teacher's rows, tokens · k / batch shards (balanced routing)."""
    from qwen3_jax import aot
    from qwen3_jax.config import get_config
    from qwen3_jax.hlo_stats import collective_summary, hlo_flops

    mesh = report["mesh"]
    rows = report["tokens_per_step"] * t.num_experts_per_tok / (
        mesh["data"] * mesh["fsdp"] * mesh["expert"] * report["micro_batches"])
    per_chip = max(report["devices"] // report["chips"], 1)
    counted = hlo_flops(hlo_text, ragged_rows=rows, causal=True)
    collectives = collective_summary(hlo_text, rows)
    flops = counted["total"] * per_chip
    fields = aot.step_time_fields(report, get_config(report["model"]), hlo_text, per_chip, counted["total"],
                                  report["model_flops_per_chip"] / per_chip, collectives, rows)
    return {"expected_expert_rows_per_device": rows, "flops_per_chip": flops,
            "flops_breakdown_per_chip": {k: v * per_chip for k, v in counted.items()},
            "flops_ratio_compiled_to_model": flops / report["model_flops_per_chip"],
            "flops_ratio_compiled_to_student_plus_teacher": flops / model_flops_per_chip,
            "collectives": collectives, **fields,
            "note": "the teacher's expert matmuls and exchanges at the expected rows, not the buffers' worst case; "
                    "the step-time MFU counts the student's model FLOPs alone"}


def compile_case(name: str, search: str | None = None) -> dict:
    """Compiles the case as its slice gin file says; `search` = a cache folder: `--remat auto`
    instead (the candidates' reports kept there), whose choice goes into the slice file by hand."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    out = REPORTS / f"{name}.json"
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    extra = ["--remat", "auto", "--remat_cache", str(Path(search).absolute())] if search else []
    if name in DISTILL:
        teacher_dir(DISTILL[name][0])
    fresh = out.with_suffix(".new.json")  # a failed compile leaves the saved report as it was
    fresh.unlink(missing_ok=True)
    hlo = None
    if name in DISTILL and not search and _moe_teacher(name):  # the HLO, to count the teacher's expert rows
        hlo = Path(tempfile.mkdtemp()) / "step.hlo"
        extra += ["--hlo_dump", str(hlo)]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), *CASES[name], *extra,
                        "--report", str(fresh)], env=env, capture_output=True, text=True, cwd=ROOT)
    if not fresh.exists():
        raise RuntimeError(f"{name}: aot_compile failed\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    report = json.loads(fresh.read_text())
    if name in DISTILL:
        text = hlo.read_text() if hlo is not None and hlo.exists() else None
        report["distill"] = distill_fields(report, DISTILL[name][0], text)
    if hlo is not None:
        shutil.rmtree(hlo.parent)
    out.write_text(json.dumps(report, indent=2))
    fresh.unlink()
    return report


def _moe_teacher(name: str) -> bool:
    from qwen3_jax.config import get_config

    return get_config(DISTILL[name][0]).is_moe


def calibrated(r: dict) -> dict | None:
    """The report's calibrated step time; for reports saved before the calibration, made now from
    their HLO-derived fields (qwen3_jax.step_time.calibrate)."""
    from qwen3_jax import step_time

    t = r.get("step_time") or {}
    if t.get("calibrated"):
        return t["calibrated"]
    if r.get("hbm_traffic_bytes_per_chip") is None or r.get("flops_per_chip") is None:
        return None
    fam = step_time.family(r["libtpu_topology"])
    return step_time.calibrate(fam, step_time.report_terms(r), r["model_flops_per_chip"])


def row(name: str, r: dict) -> str:
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
    peak = r.get("bytes_per_chip_peak") or 0
    mem = f"{peak / GIB:6.1f}/{r['hbm_bytes_per_chip'] / GIB:.0f} GiB {'ok ' if r['fits'] else 'OOM'}"
    if r.get("flops_per_chip") is None:
        return (f"{name:<16} {r['model']:<16} {r['topology']:<9} {mesh:<22} {r['global_batch']:>5}x{r['seq_len']:<6} "
                f"{mem}")
    fl = f"{r['flops_per_chip']:.2e} {r['model_flops_per_chip']:.2e} {r['flops_ratio_compiled_to_model']:5.2f}"
    c = calibrated(r)
    est = (f"{c['estimate_s']:6.2f} s [{c['low_s']:.2f}-{c['high_s']:.2f}] {c['predicted_mfu']:4.0%}" if c
           else f"{'-':>24}")
    if name in PUBLISHED_MFU and c:
        est += f" (published {PUBLISHED_MFU[name]:.0%}; uncalibrated {r['step_time']['predicted_mfu']:.0%})"
    def one(k, v):
        text = f"{SHORT.get(k, k)} {v.get('bytes_expected', v['bytes']) / GIB:.0f}"
        roles = [f"{tag} {v[role]['bytes'] / GIB:.0f}" for role, tag in (("as_all_gather", "AG"),
                                                                       ("as_reduce_scatter", "RS"))
                 if v.get(role, {}).get("bytes", 0) >= 0.5 * GIB]
        return text + (f" (as {', '.join(roles)})" if roles else "")

    coll = " ".join(one(k, v) for k, v in r["collectives"].items())
    d = r.get("distill")
    teacher = ""
    if d:
        teacher = (f"\n{'':<16} + teacher {d['teacher']}: forward {d['teacher_flops_per_chip']:.2e} FLOPs/chip = "
                   f"{d['teacher_share_of_model_flops']:.0%} of student+teacher; compiled / (student+teacher) "
                   f"{d['flops_ratio_compiled_to_student_plus_teacher']:.2f}")
        e = d.get("teacher_expert_rows")
        if e:
            a2a = e["collectives"]["ragged-all-to-all"]["bytes_expected"] / GIB
            c = calibrated({**r, **e})
            teacher += (f"\n{'':<16}   its experts at the expected rows: compiled {e['flops_per_chip']:.2e}, "
                        f"/ (student+teacher) {e['flops_ratio_compiled_to_student_plus_teacher']:.2f}, step (calibrated) "
                        f"{c['estimate_s']:.2f} s [{c['low_s']:.2f}-{c['high_s']:.2f}], rA2A {a2a:.0f} GiB")
    ro = r.get("rollout")
    if ro:
        teacher += (f"\n{'':<16}   rollout ({ro['prompt_len']} + {ro['completion_len']} tokens): peak "
                    f"{ro['bytes_per_chip_peak'] / GIB:.1f} GiB {'ok' if ro['fits'] else 'OOM'}")
    return (f"{name:<16} {r['model']:<16} {r['topology']:<9} {mesh:<22} {r['global_batch']:>5}x{r['seq_len']:<6} "
            f"{r['remat']:<15} {mem}  {fl}  {est}  {coll}{teacher}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_json", action="store_true", help="print the saved reports, compile nothing")
    p.add_argument("--only", default=None, help="comma-separated case names: " + ",".join(CASES))
    p.add_argument("--search", default=None, metavar="CACHE_DIR",
                   help="compile with --remat auto (candidates' reports kept in CACHE_DIR) instead of the slice's remat")
    p.add_argument("--distill", action="store_true", help="only the distillation cases: " + ",".join(DISTILL))
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(DISTILL) if args.distill else list(CASES)
    print(f"{'case':<16} {'model':<16} {'topology':<9} {'mesh':<22} {'batch':>12} {'remat':<15} peak/HBM per chip"
          f"     FLOPs/chip: HLO     model  ratio  step (modelled, calibrated) MFU  collectives GiB/chip/step")
    for name in names:
        path = REPORTS / f"{name}.json"
        if args.from_json:
            if not path.exists():
                print(f"{name:<16} (no saved report)")
                continue
            r = json.loads(path.read_text())
        else:
            r = compile_case(name, args.search)
        print(row(name, r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
