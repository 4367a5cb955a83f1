"""The AOT check of a teacher + student (distillation) step: the distill slice file, the teacher
folder made from a preset's config alone, and the compiled step holding the teacher."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_jax import configurables, hf
from qwen3_jax.config import get_config
from qwen3_jax.params import count_params
from qwen3_jax.train.distill import find_teacher

ROOT = Path(__file__).resolve().parents[1]
SLICE = "slices/distill-qwen3-8b-v5p-128-from-qwen3-32b.gin"
GINS = ["distill_offpolicy.gin", "model/qwen3-8b.gin", SLICE]

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[test])")


def _bench_aot():
    spec = importlib.util.spec_from_file_location("bench_aot", ROOT / "benchmarks" / "bench_aot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", ["qwen3-32b", "qwen3-235b-a22b"])
def test_teacher_folder_from_the_preset_is_read_as_that_preset(tmp_path, preset):
    """bench_aot's teacher folder (config.json by qwen3_jax.hf.to_hf_config, no weights) is a
    Hugging Face folder to find_teacher, and its config is the preset, field for field."""
    path = _bench_aot().teacher_dir(preset, tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    source = find_teacher(path)
    assert source.kind == "hf" and source.config == get_config(preset)


@pytest.mark.parametrize("case", ["distill_32b_8b", "distill_235b_8b", "onpolicy_32b_8b"])
def test_distill_slices_parse_with_the_training_gin_files_and_match_their_reports(tmp_path, case):
    """Each distillation case of bench_aot.py is a training command (its gin files + TEACHER); they
    parse into the student, batch, mesh and remat its saved AOT report was compiled with, and the
    report fits with the teacher's FLOPs accounted for (compiled ≈ student + teacher)."""
    bench = _bench_aot()
    teacher_preset, gins, topology = bench.DISTILL[case]
    teacher = bench.teacher_dir(teacher_preset, tmp_path)
    configurables.parse_gin(list(gins), [f"TEACHER='{teacher}'"])
    model, tc = configurables.run_config()
    assert (model.name, tc.seq_len, tc.batch_size, tc.teacher) == ("qwen3-8b", 4096, 256, str(teacher))
    args = bench.CASES[case]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--gin"] == list(gins)
    assert args[args.index("--topology") + 1] == topology
    report = json.loads((ROOT / "benchmarks" / "aot_reports" / f"{case}.json").read_text())
    assert report["config"]["gin"] == list(gins) and report["fits"] and report["topology"] == topology
    assert (report["model"], report["seq_len"], report["global_batch"], report["remat"], report["loss_chunk"]) == (
        model.name, tc.seq_len, tc.batch_size, model.remat, tc.loss_chunk)
    assert report["mesh"]["fsdp"] * report["mesh"]["expert"] == report["chips"] == 64
    assert report["mesh"]["expert"] == max(tc.mesh.ici_expert, 1)
    assert report["bytes_per_chip_peak"] < 0.9 * report["hbm_bytes_per_chip"]  # the search's headroom
    d = report["distill"]
    assert d["teacher"] == teacher_preset and 0.45 < d["teacher_share_of_model_flops"] < 0.65
    counted = d.get("teacher_expert_rows", d)  # a MoE teacher: its experts at the expected rows
    assert 0.95 < counted["flops_ratio_compiled_to_student_plus_teacher"] < 1.1
    if tc.onpolicy_prompt_len is not None:
        assert report["rollout"]["prompt_len"] == tc.onpolicy_prompt_len and report["rollout"]["fits"]


def _compile(tmp_path, teachers: dict) -> dict:
    """aot_compile.py with the distill slice's real gin files, shrunk to a tiny student on a v5p-8
    (FSDP 2 x expert 2), once per teacher (name -> folder or None), the compiles side by side;
    name -> (report, compiled HLO text)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = {}
    for name, teacher in teachers.items():
        tiny = ["model_config.preset='tiny-dense'", "SEQ_LEN=128", "BATCH_SIZE=8", "MeshConfig.ici_fsdp=2",
                "MeshConfig.ici_expert=2", f"TEACHER={str(teacher)!r}" if teacher else "TEACHER=None"]
        cmd = [sys.executable, str(ROOT / "launch" / "aot_compile.py"), *[a for g in GINS for a in ("--gin", g)],
               *[a for b in tiny for a in ("--gin_param", b)], "--topology", "v5p-8",
               "--report", str(tmp_path / f"{name}.json"), "--hlo_dump", str(tmp_path / f"{name}.hlo")]
        procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for name, proc in procs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
    return {name: (json.loads((tmp_path / f"{name}.json").read_text()), (tmp_path / f"{name}.hlo").read_text())
            for name in teachers}


@needs_libtpu
def test_aot_distill_slice_compiles_the_teacher_into_the_step(tmp_path):
    """The slice's step, shrunk to a tiny dense student and a MoE teacher ~70x its size (its experts
    over the expert axis), compiled for TPU: against the same step without a teacher, the arguments
    grow by the teacher's bf16 parameters, and the compiled FLOPs (the teacher's expert matmuls
    counted at their expected rows: compile_report takes them from a dense student's MoE teacher)
    by bench_aot's count of the teacher's forward."""
    teacher_cfg = get_config("tiny-moe", num_layers=4, d_model=512, num_heads=4, num_kv_heads=2, head_dim=128,
                             ffn_dim=1024, num_experts=8, num_experts_per_tok=2, moe_ffn_dim=256)
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.to_hf_config(teacher_cfg)))
    reports = _compile(tmp_path, {"with": folder, "without": None})
    (with_t, hlo), (without, _) = reports["with"], reports["without"]
    assert with_t["model"] == without["model"] == "tiny-dense" and with_t["chips"] == 4 and with_t["fits"]
    assert with_t["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "expert": 2, "tensor": 1}
    assert "ragged-all-to-all" in with_t["collectives"] and "ragged-all-to-all" not in without["collectives"]
    assert with_t["model_flops_per_chip"] == without["model_flops_per_chip"]  # the student's count alone
    teacher_bytes = 2 * count_params(teacher_cfg)["total_params"] / 4  # the student's bf16, over 4 chips
    extra = with_t["bytes_per_chip_arguments"] - without["bytes_per_chip_arguments"]
    assert 0.99 * teacher_bytes < extra < 1.05 * teacher_bytes, (extra, teacher_bytes)
    # the report counts the teacher's expert matmuls at their expected rows (tokens * k / batch shards)
    assert with_t["expected_expert_rows_per_device"] == 8 * 128 * 2 / 4
    fields = _bench_aot().distill_fields(with_t, teacher_cfg, hlo)
    assert "teacher_expert_rows" not in fields  # no recount needed
    added = with_t["flops_per_chip"] - without["flops_per_chip"]
    assert 0.9 * fields["teacher_flops_per_chip"] < added < 1.1 * fields["teacher_flops_per_chip"], (added, fields)
    print(f"teacher: arguments +{extra / teacher_bytes:.3f}x its bf16 bytes, FLOPs (expected rows) "
          f"+{added / fields['teacher_flops_per_chip']:.3f}x its forward count")
