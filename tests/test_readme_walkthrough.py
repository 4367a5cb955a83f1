"""The README's walk-through block, run as written (in a scratch folder that links the repo's
tools), from a fresh tokenizer to a sample from the exported Hugging Face folder; then every block
marked `<!-- after-walkthrough -->` (Evaluation, Generation, Distillation) in the same folder, as
written; every other README command is listed here as one that needs what this box has not."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from train_utils import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("launch", "data_pipeline", "configs", ".venv")
README = (ROOT / "README.md").read_text()

# README commands no test runs as written, and why (the rest run below or in CI itself).
AT_SCALE = {
    "make demo": "tests/test_entry_points.py runs launch/demo.py --quick (the full demo: ~8 min)",
    "make test": "CI (.ci/run) runs it",
    "--input 'corpus/web/*.jsonl.zst'": "your corpus",
    "--gin model/qwen3-0.6b.gin": "a TPU slice (tests/test_readme_commands.py parses it)",
    "--checkpoint runs/stage3 --out hf/qwen3-0.6b-ours": "the 0.6B run above",
    "path/to/Qwen3-8B": "a downloaded Qwen3 (tests/test_hf_parity.py imports a random one)",
    "model_info.py --model qwen3-235b-a22b": "prints a table (tests/test_entry_points.py)",
    "python launch/train.py --gin cpu_smoke.gin": "tests/test_entry_points.py (the Distillation block runs it too)",
    "pip install -e '.[tpu]'": "an install (CI installs the [test] extra, which includes it)",
    "hf/qwen3-0.6b-distilled": "the distilled 0.6B above",
    "--input builtin:python-stdlib --tokenizer qwen3 --out data/stdlib": "the whole stdlib with the real tokenizer",
    "inspect_data.py data/stdlib": "the folder above",
    "aot_compile.py": "libtpu AOT for a 235B slice (tests/test_aot.py compiles small ones)",
    "bench_aot.py --from_json": "tests/test_bench_tables.py",
    "hf/qwen3-8b": "an 8B teacher",
    "launch/tpu/": "a TPU VM (tests/test_tpu_scripts.py)",
}


def walkthrough() -> str:
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", README, re.S)
    assert block, "README.md lost its walk-through markers"
    return block.group(1)


def after_walkthrough() -> list[str]:
    return re.findall(r"<!-- after-walkthrough -->\s*```bash\n(.*?)```", README, re.S)


def commands(block: str) -> list[str]:
    lines = [ln.split("  #")[0].strip() for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("#", ".", "for ", "done"))]


def test_walkthrough_covers_the_five_stage_datasets():
    script = walkthrough()
    stage_names = set()
    for stage in ("stage1", "stage2", "stage3"):
        gin = (ROOT / "configs" / f"{stage}.gin").read_text()
        weights = re.search(r"stage_mixture\.weights = \{(.*?)\}", gin).group(1)
        stage_names |= set(re.findall(r"'(\w+)'", weights))
    prepared = set()
    for loop in re.findall(r"for name in ([\w ]+); do", script):
        prepared |= set(loop.split())
    assert stage_names <= prepared, stage_names - prepared


def test_every_readme_command_runs_here_or_says_why_not():
    ran = [c for b in [walkthrough(), *after_walkthrough()] for c in commands(b)]
    assert len(after_walkthrough()) == 3 and len(ran) >= 16
    every = [c for b in re.findall(r"```bash\n(.*?)```", README, re.S) for c in commands(b)]
    missing = [c for c in every if c not in ran and not any(k in c for k in AT_SCALE)]
    assert not missing, f"README commands neither run by this file nor listed in AT_SCALE: {missing}"


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTEST", "HF_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the commands as written; only XLA's code generation is quicker
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """The folder the walk-through ran in, and its output."""
    folder = tmp_path_factory.mktemp("walkthrough")
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    r = _bash(walkthrough(), folder)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return folder, r.stdout


@pytest.mark.slow
def test_walkthrough_runs_as_written(walked):
    folder, out = walked
    for name in ("web", "code", "math", "multilingual", "reasoning"):
        assert json.loads((folder / "runs" / "data" / name / "stats.json").read_text())["documents"] > 0
    assert (folder / "runs" / "stage3" / "checkpoints" / "3").is_dir()
    config = json.loads((folder / "runs" / "hf" / "small-moe" / "config.json").read_text())
    assert config["vocab_size"] == 4096 and config["num_local_experts"] > 0
    assert "done: step 3" in out
    sample = out.split("bos None")[-1]  # after the export's last line, generate.py streams the continuation
    assert len(re.sub(r"\s", "", sample)) > 5, repr(out[-500:])


@pytest.mark.slow
def test_the_blocks_after_the_walkthrough_run_as_written(walked):
    """Evaluation, Generation and Distillation, in README order, in the walk-through's folder; and
    nothing is written outside runs/."""
    folder, _ = walked
    evaluation, generation, distillation = after_walkthrough()

    r = _bash(". .venv/bin/activate\n" + evaluation, folder)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    held = json.loads((folder / "runs" / "eval.json").read_text())
    assert set(held["heldout"]) == {"code", "web"} and 0 < held["heldout"]["code"]["bits_per_byte"] < 20
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("code ")]  # checkpoint, then export
    assert len(rows) == 2 and rows[0][1:3] == rows[1][1:3], r.stdout[-3000:]  # the same tokens and bytes
    assert float(rows[1][-1]) == pytest.approx(float(rows[0][-1]), rel=0.02)  # bf16 export: round-off apart
    lm_eval = json.loads((folder / "runs" / "lm_eval.json").read_text())
    assert 0 <= lm_eval["results"]["qwen3_jax_stdlib_mc"]["acc,none"] <= 1

    r = _bash(". .venv/bin/activate\n" + generation, folder)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(re.sub(r"\s", "", r.stdout)) > 40, repr(r.stdout)

    r = _bash(". .venv/bin/activate\n" + distillation, folder)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"step 20/20 \| loss [0-9.]+ \| lm [0-9.]+ \| kd [0-9.]+ \| top-1 agree", r.stdout), r.stdout[-3000:]
    assert re.search(r"\| on-policy KL [0-9.]+ \| top-1 agree", r.stdout), r.stdout[-3000:]
    assert (folder / "runs" / "distill_onpolicy" / "checkpoints" / "10").is_dir()

    assert sorted(p.name for p in folder.iterdir()) == sorted((*LINKED, "runs"))
