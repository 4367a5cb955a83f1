"""The README's walk-through block, run as written (in a scratch folder that links the repo's
tools), from a fresh tokenizer to a generated sample from the exported Hugging Face folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from train_utils import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert block, "README.md lost its walk-through markers"
    return block.group(1)


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


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    for name in ("launch", "data_pipeline", "configs", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTEST"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the commands as written; only XLA's code generation is quicker
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("web", "code", "math", "multilingual", "reasoning"):
        assert json.loads((tmp_path / "data" / name / "stats.json").read_text())["documents"] > 0
    assert (tmp_path / "runs" / "stage3" / "checkpoints" / "3").is_dir()
    config = json.loads((tmp_path / "hf" / "small-moe" / "config.json").read_text())
    assert config["vocab_size"] == 4096 and config["num_local_experts"] > 0
    assert "done: step 3" in r.stdout
