"""Mesh construction and logical axis names → mesh axes.

Mesh axes (outermost first): data, fsdp, context, expert, tensor. Each has an ICI size (inside a slice)
and a DCN size (across slices of a multi-slice job); the mesh axis size is their product and one
ICI (and one DCN) size may be -1, filled with what the devices leave. Axes are Auto (GSPMD).

The model names every parameter dimension (`embed`, `heads`, `experts`, ...) and constrains
activations at block boundaries with `constrain(x, ("batch", "seq", "embed"))`. One table of
rules maps those names to mesh axes; parameters, optimizer state and activations all follow it.
With no rules active (one device, tests) `constrain` is the identity.

Shapes that do not divide: a parameter dimension whose mesh axes do not divide it is an error
raised by `check_shardable` before anything is compiled, except for the names in
`REPLICATE_IF_INDIVISIBLE` (`kv_heads`: 4 KV heads over tensor=8 are replicated across the
tensor axis, as Megatron and MaxText do), which drop the axis and are listed in the report.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", "context"),  # context parallelism: activations' sequence dim (qwen3_jax.model.context_parallel)
    ("vocab", "tensor"),
    # expert weights take "expert" first (experts dim), keeping fsdp here; parameters are also split
    # over `context` (each CP shard holds a slice, as over fsdp), activations' `seq` takes it first
    ("embed", ("fsdp", "context", "expert")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
)
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads"})


# -- mesh ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """ICI and DCN sizes per mesh axis; -1 = what is left (at most one of each kind)."""

    ici_data: int = 1
    ici_fsdp: int = -1
    ici_context: int = 1  # context parallelism: the sequence split over this many devices
    ici_expert: int = 1
    ici_tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_context: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    def ici(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"ici_{a}") for a in MESH_AXES)

    def dcn(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)

    def resolve(self, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ici sizes, dcn sizes) with the -1 filled; errors name the offending sizes."""
        if num_devices % num_slices:
            raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
        return (_fill(self.ici(), num_devices // num_slices, "ici (devices per slice)"),
                _fill(self.dcn(), num_slices, "dcn (slices)"))

    def shape(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
        ici, dcn = self.resolve(num_devices, num_slices)
        return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}


def _fill(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {what} sizes {dict(zip(MESH_AXES, sizes))}: at most one -1 and no zeros")
    known = math.prod(s for s in sizes if s != -1)
    if total % known:
        raise ValueError(f"mesh {what} sizes {dict(zip(MESH_AXES, sizes))} do not divide {total}")
    out = list(sizes)
    if free:
        out[free[0]] = total // known
    elif known != total:
        raise ValueError(f"mesh {what} sizes {dict(zip(MESH_AXES, sizes))} multiply to {known}, not {total}")
    return tuple(out)


def make_mesh(mesh_cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None,
              num_slices: int | None = None) -> jax.sharding.Mesh:
    """A Mesh over `devices` (default: all), ICI axes inside a slice, DCN axes across slices."""

    devices = list(jax.devices() if devices is None else devices)
    if num_slices is None:
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_cfg.resolve(len(devices), num_slices)
    if num_slices > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)
    if _context_spans_processes(arr):
        if num_slices > 1:
            raise ValueError(f"MeshConfig context={arr.shape[_CTX]} over {num_slices} slices puts one sequence on "
                             f"several hosts; each host's data pipeline feeds whole rows of the batch")
        arr = _host_local_context(ici, devices)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


_CTX = MESH_AXES.index("context")


def _context_spans_processes(arr: np.ndarray) -> bool:
    """Whether some sequence's context shards (one row along the `context` axis) sit on several hosts."""
    if arr.shape[_CTX] == 1:
        return False
    rows = np.moveaxis(arr, _CTX, -1).reshape(-1, arr.shape[_CTX])
    return any(len({getattr(d, "process_index", 0) for d in row}) > 1 for row in rows)


def _host_local_context(ici: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """The device array with each context group on one host: a host's data pipeline feeds whole rows
    of the batch, so the devices splitting a sequence must share its host (on a v5p slice, a host's
    4 chips; ICI's topology-aware layout puts them on different hosts). Each host holds `context`
    and, for its other devices, the innermost other axes; hosts are laid out over the rest."""
    hosts = len({d.process_index for d in devices})
    local, c = len(devices) // hosts, ici[_CTX]
    if local % c:
        raise ValueError(f"MeshConfig context={c}: a sequence's devices must share a host (each host's data "
                         f"pipeline feeds whole rows) and a host here has {local} devices; use a context size "
                         f"dividing {local}")
    per_host, left = [1] * len(ici), local // c
    per_host[_CTX] = c
    for axis in ("tensor", "expert", "fsdp", "data"):
        i = MESH_AXES.index(axis)
        per_host[i] = math.gcd(left, ici[i])
        left //= per_host[i]
    if left != 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, ici))}: a host's {local} devices do not split into context={c} "
                         f"and the other axes")
    across = tuple(s // h for s, h in zip(ici, per_host))
    return mesh_utils.create_hybrid_device_mesh(per_host, across, devices, process_is_granule=True,
                                                allow_split_physical_axes=True)


# -- rules ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Context:
    """What the model reads while a step is traced: the mesh, the logical-axis rules and the MoE
    token exchange. The one sharding context; `active()` reads it."""

    mesh: jax.sharding.Mesh
    rules: Mapping[str, Any]
    moe_exchange: str = "auto"  # qwen3_jax.model.moe_ep.EXCHANGES (its resolve_exchange also takes old names)
    capacity_factor: float | None = None  # None: dropless
    zigzag: bool = False  # the batch is in context parallelism's zig-zag order (model/context_parallel.py)

    @property
    def platform(self) -> str:
        """The backend the step is traced for (the mesh's devices: "tpu" in an AOT compile)."""
        return self.mesh.devices.flat[0].platform


_CONTEXT: contextvars.ContextVar[Context | None] = contextvars.ContextVar("qwen3_jax_sharding", default=None)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, *, moe_exchange: str = "auto",
              capacity_factor: float | None = None) -> Iterator[None]:
    """Activates `rules` on `mesh` for `constrain` and expert parallelism traced inside the block.
    `moe_exchange`: one of `qwen3_jax.model.moe_ep.EXCHANGES` (an old name, e.g. 'ragged', is
    accepted with a warning where expert parallelism reads it: `moe_ep.resolve_exchange`)."""
    token = _CONTEXT.set(Context(mesh, dict(rules), moe_exchange, capacity_factor))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def mark_zigzag() -> None:
    """Records, for the rest of the active `use_rules` block, that the traced batch is in zig-zag order."""
    ctx = _CONTEXT.get()
    if ctx is not None:
        _CONTEXT.set(dataclasses.replace(ctx, zigzag=True))  # undone when use_rules resets its token


def active() -> Context | None:
    """The sharding context of the step being traced, or None (one device, no rules)."""
    return _CONTEXT.get()


def expert_parallel() -> Context | None:
    """The active context when its mesh has an `expert` axis > 1 (MoE then uses moe_ep)."""
    ctx = active()
    if ctx is None or ctx.mesh.shape.get("expert", 1) == 1:
        return None
    return ctx


def mesh_axes_for(name: str | None, rules=DEFAULT_RULES, mesh=None) -> tuple[str, ...]:
    table = dict(rules)
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
        names = tuple(m for m in names if m in mesh.shape and mesh.shape[m] > 1)
    return names


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES, mesh: jax.sharding.Mesh | None = None,
                    shape: Sequence[int] | None = None, fallbacks: list | None = None) -> P:
    """PartitionSpec for logical `axes`; mesh axes of size 1 or absent from `mesh` are dropped,
    and a mesh axis is used at most once (the first dimension that asks for it wins).

    With `shape`: a dimension its mesh axes do not divide keeps the longest prefix of them that
    divides it, and `(dim, name, dropped axes)` is appended to `fallbacks`."""
    used: set[str] = set()
    spec = []
    for d, name in enumerate(axes):
        keep = [m for m in mesh_axes_for(name, rules, mesh) if m not in used]
        if shape is not None and mesh is not None:
            while keep and shape[d] % math.prod(mesh.shape[m] for m in keep):
                if fallbacks is not None:
                    fallbacks.append((d, name, keep[-1]))
                keep.pop()
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*spec)


def constrain(x, axes: Sequence[str | None]):
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    spec = logical_to_spec(axes, ctx.rules, ctx.mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


# -- parameters and train state -----------------------------------------------------------------------

def check_shardable(specs: Mapping[str, Any], mesh, rules=DEFAULT_RULES) -> list[str]:
    """Raises ValueError listing every parameter dimension the mesh cannot split, except the
    `REPLICATE_IF_INDIVISIBLE` names, whose fallbacks are returned as readable lines."""
    errors, notes = [], []
    for path, spec in specs.items():
        fb: list = []
        logical_to_spec(spec.axes, rules, mesh, spec.shape, fb)
        for d, name, axis in fb:
            line = (f"{path} dim {d} ({name}={spec.shape[d]}) is not divisible by mesh axis "
                    f"{axis}={mesh.shape[axis]}")
            (notes if name in REPLICATE_IF_INDIVISIBLE else errors).append(line)
    if errors:
        raise ValueError("parameters do not divide over the mesh " + str(dict(mesh.shape)) + ":\n  "
                         + "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else ""))
    return sorted({re.sub(r"stacks/\d+/", "stacks/*/", n) for n in notes})


def param_shardings(specs: Mapping[str, Any], mesh, rules=DEFAULT_RULES) -> dict[str, NamedSharding]:
    """'/'-path -> NamedSharding for `qwen3_jax.params.param_specs(cfg)`."""
    check_shardable(specs, mesh, rules)
    return {k: NamedSharding(mesh, logical_to_spec(s.axes, rules, mesh, s.shape)) for k, s in specs.items()}


def tree_shardings(tree, specs: Mapping[str, Any], mesh, rules=DEFAULT_RULES):
    """Shardings for any pytree holding parameter-shaped leaves (params, Adam moments, ...).

    A leaf whose trailing dict keys spell a parameter path and whose shape equals that
    parameter's shape follows the parameter's sharding; every other leaf (step counters,
    scalars, RNG keys) is replicated."""
    by_path = param_shardings(specs, mesh, rules)
    rep = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
        shape = tuple(getattr(leaf, "shape", ()))
        for i in range(len(keys)):
            key = "/".join(keys[i:])
            if key in by_path and tuple(specs[key].shape) == shape:
                return by_path[key]
        return rep

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """[B, T] batch arrays: B over the `batch` mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules, mesh))


def batch_shards(mesh, rules=DEFAULT_RULES) -> int:
    return math.prod(mesh.shape[m] for m in mesh_axes_for("batch", rules, mesh))


def check_batch(global_batch: int, micro_batches: int, mesh, rules=DEFAULT_RULES) -> None:
    n = batch_shards(mesh, rules)
    if global_batch % micro_batches or (global_batch // micro_batches) % n:
        raise ValueError(f"global batch {global_batch} / micro_batches {micro_batches} is not divisible by the "
                         f"{n} batch shards of mesh {dict(mesh.shape)}")
