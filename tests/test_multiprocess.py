"""Two processes x 4 fake CPU devices on localhost (jax.distributed + gloo): per-host batches,
FSDP x EP loss and gradients equal the single-process run, and a checkpoint written by both
processes (orbax multi-process) restores in one process onto a different 8-device mesh."""

import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest

from train_utils import run_pair as _run_pair
from train_utils import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = "@XLA_FLAGS@"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import functools
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from data_pipeline.pipeline import to_global
    from qwen3_jax import sharding
    from qwen3_jax.params import param_specs
    from qwen3_jax.params import nest
    sys.path.insert(0, os.path.dirname(out))
    from mp_common import make_case, loss_fn

    cfg, flat, batch = make_case()
    mesh = sharding.make_mesh(sharding.MeshConfig(ici_fsdp=2, ici_expert=4))
    psh = sharding.param_shardings(param_specs(cfg), mesh)
    B = batch["tokens"].shape[0]
    local = {k: v[pid * B // 2:(pid + 1) * B // 2] for k, v in batch.items()}  # this host's rows
    gbatch = to_global(local, mesh, sharding.batch_sharding(mesh).spec)
    gflat = {k: jax.make_array_from_callback(v.shape, psh[k], lambda idx, v=v: np.asarray(v)[idx])
             for k, v in flat.items()}
    with sharding.use_rules(mesh, moe_exchange="gather"):
        f = jax.jit(jax.value_and_grad(functools.partial(loss_fn, cfg)), out_shardings=(None, psh))
        loss, grads = f(gflat, gbatch)
    grads = multihost_utils.process_allgather(grads, tiled=True)
    if pid == 0:
        np.savez(out + ".npz", loss=np.asarray(loss), **{k.replace("/", "|"): v for k, v in grads.items()})
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(os.path.dirname(out), "ckpt"), nest(gflat))
    ckpt.wait_until_finished()
    print("done", pid, float(loss))
''')

COMMON = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from qwen3_jax.config import get_config
    from qwen3_jax.model import create_model
    from qwen3_jax.model import moe as moe_lib
    from qwen3_jax.params import flat_params, model_from_flat

    def make_case():
        cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="full")
        flat = {k: np.asarray(v) for k, v in flat_params(create_model(cfg, 0)).items()}
        r = np.random.default_rng(0)
        tokens = r.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
        batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
                 "segment_ids": np.ones((8, 16), np.int32),
                 "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()}
        return cfg, flat, batch

    def loss_fn(cfg, flat, batch):
        logits, st = model_from_flat(cfg, flat)(batch["tokens"], batch["positions"], batch["segment_ids"],
                                                return_stats=True)
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        aux = moe_lib.load_balancing_loss(st["counts"], st["prob_sum"], st["tokens"], cfg.num_experts)
        return jnp.mean(lse - tgt) + 0.01 * aux
''')


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_restores_on_other_mesh(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER.replace("@XLA_FLAGS@", xla_flags(4)))
    (tmp_path / "mp_common.py").write_text(COMMON)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs, logs = _run_pair(lambda i, port: [sys.executable, str(tmp_path / "worker.py"), str(i), str(port),
                                             str(tmp_path / "out")], env)
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)

    sys.path.insert(0, str(tmp_path))
    try:
        import functools

        import orbax.checkpoint as ocp

        from mp_common import loss_fn, make_case
        from qwen3_jax import sharding
        from qwen3_jax.params import param_specs
        from qwen3_jax.params import flatten, nest
    finally:
        sys.path.remove(str(tmp_path))
    cfg, flat, batch = make_case()
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, cfg)))(flat, batch)
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(float(got["loss"]), float(ref_loss), rtol=1e-5)
    for k, v in ref_grads.items():
        np.testing.assert_allclose(got[k.replace("/", "|")], np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)

    # restore in this single process onto another mesh (EP=8 instead of FSDP=2 x EP=4)
    mesh = sharding.make_mesh(sharding.MeshConfig(ici_fsdp=1, ici_expert=4, ici_tensor=2))
    specs = param_specs(cfg)
    psh = sharding.param_shardings(specs, mesh)
    target = nest({k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=psh[k]) for k, s in specs.items()})
    restored = flatten(ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target))
    for k, v in flat.items():
        assert restored[k].sharding == psh[k]
        np.testing.assert_array_equal(np.asarray(restored[k]), v)


@pytest.mark.slow
def test_train_two_processes_then_resume_in_one_matches_one_process(data_dir, tmp_path):
    """launch/train.py on 2 processes x 4 devices (jax.distributed on localhost) trains 6 steps and
    checkpoints; 1 process x 8 devices on another mesh resumes to step 12. Loss curve and final
    parameters equal an uninterrupted 1-process run: with data_shards=2 the global batches and the
    saved data position do not depend on the process count."""
    from train_utils import env, run, tiny_args

    from qwen3_jax import checkpoint

    common = ("make_dataset.data_shards=2", "train.eval_every=0")
    args = lambda work, *extra: tiny_args(data_dir, work, *common, *extra, batch=8)  # noqa: E731

    ref = run(args(tmp_path / "ref", "MeshConfig.ici_fsdp=2", "MeshConfig.ici_expert=4"), devices=8)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    work = tmp_path / "mp"
    procs, logs = _run_pair(lambda i, port: [
        sys.executable, *args(work, "MeshConfig.ici_fsdp=2", "MeshConfig.ici_expert=4", "train.stop_after=6"),
        "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)], env(4))
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    assert "on 8 cpu device(s)" in logs[0]
    assert checkpoint.latest_step(work / "checkpoints") == 6
    data_files = sorted(p.name for p in (work / "checkpoints" / "6" / "data").glob("shard_*"))
    assert data_files == ["shard_00000-of-00002.json", "shard_00001-of-00002.json"]  # one per shard, by 2 processes

    r = run(args(work, "MeshConfig.ici_fsdp=4", "MeshConfig.ici_expert=2"), devices=8)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr

    def losses(w):
        rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lm_loss"] for r in rows if "lm_loss" in r}

    want, got = losses(tmp_path / "ref"), losses(work)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)], rtol=1e-5)
    _, ref_params, ref_step, _ = checkpoint.restore_params_numpy(tmp_path / "ref")
    _, params, step, _ = checkpoint.restore_params_numpy(work)
    assert step == ref_step == 12
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=0, atol=2e-5, err_msg=k)


@pytest.mark.slow
def test_context_parallel_run_on_two_hosts_matches_one_process(data_dir, tmp_path):
    """launch/train.py under context parallelism on 2 processes x 4 devices, with a mesh (context 2 x
    expert 4) whose default layout puts each sequence's two halves on different hosts: the mesh keeps
    every context group on one host (each host's pipeline feeds whole rows), and 4 steps give the
    losses of the same mesh in one process."""
    from train_utils import env, run, tiny_args

    mesh = ("MeshConfig.ici_fsdp=1", "MeshConfig.ici_context=2", "MeshConfig.ici_expert=4")
    args = lambda work: tiny_args(data_dir, work, "make_dataset.data_shards=2", "train.eval_every=0", *mesh,  # noqa: E731
                                  batch=8, steps=4, every=4)
    ref = run(args(tmp_path / "ref"), devices=8)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    procs, logs = _run_pair(lambda i, port: [sys.executable, *args(tmp_path / "mp"), "--coordinator",
                                             f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                            env(4))
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    assert "'context': 2" in logs[0]

    def losses(w):
        rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
        return [r["lm_loss"] for r in rows if "lm_loss" in r]

    want, got = losses(tmp_path / "ref"), losses(tmp_path / "mp")
    assert len(want) == 4
    np.testing.assert_allclose(got, want, rtol=1e-5)
