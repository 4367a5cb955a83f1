"""Every `launch/train.py` and `launch/aot_compile.py` command in the README parses, as written, to
the configuration train.py would run (the gin files and bindings through the same
`configurables.parse_gin` / `run_config`). The walk-through block also runs end to end
(tests/test_readme_walkthrough.py); the commands at Qwen3 scale (an 8B teacher, TPU slices) cannot
run here, so this is what checks that their files, macros and bindings fit together."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qwen3_jax import configurables

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(tool: str) -> list[list[str]]:
    """The README's `python launch/<tool>` command lines (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("   #")[0].split("  #")[0].strip()
            if line.startswith(f"python launch/{tool}"):
                out.append(shlex.split(line)[2:])
    return out


def gin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    files, params = [], []
    for flag, value in zip(argv, argv[1:]):
        if flag == "--gin":
            files.append(value)
        elif flag == "--gin_param":
            params.append(value)
        elif flag == "--preset":
            files.append(f"model/{value}.gin")
    return files, params


TRAIN = readme_commands("train.py")
AOT = readme_commands("aot_compile.py")


def test_the_readme_has_the_commands_this_file_checks():
    assert len(TRAIN) >= 9 and len(AOT) >= 1
    assert any("distill_onpolicy.gin" in c and "model/qwen3-0.6b.gin" in c for c in TRAIN)


@pytest.mark.parametrize("argv", TRAIN + AOT, ids=lambda a: " ".join(a)[:80])
def test_readme_command_parses_to_a_valid_run(argv):
    files, params = gin_args(argv)
    configurables.parse_gin(files, params)
    model, tc = configurables.run_config()
    tc.validate()
    if any(f.startswith("distill") for f in files):
        assert tc.teacher and tc.kd_alpha > 0
    if "distill_onpolicy.gin" in files:
        assert tc.onpolicy_prompt_len and tc.kd_divergence == "reverse" and tc.init_from
    if "model/qwen3-0.6b.gin" in files:
        assert model.name == "qwen3-0.6b" and configurables.query("%DATA_TOKENIZER") == "qwen3"
