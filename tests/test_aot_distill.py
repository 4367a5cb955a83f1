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
SLICE = "slices/distill-qwen3-32b-to-8b-v5p-128.gin"
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


def test_distill_slice_parses_with_the_training_gin_files_and_matches_its_report(tmp_path):
    """The training command's gin files + the slice file give the student, batch, mesh and remat
    the saved AOT report (bench_aot.py --distill) was compiled with; the bench case is that command."""
    bench = _bench_aot()
    teacher = bench.teacher_dir("qwen3-32b", tmp_path)
    configurables.parse_gin(GINS, [f"TEACHER='{teacher}'"])
    model, tc = configurables.run_config()
    assert (model.name, tc.seq_len, tc.batch_size, tc.teacher) == ("qwen3-8b", 4096, 256, str(teacher))
    assert tc.mesh.ici_fsdp == -1 and tc.kd_alpha > 0
    case = bench.CASES["distill_32b_8b"]
    assert [case[i + 1] for i, a in enumerate(case) if a == "--gin"] == GINS
    report = json.loads((ROOT / "benchmarks" / "aot_reports" / "distill_32b_8b.json").read_text())
    assert report["config"]["gin"] == GINS and report["fits"]
    assert (report["model"], report["seq_len"], report["global_batch"], report["remat"], report["loss_chunk"]) == (
        model.name, tc.seq_len, tc.batch_size, model.remat, tc.loss_chunk)
    d = report["distill"]
    assert d["teacher"] == "qwen3-32b" and 0.5 < d["teacher_share_of_model_flops"] < 0.65
    assert 0.95 < d["flops_ratio_compiled_to_student_plus_teacher"] < 1.1


def _compile(tmp_path, teachers: dict) -> dict:
    """aot_compile.py with the distill slice's real gin files, shrunk to a tiny student on a v5p-8,
    once per teacher (name -> folder or None), the compiles side by side; name -> report."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = {}
    for name, teacher in teachers.items():
        tiny = ["model_config.preset='tiny-dense'", "SEQ_LEN=128", "BATCH_SIZE=8",
                f"TEACHER={str(teacher)!r}" if teacher else "TEACHER=None"]
        cmd = [sys.executable, str(ROOT / "launch" / "aot_compile.py"), *[a for g in GINS for a in ("--gin", g)],
               *[a for b in tiny for a in ("--gin_param", b)], "--topology", "v5p-8",
               "--report", str(tmp_path / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for name, proc in procs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
    return {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in teachers}


@needs_libtpu
def test_aot_distill_slice_compiles_the_teacher_into_the_step(tmp_path):
    """The slice's step, shrunk to a tiny student and a teacher ~70x its size, compiled for TPU:
    against the same step without a teacher, the arguments grow by the teacher's bf16 parameters
    and the compiled FLOPs by bench_aot's count of the teacher's forward."""
    teacher_cfg = get_config("tiny-dense", num_layers=4, d_model=512, num_heads=4, num_kv_heads=2, head_dim=128,
                             ffn_dim=1024)
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.to_hf_config(teacher_cfg)))
    reports = _compile(tmp_path, {"with": folder, "without": None})
    with_t, without = reports["with"], reports["without"]
    assert with_t["model"] == without["model"] == "tiny-dense" and with_t["chips"] == 4 and with_t["fits"]
    assert with_t["model_flops_per_chip"] == without["model_flops_per_chip"]  # the student's count alone
    teacher_bytes = 2 * count_params(teacher_cfg)["total_params"] / 4  # the student's bf16, FSDP over 4 chips
    extra = with_t["bytes_per_chip_arguments"] - without["bytes_per_chip_arguments"]
    assert 0.99 * teacher_bytes < extra < 1.05 * teacher_bytes, (extra, teacher_bytes)
    teacher_flops = _bench_aot().distill_fields(with_t, teacher_cfg)["teacher_flops_per_chip"]
    added = with_t["flops_per_chip"] - without["flops_per_chip"]
    assert 0.9 * teacher_flops < added < 1.1 * teacher_flops, (added, teacher_flops)
    print(f"teacher: arguments +{extra / teacher_bytes:.3f}x its bf16 bytes, FLOPs +{added / teacher_flops:.3f}x "
          f"its forward count")
