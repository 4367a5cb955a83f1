"""One path from config to compiled step: the AOT tool compiles what train.py runs; the library
needs no gin; the model layer imports no training code; attention memory is linear in the length."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from qwen3_jax import aot, configurables
from qwen3_jax.hlo_stats import program_fingerprint
from qwen3_jax.train.build import build
from train_utils import xla_flags

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_import_structure():
    """The model layer imports no training, launch or gin code; no library module imports launch;
    gin appears in one library module only (qwen3_jax.configurables)."""
    model_files = [ROOT / "qwen3_jax" / "config.py", *(ROOT / "qwen3_jax" / "model").glob("*.py")]
    for f in model_files:
        bad = {m for m in _imports(f) if m.split(".")[0] in ("gin", "launch", "data_pipeline")
               or m.startswith(("qwen3_jax.train", "qwen3_jax.configurables", "qwen3_jax.hf", "qwen3_jax.params"))}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
    library = [*(ROOT / "qwen3_jax").rglob("*.py"), *(ROOT / "data_pipeline").rglob("*.py")]
    with_gin = set()
    for f in library:
        mods = _imports(f)
        assert not {m for m in mods if m.split(".")[0] in ("launch", "train", "aot_compile")}, f
        if "gin" in mods:
            with_gin.add(f.relative_to(ROOT).as_posix())
    assert with_gin == {"qwen3_jax/configurables.py"}, with_gin
    for d in ("qwen3_jax", "data_pipeline", "launch"):  # module size
        for f in (ROOT / d).rglob("*.py"):
            assert len(f.read_text().splitlines()) <= 500, f


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    return env


@pytest.mark.slow
def test_aot_tool_compiles_the_step_train_py_runs_on_cpu(data_dir, tmp_path):
    """The same gin files through launch/train.py (which trains one step) and through
    launch/aot_compile.py --topology cpu give the same lowered step program."""
    data = data_dir
    gin = ["--gin", "cpu_smoke.gin", "--gin", "model/tiny-moe.gin"]
    params = [f"stage_mixture.builtin_dir='{data}'", "stage_mixture.spm_vocab_size=512", "SEQ_LEN=64",
              "BATCH_SIZE=4", "train.micro_batches=2", "train.stop_after=1", "train.async_checkpoint=False"]
    gp = [a for p in params for a in ("--gin_param", p)]
    t = subprocess.run([sys.executable, "launch/train.py", *gin, *gp, "--workdir", str(tmp_path / "w")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert t.returncode == 0, t.stdout + t.stderr
    a = subprocess.run([sys.executable, "launch/aot_compile.py", *gin, *gp, "--topology", "cpu",
                        "--report", str(tmp_path / "r.json")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert a.returncode == 0, a.stdout + a.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert f"step program {rep['step_program']}" in t.stdout, (rep["step_program"], t.stdout)
    assert rep["micro_batches"] == 2 and rep["attention_impl"] == "reference"
    # ... the same program built here from the same gin files (lowered, not compiled), and a change
    # the training command would see changes it
    def fingerprint(*extra):
        configurables.parse_gin(["cpu_smoke.gin", "model/tiny-moe.gin"], [*params, *extra])
        model, tc = configurables.run_config()
        return program_fingerprint(build(model, tc, jax.devices()[:1]).lower())

    assert fingerprint() == rep["step_program"]
    assert fingerprint("train.z_loss=1e-4") != rep["step_program"]


@needs_libtpu
@pytest.mark.slow
def test_aot_tool_compiles_the_loops_program_for_a_tpu_slice(tmp_path):
    """For a TPU slice: the tool's step program is the one the loop's builder makes from the same
    gin files on those devices (attention auto -> splash, the stage's loss chunk, micro-batches)."""
    gins = ["stage1.gin", "model/tiny-moe.gin"]
    bindings = ["SEQ_LEN=256", "BATCH_SIZE=16", "train.micro_batches=2", "MeshConfig.ici_expert=2"]
    env = dict(_env(), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    r = subprocess.run([sys.executable, "launch/aot_compile.py", *[a for g in gins for a in ("--gin", g)],
                        *[a for b in bindings for a in ("--gin_param", b)], "--topology", "v5p-8",
                        "--report", str(tmp_path / "r.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["attention_impl"] == "splash" and rep["attention_impl_config"] == "auto"
    configurables.parse_gin(gins, bindings)
    model, tc = configurables.run_config()
    topo = aot.parse_topology("v5p-8")
    program = build(model, tc, aot.topology_devices(topo), process_count=1)
    assert program_fingerprint(program.lower()) == rep["step_program"]


def _temp_bytes(seq_len: int, *bindings: str) -> int:
    """XLA's temp allocation of the cpu_smoke step at `seq_len`, batch 1, one CPU device (what
    launch/train.py --gin cpu_smoke.gin would compile)."""
    configurables.parse_gin(["cpu_smoke.gin"], [f"SEQ_LEN={seq_len}", "BATCH_SIZE=1", *bindings])
    model, tc = configurables.run_config()
    compiled = build(model, tc, jax.devices()[:1]).lower().compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_long_sequences_use_linear_attention_memory():
    """cpu_smoke at 8K and 32K tokens: the default attention ('auto' -> chunked beyond 256) keeps
    the step's temporaries growing no faster than the tokens; the reference kernel grows ~T^2."""
    m8, m32 = _temp_bytes(8192), _temp_bytes(32768)
    assert m32 < 4 * m8, (m8, m32)
    r2, r8 = _temp_bytes(2048, "model_config.attention_impl='reference'"), \
        _temp_bytes(8192, "model_config.attention_impl='reference'")
    assert r8 > 8 * r2, (r2, r8)  # the check above can fail: quadratic memory would


def test_aot_flags_are_gin_bindings_and_errors_name_the_value(capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import aot_compile
    finally:
        sys.path.remove(str(ROOT / "launch"))
    assert aot_compile.mesh_bindings("fsdp=64,expert=8")[:5] == [
        "MeshConfig.ici_data=1", "MeshConfig.ici_fsdp=64", "MeshConfig.ici_context=1", "MeshConfig.ici_expert=8",
        "MeshConfig.ici_tensor=1"]
    rc = aot_compile.main(["--gin", "cpu_smoke.gin", "--topology", "cpu", "--gin_param", "model_config.remat='some'"])
    assert rc == 2 and "remat='some'" in capsys.readouterr().err
    rc = aot_compile.main(["--gin", "cpu_smoke.gin", "--topology", "cpu", "--gin_param", "SEQ_LEN=100",
                           "--attention_impl", "splash"])
    assert rc == 2 and "splash" in capsys.readouterr().err
