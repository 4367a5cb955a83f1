"""Logical axis names → mesh axes.

The model names every parameter dimension (`embed`, `heads`, `experts`, ...) and constrains
activations at block boundaries with `constrain(x, ("batch", "seq", "embed"))`. One table of
rules maps those names to mesh axes; with no rules active (one device, tests) `constrain` is
the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("qwen3_jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Activates `rules` on `mesh` for `constrain` calls traced inside the block."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES, mesh: jax.sharding.Mesh | None = None) -> P:
    """PartitionSpec for logical `axes`; mesh axes of size 1 or absent from `mesh` are dropped,
    and a mesh axis is used at most once (the first dimension that asks for it wins)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for m in names:
            if m in used or (mesh is not None and (m not in mesh.shape or mesh.shape[m] == 1)):
                continue
            keep.append(m)
            used.add(m)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*spec)


def constrain(x, axes: Sequence[str | None]):
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))
