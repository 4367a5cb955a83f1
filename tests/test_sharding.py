"""Mesh construction, logical rules, shardability checks and state shardings (8 fake CPU devices)."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from qwen3_jax import sharding
from qwen3_jax.config import get_config
from qwen3_jax.params import param_specs
from qwen3_jax.sharding import MeshConfig


def test_mesh_config_fills_minus_one():
    assert MeshConfig().shape(8) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert MeshConfig(ici_expert=4).shape(8) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert MeshConfig(ici_fsdp=-1, dcn_data=-1).shape(16, num_slices=2) == {"data": 2, "fsdp": 8, "expert": 1,
                                                                            "tensor": 1}
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(ici_fsdp=-1, ici_tensor=-1).shape(8)
    with pytest.raises(ValueError, match="do not divide"):
        MeshConfig(ici_tensor=3).shape(8)
    with pytest.raises(ValueError, match="multiply to"):
        MeshConfig(ici_fsdp=2).shape(8)


def test_make_mesh_axes_are_auto():
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=2, ici_expert=2, ici_tensor=2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec_drops_size_one_and_reused_axes():
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=4, ici_tensor=2))
    assert sharding.logical_to_spec(("batch", "seq", "embed"), mesh=mesh) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh) == P("fsdp", "tensor", None)
    assert sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp"), mesh=mesh) == \
        P(None, None, "fsdp", "tensor")


def test_indivisible_kv_heads_fall_back_to_replication_other_dims_raise():
    cfg = get_config("tiny-moe")  # kv_heads = 2, heads = 4, experts = 8
    specs = param_specs(cfg)
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=1, ici_tensor=4, ici_expert=2))
    notes = sharding.check_shardable(specs, mesh)
    assert notes and all("kv_heads" in n for n in notes)
    shs = sharding.param_shardings(specs, mesh)
    k_proj = next(k for k in specs if k.endswith("attn/k_proj"))
    assert shs[k_proj].spec == P(None, None, None, None)  # layers, embed(fsdp=1), kv_heads (replicated), head_dim
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=1, ici_tensor=8))
    with pytest.raises(ValueError, match="heads=4\\) is not divisible by mesh axis tensor=8"):
        sharding.check_shardable(specs, mesh)


def test_optimizer_state_follows_params():
    from qwen3_jax.train.checkpoint import nest

    cfg = get_config("tiny-moe")
    specs = param_specs(cfg)
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=2, ici_expert=4))
    params = nest({k: jax.ShapeDtypeStruct(s.shape, s.dtype) for k, s in specs.items()})
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    tree = {"params": params, "opt": jax.eval_shape(opt.init, params)}
    shs = sharding.tree_shardings(tree, specs, mesh)
    gate = next(k for k in specs if k.endswith("mlp/gate"))
    want = sharding.param_shardings(specs, mesh)[gate].spec
    assert want == P(None, "expert", "fsdp", None)
    leaves = jax.tree_util.tree_leaves_with_path(shs)
    gates = [s for path, s in leaves if "/".join(str(getattr(p, "key", "")) for p in path).endswith("mlp/gate")]
    assert len(gates) == 3 and all(s.spec == want for s in gates)  # param, mu, nu
    counts = [s for path, s in leaves if str(getattr(path[-1], "name", "")) == "count"]
    assert counts and all(s.spec == P() for s in counts)


def test_check_batch():
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=2, ici_expert=2, ici_tensor=2))
    sharding.check_batch(8, 2, mesh)
    with pytest.raises(ValueError, match="4 batch shards"):
        sharding.check_batch(8, 4, mesh)


def test_constrain_is_identity_without_rules():
    x = np.ones((2, 3))
    assert sharding.constrain(x, ("batch", "embed")) is x
