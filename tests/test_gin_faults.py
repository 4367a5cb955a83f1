"""Bad gin input ends in one line naming the binding, exit 2, before anything is built or written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("train_cli", ROOT / "launch" / "train.py")
train_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_cli)

# (case, extra --gin_param bindings, fragments the one error line must contain)
CASES = [
    ("misspelt macro", ["STEPPS=5"], ["macro STEPPS is set but nothing uses it", "STEPS"]),
    ("macro used, never set", ["train.steps=%STEPZ"], ["macro %STEPZ (used by train.steps) is never set"]),
    ("string for a float", ["lr_schedule.peak_lr='abc'"], ["lr_schedule.peak_lr = 'abc'", "expected float"]),
    ("float for an int", ["train.steps=3.5"], ["train.steps = 3.5", "expected int"]),
    ("None for a mesh size", ["MeshConfig.ici_fsdp=None"], ["MeshConfig.ici_fsdp = None", "expected int"]),
    ("bad type inside overrides", ["model_config.overrides={'d_model': 'x'}"],
     ["model_config.overrides['d_model'] = 'x'", "expected int"]),
    ("unquoted string", ["lr_schedule.kind=wsd"],
     ["--gin_param 'lr_schedule.kind=wsd'", "strings need quotes", "lr_schedule.kind=\"'wsd'\""]),
    ("unquoted path", ["train.init_from=runs/stage1"], ["cannot read the value 'runs/stage1'", "quotes"]),
    ("unknown parameter", ["train.stepz=5"], ["train", "stepz"]),
]


@pytest.mark.parametrize("case,bindings,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_binding_names_it_and_exits_2(case, bindings, fragments, tmp_path, capsys):
    workdir = tmp_path / "run"
    rc = train_cli.main(["--gin", "cpu_smoke.gin", "--workdir", str(workdir), *sum((["--gin_param", b] for b in bindings), [])])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, (f, err)
    assert not workdir.exists()  # nothing created before the configuration is known to be good


def test_unquoted_string_in_a_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'cpu_smoke.gin'\nlr_schedule.kind = wsd\n")
    rc = train_cli.main(["--gin", str(bad), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.gin, line 2" in err and "'wsd'" in err and "quotes" in err


def test_overriding_a_macro_binding_is_not_an_unused_macro():
    """`train.steps=3` replaces `train.steps = %STEPS`; STEPS is still written in the files."""
    from qwen3_jax import configurables
    configurables.parse_gin(["cpu_smoke.gin"], ["train.steps=3", "lr_schedule.peak_lr=1"])
    model, tc = configurables.run_config()
    assert tc.steps == 3 and tc.optim.schedule.peak_lr == 1


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.gin") if p.name != "base.gin"))
def test_every_shipped_run_config_passes_the_checks(name):
    from qwen3_jax import configurables
    from qwen3_jax.errors import TrainingError
    required = ["TEACHER='runs/teacher'"] if name.startswith("distill") else []
    if required:  # a required macro left out is named
        with pytest.raises(TrainingError, match="macro %TEACHER .* is never set"):
            configurables.parse_gin([name], [])
    configurables.parse_gin([name], required)
    configurables.run_config()


def test_renamed_setting_old_name_still_works_and_warns(caplog):
    """train.max_nonfinite_in_a_row (renamed max_bad_in_a_row: it also counts loss spikes) is still
    read, with a warning naming the new name; setting both is an error naming both."""
    from qwen3_jax import configurables
    from qwen3_jax.errors import TrainingError

    with caplog.at_level("WARNING", logger="qwen3_jax"):
        _, tc = configurables.read_run(["cpu_smoke.gin"], ["train.max_nonfinite_in_a_row=7"])
    assert tc.max_bad_in_a_row == 7
    assert "'max_nonfinite_in_a_row' is now called 'max_bad_in_a_row'" in caplog.text
    with pytest.raises(TrainingError, match="max_nonfinite_in_a_row and train.max_bad_in_a_row are both set"):
        configurables.read_run(["cpu_smoke.gin"], ["train.max_nonfinite_in_a_row=7", "train.max_bad_in_a_row=2"])


def test_renamed_exchange_value_is_read_as_its_new_name(caplog):
    """train.moe_exchange='ragged' (now 'ragged_all_to_all': 'ragged' also named a moe_impl) still
    works, warned once; the run config holds the new name."""
    from qwen3_jax import configurables

    with caplog.at_level("WARNING", logger="qwen3_jax"):
        _, tc = configurables.read_run(["cpu_smoke.gin"], ["train.moe_exchange='ragged'"])
    assert tc.moe_exchange == "ragged_all_to_all"
    assert "'ragged' is now called 'ragged_all_to_all'" in caplog.text
