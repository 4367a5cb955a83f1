"""Mesh construction, logical rules, shardability checks and state shardings (8 fake CPU devices)."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from qwen3_jax import sharding
from qwen3_jax.config import get_config
from qwen3_jax.params import param_specs
from qwen3_jax.sharding import MeshConfig
from train_utils import xla_flags


def test_mesh_config_fills_minus_one():
    assert MeshConfig().shape(8) == {"data": 1, "fsdp": 8, "context": 1, "expert": 1, "tensor": 1}
    assert MeshConfig(ici_expert=4).shape(8) == {"data": 1, "fsdp": 2, "context": 1, "expert": 4, "tensor": 1}
    assert MeshConfig(ici_fsdp=-1, dcn_data=-1).shape(16, num_slices=2) == {"data": 2, "fsdp": 8, "context": 1, "expert": 1,
                                                                            "tensor": 1}
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(ici_fsdp=-1, ici_tensor=-1).shape(8)
    with pytest.raises(ValueError, match="do not divide"):
        MeshConfig(ici_tensor=3).shape(8)
    with pytest.raises(ValueError, match="multiply to"):
        MeshConfig(ici_fsdp=2).shape(8)


def test_make_mesh_axes_are_auto():
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=2, ici_expert=2, ici_tensor=2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 1, "expert": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec_drops_size_one_and_reused_axes():
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=4, ici_tensor=2))
    assert sharding.logical_to_spec(("batch", "seq", "embed"), mesh=mesh) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh) == P("fsdp", "tensor", None)
    assert sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp"), mesh=mesh) == \
        P(None, None, "fsdp", "tensor")
    # under fsdp x expert, non-expert weights use both axes; expert weights give "expert" to the experts dim
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=2, ici_expert=4))
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh) == P(("fsdp", "expert"), None, None)
    assert sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp"), mesh=mesh) == \
        P(None, "expert", "fsdp", None)


def test_indivisible_kv_heads_fall_back_to_replication_other_dims_raise():
    cfg = get_config("tiny-moe")  # kv_heads = 2, heads = 4, experts = 8
    specs = param_specs(cfg)
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=1, ici_tensor=4, ici_expert=2))
    notes = sharding.check_shardable(specs, mesh)
    assert notes and all("kv_heads" in n for n in notes)
    shs = sharding.param_shardings(specs, mesh)
    k_proj = next(k for k in specs if k.endswith("attn/k_proj"))
    assert shs[k_proj].spec == P(None, "expert", None, None)  # layers, embed (fsdp=1 x expert), kv_heads (replicated), head_dim
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=1, ici_tensor=8))
    with pytest.raises(ValueError, match="heads=4\\) is not divisible by mesh axis tensor=8"):
        sharding.check_shardable(specs, mesh)


def test_optimizer_state_follows_params():
    from qwen3_jax.params import nest

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


@pytest.mark.parametrize("mesh_kw,rules,B", [
    ({"ici_fsdp": 8}, sharding.DEFAULT_RULES, 8),
    ({"ici_fsdp": 2, "ici_expert": 4}, sharding.DEFAULT_RULES, 8),
    # 4 rows split over fsdp only while D is over (fsdp, expert): not a whole-block layout, GSPMD's take
    ({"ici_fsdp": 2, "ici_expert": 4}, sharding.DEFAULT_RULES, 4),
    ({"ici_fsdp": 4, "ici_tensor": 2}, sharding.DEFAULT_RULES, 8),  # vocab over tensor: masked + psum
    ({"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2}, sharding.DEFAULT_RULES, 8),
    # vocab on a batch axis (psum_scatter path), embed on tensor (output stays D-sharded)
    ({"ici_fsdp": 4, "ici_tensor": 2}, (("batch", ("data", "fsdp")), ("vocab", "fsdp"), ("embed", "tensor")), 8),
])
def test_embed_lookup_sharded_equals_take(mesh_kw, rules, B):
    """The shard_map lookup gives jnp.take's rows and table gradient (a gather moves values; only
    the scatter-add's summation order for repeated tokens may differ)."""
    import jax.numpy as jnp

    from qwen3_jax.model.layers import embed_lookup

    V, D, T = 64, 16, 4
    mesh = sharding.make_mesh(MeshConfig(**{"ici_fsdp": 1, **mesh_kw}))
    table = jax.random.normal(jax.random.key(0), (V, D), jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V).at[0, :].set(5)  # repeated rows too
    cot = jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)

    def loss(tab, tok):
        return jnp.sum(embed_lookup(tab, tok, jnp.float32) * cot)

    want_rows = jnp.take(table, tokens, axis=0)
    want_grad = jax.grad(loss)(table, tokens)
    t_sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("vocab", "embed"), rules, mesh, (V, D)))
    x_sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), rules, mesh, (B, T)))
    with sharding.use_rules(mesh, rules):
        rows = jax.jit(lambda a, b: embed_lookup(a, b, jnp.float32), in_shardings=(t_sh, x_sh))(table, tokens)
        grad_fn = jax.jit(jax.grad(loss), in_shardings=(t_sh, x_sh), out_shardings=t_sh)
        grad = grad_fn(table, tokens)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(want_rows))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-6)


_EMBED_GRAD = """
import jax, jax.numpy as jnp
from qwen3_jax import sharding
from qwen3_jax.model.layers import embed_lookup
mesh = sharding.make_mesh(sharding.MeshConfig(ici_fsdp=2, ici_expert=4))
t_sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("vocab", "embed"), mesh=mesh))
def loss(tab, tok):
    x = sharding.constrain(embed_lookup(tab, tok, jnp.bfloat16), ("batch", "seq", "embed"))
    return jnp.sum(x.astype(jnp.float32) ** 2)
with sharding.use_rules(mesh):
    jax.jit(jax.grad(loss), in_shardings=(t_sh, sharding.batch_sharding(mesh)), out_shardings=t_sh).lower(
        jax.ShapeDtypeStruct((64, 16), jnp.float32), jax.ShapeDtypeStruct((8, 4), jnp.int32)).compile()
print("compiled")
"""


def test_embed_lookup_compiles_without_full_rematerialization():
    """fsdp x expert: with jnp.take, GSPMD cannot move the rows' cotangent from the batch layout to
    the table's D layout and logs "Involuntary full rematerialization" (replicates it in full)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _EMBED_GRAD], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "compiled" in r.stdout, r.stderr[-2000:]
    assert "Involuntary full rematerialization" not in r.stderr, r.stderr[-2000:]
