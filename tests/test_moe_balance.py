"""MoE balancing as Qwen3 trains it: per-layer load-balancing loss over the global batch (and the
running / previous-step variants), router z-loss, aux-loss-free routing bias."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import get_config
from qwen3_jax.model.moe import load_balancing_loss, select_experts
from qwen3_jax.params import flatten, model_from_flat
from qwen3_jax.train import moe_balance
from qwen3_jax.train.config import LossConfig, OptimConfig, ScheduleConfig, TrainConfig
from qwen3_jax.train.optim import make_optimizer
from qwen3_jax.train.step import init_state, make_train_step, split_micro_batches


def _reference(counts_LBE, probs_LBE, tokens_B, E, scope, reduce):
    """Straight from the definition, one layer (and one sequence) at a time."""
    per_layer = []
    for c_BE, p_BE in zip(counts_LBE, probs_LBE):
        if scope == "batch":
            n = tokens_B.sum()
            per_layer.append(E * np.sum(c_BE.sum(0) / n * p_BE.sum(0) / n))
        else:
            per_layer.append(np.mean([E * np.sum(c / n * p / n) for c, p, n in zip(c_BE, p_BE, tokens_B)]))
    return np.mean(per_layer) if reduce == "mean" else np.sum(per_layer)


def test_per_layer_loss_sees_layers_collapsed_onto_different_experts():
    """Layer 0 sends every token to expert 0, layer 1 to expert 1 (top-1 of 4). Per layer the loss
    is E = 4 (the worst); pooling the layers, as transformers' aux_loss does, gives 2 (half of it:
    it sees two equally used experts)."""
    c = np.zeros((2, 1, 4), np.float32)
    c[0, 0, 0] = c[1, 0, 1] = 10
    tokens = np.array([10.0])
    got = float(load_balancing_loss(c, c, tokens, 4))
    pooled_f = c.sum((0, 1)) / (2 * 10)
    assert got == pytest.approx(4.0) and 4 * np.sum(pooled_f * pooled_f) == pytest.approx(2.0)
    balanced = np.full((2, 1, 4), 2.5, np.float32)
    assert float(load_balancing_loss(balanced, balanced, tokens, 4)) == pytest.approx(1.0)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_loss_and_gradient_equal_the_per_layer_definition(scope, reduce):
    rng = np.random.RandomState(0)
    L, B, E, k = 3, 4, 8, 2
    tokens = rng.randint(5, 20, B).astype(np.float32)
    counts = np.stack([[rng.multinomial(int(k * n), np.ones(E) / E) for n in tokens] for _ in range(L)]).astype(np.float32)
    probs = rng.dirichlet(np.ones(E), (L, B)).astype(np.float32) * tokens[None, :, None]
    got = float(load_balancing_loss(counts, probs, tokens, E, scope=scope, layer_reduce=reduce))
    assert got == pytest.approx(_reference(counts, probs, tokens, E, scope, reduce), rel=1e-5)
    g = jax.grad(lambda p: load_balancing_loss(counts, p, tokens, E, scope=scope, layer_reduce=reduce))(probs)
    scale = 1 / L if reduce == "mean" else 1.0
    if scope == "batch":
        want = np.broadcast_to((E * counts.sum(1) / tokens.sum() ** 2)[:, None, :], counts.shape) * scale
    else:
        want = E * counts / tokens[None, :, None] ** 2 / B * scale
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5)


def _tiny_batch(B=4, T=16, V=512, seed=0):
    rng = np.random.RandomState(seed)
    tok = rng.randint(0, V, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, 12:] = 0  # some padding
    return dict(tokens=tok, targets=np.roll(tok, -1, 1), loss_mask=(seg > 0).astype(np.float32), segment_ids=seg,
                positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))


_STATS = {}


def _micro_stats(cfg, params, batch, n):
    """Router statistics of each of the n micro-batches (jitted once per config: op by op, the
    forward took ~10 s per call on a busy box)."""
    if (cfg, n) not in _STATS:
        def stats(params, batch):
            model = model_from_flat(cfg, flatten(params))
            mbs = split_micro_batches(batch, n)
            return [model.hidden(*(mbs[k][m] for k in ("tokens", "positions", "segment_ids")))[1] for m in range(n)]
        _STATS[cfg, n] = jax.jit(stats)
    return _STATS[cfg, n](params, batch)


@pytest.mark.parametrize("mode", ["exact", "running", "previous_step"])
def test_global_counts_variants_equal_their_definitions(mode):
    """Two steps with 2 micro-batches: the aux loss the step reports equals the sum over
    micro-batches of E·Σ f·p per layer with f from the variant's counts and p over the global batch."""
    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none", router_aux_loss_coef=0.01)
    opt, _ = make_optimizer(OptimConfig(schedule=ScheduleConfig(peak_lr=1e-2, warmup_steps=1)), 10)
    step = jax.jit(make_train_step(cfg, opt, LossConfig(aux_global_counts=mode), micro_batches=2))
    state = init_state(cfg, opt)
    batches = [_tiny_batch(seed=0), _tiny_batch(seed=1)]
    for i, batch in enumerate(batches):
        st = _micro_stats(cfg, state.params, batch, 2)
        N = float((batch["segment_ids"] > 0).sum())
        c = [np.asarray(s["counts"]).sum(1) for s in st]
        t = [float(np.asarray(s["tokens"]).sum()) for s in st]
        p = [np.asarray(s["prob_sum"]).sum(1) / N for s in st]
        if mode == "exact":
            fs = [(c[0] + c[1]) / N] * 2
        elif mode == "running" or i == 0:  # previous_step's first step has no previous: running
            fs = [c[0] / t[0], (c[0] + c[1]) / (t[0] + t[1])]
        else:
            fs = [np.asarray(state.moe["counts"]) / float(state.moe["tokens"])] * 2
        want = sum(float(np.mean(cfg.num_experts * np.sum(f * pm, -1))) for f, pm in zip(fs, p))
        prev = state
        state, m = step(state, batch)
        assert float(m["aux_loss"]) == pytest.approx(want, rel=1e-4), (mode, i)
        np.testing.assert_allclose(np.asarray(state.moe["counts"]), c[0] + c[1])  # kept for the next step
    assert int(prev.step) == 1


def test_router_z_loss_is_the_mean_squared_logsumexp():
    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none")
    opt, _ = make_optimizer(OptimConfig(), 10)
    state = init_state(cfg, opt)
    batch = _tiny_batch()
    _, m = jax.jit(make_train_step(cfg, opt, LossConfig(router_z_loss=1e-3)))(state, batch)
    from qwen3_jax.model import moe as moe_lib

    orig = moe_lib.router_logits

    def every_layers_router_logits(params):  # unscanned, to see each layer (traced once, under jit)
        captured = []
        moe_lib.router_logits = lambda x, r: captured.append(orig(x, r)) or captured[-1]
        try:
            model_from_flat(cfg.replace(scan_layers=False), flatten(params)).hidden(
                batch["tokens"], batch["positions"], batch["segment_ids"])
        finally:
            moe_lib.router_logits = orig
        return captured

    captured = jax.jit(every_layers_router_logits)(state.params)
    mask = batch["segment_ids"] > 0
    lse2 = [np.square(np.asarray(jax.nn.logsumexp(lg, -1)))[mask].mean() for lg in captured]
    assert len(captured) == cfg.num_moe_layers
    assert float(m["router_z_loss"]) == pytest.approx(float(np.mean(lse2)), rel=1e-5)


def test_aux_free_bias_changes_selection_not_weights_and_moves_toward_balance():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(2, 5, 8), jnp.float32)
    bias = jnp.zeros(8).at[3].set(10.0)  # forces expert 3 into every top-2
    probs, w, ids = select_experts(logits, 2, False, bias)
    assert (np.asarray(ids) == 3).any(-1).all()
    np.testing.assert_allclose(np.asarray(w), np.take_along_axis(np.asarray(probs), np.asarray(ids), -1), rtol=1e-6)
    _, _, ids0 = select_experts(logits, 2, False)
    assert not (np.asarray(ids0) == 3).any(-1).all()
    counts = jnp.asarray([[8.0, 0, 0, 0], [2.0, 2, 2, 2]])
    b = moe_balance.update_bias(jnp.zeros((2, 4)), counts, 0.1)
    np.testing.assert_allclose(np.asarray(b), [[-0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0]], atol=1e-7)


def test_aux_free_bias_balances_a_skewed_router():
    """The loss off, learning rate ~0, only the bias: a router skewed toward expert 0 gets more
    balanced (worst-layer load, mean of the last 10 of 40 steps: measured 2.10 -> 1.43)."""
    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none", router_aux_loss_coef=0.0)
    opt, _ = make_optimizer(OptimConfig(schedule=ScheduleConfig(peak_lr=1e-9, warmup_steps=1)), 40)
    state = init_state(cfg, opt)
    router = state.params["stacks"]["0"]["layer"]["mlp"]["router"]
    state.params["stacks"]["0"]["layer"]["mlp"]["router"] = router.at[..., 0].add(0.3)
    batch = _tiny_batch(B=8, T=32)
    loads = {}
    for rate in (0.0, 0.005):
        s, hist = state, []
        step = jax.jit(make_train_step(cfg, opt, LossConfig(router_bias_rate=rate)))
        for _ in range(40):
            s, m = step(s, batch)
            hist.append(float(np.max(m["expert_load_max"])))
        loads[rate] = np.mean(hist[-10:])
    assert loads[0.005] < 0.8 * loads[0.0], loads


def test_bias_is_checkpointed_resumed_bit_exactly_and_not_exported(data_dir, tmp_path, capsys):
    import orbax.checkpoint as ocp

    from data_pipeline.pipeline import make_dataset
    from data_pipeline.prepare import prepare_builtin
    from qwen3_jax import hf
    from qwen3_jax import checkpoint
    from qwen3_jax.train.loop import train

    parts = prepare_builtin(str(data_dir / "spm512"), "spm", spm_vocab_size=512)
    model = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none")
    tc = TrainConfig(steps=6, seq_len=32, batch_size=4, checkpoint_every=3, micro_batches=2, log_every=1,
                     aux_global_counts="previous_step", router_bias_rate=0.05, async_checkpoint=False,
                     make_data=functools.partial(make_dataset, parts["code"]))
    devices = jax.devices()[:1]
    train(tmp_path / "ref", model, tc, devices=devices)
    train(tmp_path / "cut", model, tc.replace(stop_after=3), devices=devices)
    train(tmp_path / "cut", model, tc, devices=devices)

    def final(w):
        _, flat, step, meta = checkpoint.restore_params_numpy(w)
        moe = ocp.PyTreeCheckpointer().restore(w / "checkpoints" / str(step) / checkpoint.TRAIN_STATE)["moe"]
        return flat, moe, meta

    (pa, ma, meta), (pb, mb, _) = final(tmp_path / "ref"), final(tmp_path / "cut")
    capsys.readouterr()
    assert np.abs(np.asarray(ma["bias"])).sum() > 0 and meta["router_bias"]
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    for k in ma:
        np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]))
    # the Hugging Face export holds the model's tensors only, and says the bias stays behind
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "launch/convert_hf.py", "export", "--checkpoint", str(tmp_path / "ref"),
                        "--out", str(out), "--dtype", "float32"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "routing bias" in r.stdout and "not exported" in r.stdout, r.stdout + r.stderr
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "np") as t:
            names |= set(t.keys())
    assert names and not [n for n in names if "bias" in n]
    assert names == {e.hf for e in hf.tensor_map(model)}


def _record_grads():
    """An 'optimizer' that applies nothing and keeps the step's gradients in its state."""
    import optax

    return optax.GradientTransformation(lambda p: {"g": jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p)},
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), {"g": g}))


def test_micro_batches_give_the_full_batch_gradient_including_balance():
    """The gradients themselves (not parameters after an AdamW step, which are ~lr·sign(g)): one
    pass over 8 rows against 4 strided micro-batches, MoE with the global-batch load-balancing
    loss (f from the exact global counts) and the router z-loss. Equal up to fp32 summation order."""
    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none", router_aux_loss_coef=0.1)
    opt = _record_grads()
    state = init_state(cfg, opt)
    batch = _tiny_batch(B=8, T=16)
    batch["loss_mask"][:, 7] = 0  # a document end in every row
    out = {}
    for n in (1, 4):
        new, m = jax.jit(make_train_step(cfg, opt, LossConfig(router_z_loss=1e-2), micro_batches=n))(state, batch)
        out[n] = (m, flatten(jax.tree.map(np.asarray, new.opt_state["g"])))
    m1, g1 = out[1]
    assert float(m1["aux_loss"]) > 0.5 and float(m1["router_z_loss"]) > 0
    for n in (4,):
        m, g = out[n]
        for k in ("loss", "lm_loss", "aux_loss", "router_z_loss", "grad_norm"):
            assert float(m[k]) == pytest.approx(float(m1[k]), rel=2e-6), (n, k)
        for k, v in g1.items():
            scale = float(np.abs(v).max())
            assert scale > 0, k
            np.testing.assert_allclose(g[k], v, rtol=0, atol=2e-6 * scale, err_msg=f"micro_batches={n}: {k}")
