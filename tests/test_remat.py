"""Remat policies: every one gives remat='none''s loss and gradients; each keeps what it names;
the search picks a policy that fits, with no more FLOPs than full remat."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qwen3_jax import remat_search
from qwen3_jax.config import REMAT_NAMES, REMAT_POLICIES, ModelConfig, get_config
from qwen3_jax.model.transformer import create_model

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


def test_policy_names_and_error():
    assert set(REMAT_POLICIES) == {"auto", "none", "full", "dots", "dots_no_batch"} | set(REMAT_NAMES)
    assert ModelConfig().remat == "auto"
    with pytest.raises(ValueError, match="remat='save_everything' is not one of .*save_attn_out"):
        ModelConfig(remat="save_everything")


def _loss_and_grads(preset: str, policies, scan: bool = True, moe_impl: str = "dense"):
    """One jitted program: loss and gradients of the same parameters under each policy."""
    cfgs = [get_config(preset, compute_dtype="float32", moe_impl=moe_impl, remat=p, scan_layers=scan)
            for p in policies]
    graphs, state = [], None
    for cfg in cfgs:
        g, st = nnx.split(create_model(cfg, seed=0))
        graphs.append(g)
        state = st if state is None else state
    tok = jax.random.randint(jax.random.key(1), (2, 32), 0, cfgs[0].vocab_size)
    seg = jnp.concatenate([jnp.ones((2, 20), jnp.int32), 2 * jnp.ones((2, 12), jnp.int32)], axis=1)

    def loss(st, g):
        logits = nnx.merge(g, st)(tok, segment_ids_BT=seg)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * logits[..., 1])

    return jax.jit(lambda st: [jax.value_and_grad(loss)(st, g) for g in graphs])(state)


@pytest.mark.parametrize("preset,moe_impl,policies", [
    pytest.param("tiny-dense", "dense", tuple(p for p in REMAT_POLICIES if p != "auto"), marks=pytest.mark.slow),  # one program, every policy
    ("tiny-dense", "dense", ("none", "save_attn_mlp", "offload_attn_mlp", "save_qkv_proj")),
    ("tiny-moe", "dense", ("none", "full", "save_attn_out", "offload_attn")),
    ("tiny-moe", "blocked", ("none", "save_moe", "save_attn_moe", "save_moe_offload_attn")),  # names moe_wi
])
def test_every_policy_matches_no_remat(preset, moe_impl, policies):
    """fp32 on CPU: values and gradients of every policy equal remat='none''s (recomputation
    repeats the same ops, so equal to rounding)."""
    out = _loss_and_grads(preset, policies, moe_impl=moe_impl)
    (l0, g0) = out[0]
    for p, (l, g) in zip(policies, out):
        assert float(l) == pytest.approx(float(l0), rel=1e-6), p
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            assert jnp.allclose(a, b, rtol=1e-5, atol=1e-7), p


def _saved_names(policy: str, preset: str = "tiny-dense") -> set[str]:
    """The checkpoint names among the residuals one layer keeps for its backward pass."""
    cfg = get_config(preset, compute_dtype="float32", remat=policy, scan_layers=False, num_layers=1,
                     moe_impl="blocked")
    g, st = nnx.split(create_model(cfg))
    tok = jnp.zeros((1, 16), jnp.int32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda s: jnp.sum(nnx.merge(g, s)(tok)), st)
    return {n for n in ("qkv_proj", "context", "out_proj", "mlp_wi", "moe_wi") if f"named '{n}'" in out.getvalue()}


@pytest.mark.parametrize("policy,preset", [(p, "tiny-dense") for p in
                                           ("full", "save_qkv_proj", "save_attn_out", "save_mlp", "save_attn_mlp")] +
                         [("save_moe", "tiny-moe"), ("save_attn_moe", "tiny-moe")])
def test_policy_keeps_what_it_names(policy, preset):
    assert _saved_names(policy, preset) == set(remat_search.kept(policy)[1] if policy != "full" else ())


def _est(s: float) -> dict:
    return {"estimate_s": s, "low_s": 0.9 * s, "high_s": 1.2 * s, "predicted_mfu": 0.5}


def test_search_prunes_dominated_and_hopeless():
    """A fitting policy prunes the ones that keep a subset; one that does not fit prunes the ones
    that keep a superset in HBM; the choice is the fewest FLOPs, ties by predicted time."""
    peak = {"none": 99, "save_attn_mlp": 99, "save_attn_out": 50, "save_attn": 40, "offload_attn": 30, "full": 20}
    flops = {"none": 100, "save_attn_mlp": 101, "save_attn_out": 110, "save_attn": 115, "offload_attn": 110,
             "full": 133}
    compiled = []

    def compile_policy(p):
        compiled.append(p)
        return {"bytes_per_chip_peak": peak[p], "hbm_bytes_per_chip": 100, "flops_per_chip": flops[p],
                "flops_ratio_compiled_to_model": flops[p] / 100, "libtpu_topology": "v5p:2x2x1",
                "step_time": {"calibrated": _est(2.0 if p == "offload_attn" else 1.0)}}

    order = ["save_attn_mlp", "none", "offload_attn", "save_attn_out", "save_attn", "full"]
    choice, report, rows = remat_search.search(compile_policy, order, headroom=0.9)
    assert compiled == ["save_attn_mlp", "offload_attn", "save_attn_out"]
    assert choice == "save_attn_out" and report["flops_per_chip"] == 110  # tie with offload_attn: faster
    skipped = {r["policy"]: r["reason"] for r in rows if not r["compiled"]}
    assert skipped["none"].startswith("cannot fit")  # keeps in HBM all save_attn_mlp keeps
    assert skipped["save_attn"].startswith("dominated") and skipped["full"].startswith("dominated")
    # the other way round: a fitting save_attn_out prunes offload_attn (same tensors, more to the host)
    compiled.clear()
    remat_search.search(compile_policy, ["save_attn_out", "offload_attn", "full"], headroom=0.9)
    assert compiled == ["save_attn_out"]
    assert "save_attn_out" in remat_search.format_rows(rows, choice, 0.9)


def test_search_prefers_the_faster_prediction_over_fewer_flops():
    """An offloading policy that keeps more (fewer FLOPs) does not prune one that keeps less but
    more of it in HBM; the choice is the fastest calibrated prediction, and among predictions
    within 2% of it the fewest FLOPs; without calibrated predictions (train.py's startup search)
    the fewest FLOPs: an uncalibrated estimate (step_time's bound at peak rates) never decides."""
    peak = {"save_attn_moe": 120, "save_moe_offload_attn": 80, "save_attn_out": 70, "full": 30}
    flops = {"save_attn_moe": 105, "save_moe_offload_attn": 109, "save_attn_out": 122, "full": 135}

    def run(est):
        compiled = []

        def compile_policy(p):
            compiled.append(p)
            return {"bytes_per_chip_peak": peak[p], "hbm_bytes_per_chip": 100, "flops_per_chip": flops[p],
                    "flops_ratio_compiled_to_model": flops[p] / 100, "libtpu_topology": "v5p:2x2x1",
                    "step_time": {"calibrated": _est(est[p]), "estimate_s": 1.0} if est else {"estimate_s": 1.0}}

        choice, _, rows = remat_search.search(compile_policy, list(peak), headroom=0.9)
        return choice, compiled, rows

    choice, compiled, rows = run({"save_attn_moe": 1.0, "save_moe_offload_attn": 11.3, "save_attn_out": 9.5,
                                  "full": 10.0})
    assert compiled == ["save_attn_moe", "save_moe_offload_attn", "save_attn_out"] and choice == "save_attn_out"
    assert [r["reason"] for r in rows if not r["compiled"]][0].startswith("dominated")  # full
    assert run({"save_attn_moe": 1.0, "save_moe_offload_attn": 9.6, "save_attn_out": 9.5, "full": 10.0})[0] == \
        "save_moe_offload_attn"  # within 2%: fewer FLOPs
    assert "the fastest calibrated predicted step" in remat_search.format_rows(rows, choice, 0.9)
    assert remat_search.rank(rows) == ("save_attn_out", "save_moe_offload_attn")  # the runner-up too
    choice, _, rows = run(None)
    assert choice == "save_moe_offload_attn"
    assert "fewest FLOPs (no calibrated step-time prediction)" in remat_search.format_rows(rows, choice, 0.9)


def _auto_program(monkeypatch=None, memory=None):
    from qwen3_jax.train import build as build_module
    from qwen3_jax.train.build import build
    from qwen3_jax.train.config import TrainConfig

    if memory is not None:
        monkeypatch.setattr(build_module, "device_memory_bytes", lambda device: memory)
    cfg = get_config("tiny-dense", compute_dtype="float32", num_layers=2)
    tc = TrainConfig(steps=2, seq_len=64, batch_size=4, checkpoint_every=2)
    return cfg, tc, build(cfg, tc, jax.devices()[:1])


def test_build_auto_on_cpu_compiles_none_once_and_runs_that_program(capsys):
    """remat='auto' on this host: 'none' fits its RAM, every other candidate keeps less (pruned),
    so exactly one program is compiled, the same program an explicit remat='none' builds."""
    from qwen3_jax.hlo_stats import program_fingerprint
    from qwen3_jax.train.build import build

    cfg, tc, program = _auto_program()
    assert program.model.remat == "none" and program.compiled is not None
    assert [r["policy"] for r in program.remat_rows if r["compiled"]] == ["none"]
    assert all(r["reason"].startswith("dominated by none") for r in program.remat_rows if not r["compiled"])
    explicit = build(cfg.replace(remat="none"), tc, jax.devices()[:1])
    assert program_fingerprint(program.lowered) == program_fingerprint(explicit.lower())
    assert "remat auto -> 'none'" in capsys.readouterr().out


def test_build_auto_with_little_memory_picks_a_policy_that_fits(monkeypatch):
    """Memory between what full remat and 'none' need: the choice is not 'none', fits, and its
    compiled peak is the one the search measured; with less than full remat needs, a clear error."""
    from qwen3_jax.memory import peak_bytes
    from qwen3_jax.errors import TrainingError

    from qwen3_jax.train.build import build

    cfg, tc, roomy = _auto_program()
    none_peak = roomy.remat_rows[0]["peak_gib"] * 2**30
    full_peak, _ = peak_bytes(build(cfg.replace(remat="full"), tc, jax.devices()[:1]).lower().compile()
                              .memory_analysis(), "cpu")
    assert full_peak < none_peak
    memory = int((full_peak + none_peak) / 2 / remat_search.HEADROOM)
    _, _, program = _auto_program(monkeypatch, memory)
    assert program.model.remat not in ("none", "auto")
    peak, _ = peak_bytes(program.compiled.memory_analysis(), "cpu")
    assert peak <= remat_search.HEADROOM * memory
    rows = {r["policy"]: r for r in program.remat_rows}
    assert rows["none"]["compiled"] and not rows["none"]["fits"]
    with pytest.raises(TrainingError, match="remat='auto': no remat policy fits"):
        _auto_program(monkeypatch, int(full_peak * 0.5))


def test_candidates_for_model_and_platform():
    moe = remat_search.candidates(get_config("qwen3-30b-a3b"), "tpu")
    assert "save_attn_out" in moe and "offload_attn" in moe and not any("mlp" in p for p in moe)
    assert moe.index("save_attn_moe") < moe.index("save_moe_offload_attn") < moe.index("save_attn_out")
    dense = remat_search.candidates(get_config("qwen3-8b"), "cpu")
    assert "save_attn_mlp" in dense and not any(p.startswith("offload") or "moe" in p for p in dense)
    assert "save_moe_offload_attn" not in remat_search.candidates(get_config("qwen3-30b-a3b"), "cpu")
    assert dense[0] == "none" and dense[-1] == "full"
    with pytest.raises(ValueError, match="bogus"):
        remat_search.candidates(get_config("qwen3-8b"), "tpu", ["bogus"])


@needs_libtpu
@pytest.mark.slow
def test_aot_remat_search_picks_a_policy_that_fits(tmp_path):
    """--remat_search on a small dense model and a v5p 2x2x1 slice, HBM cut so that keeping every
    activation does not fit: the chosen policy fits, costs no more FLOPs than full remat, and the
    report lists every candidate."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    args = ["--gin", "stage1.gin", "--gin_param", "model_config.preset='tiny-dense'",
            "--gin_param", "model_config.overrides={}", "--topology", "v5p-8", "--mesh", "fsdp=4",
            "--seq_len", "256", "--global_batch", "8", "--remat_search",
            "--remat_candidates", "none,save_attn,full", "--remat_cache", str(tmp_path / "cache")]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), *args, "--report",
                        str(tmp_path / "all.json")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    full = json.loads((tmp_path / "all.json").read_text())["remat_search"]["candidates"]
    by = {c["policy"]: c for c in full}
    assert set(by) == {"none", "save_attn", "full"} and all(c["compiled"] for c in full)
    assert by["none"]["flops_per_chip"] < by["full"]["flops_per_chip"]
    assert by["none"]["peak_gib"] > by["save_attn"]["peak_gib"]
    # HBM between what save_attn and none need: none must not be chosen (the compiles come from the cache)
    hbm = (by["save_attn"]["peak_gib"] + by["none"]["peak_gib"]) / 2 / 0.9
    auto = [a if a != "--remat_search" else "--remat=auto" for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), *auto, "--hbm_gib", str(hbm),
                        "--report", str(tmp_path / "auto.json")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiling" not in r.stdout and "already compiled" in r.stdout
    rep = json.loads((tmp_path / "auto.json").read_text())
    choice = rep["remat_search"]["choice"]
    assert choice != "none" and rep["remat"] == choice and rep["fits"]
    assert rep["bytes_per_chip_peak"] <= 0.9 * rep["hbm_bytes_per_chip"]
    assert rep["flops_per_chip"] <= by["full"]["flops_per_chip"]
    assert f"model_config.remat = {choice!r}" in r.stdout and rep["step_time"]["estimate_s"] > 0
