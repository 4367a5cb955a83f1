"""Hugging Face interop: `config.json` ↔ ModelConfig, and the one tensor mapping table.

Our parameters are a flat dict `path -> array` with '/'-joined paths, e.g.
`stacks/0/layer/attn/q_proj` of shape [layers, D, N, H]. `tensor_map(cfg)` lists every Hugging
Face tensor with the slice of our parameter it fills and how its layout differs; import and
export both read that one table. Conversion streams tensor by tensor: reading fills
preallocated arrays (one copy of the model), writing converts one tensor at a time into
size-bounded shards.

Folders may be local or on an object store (`gs://`, through `qwen3_jax.storage`): config.json is
read where it lies; safetensors files are read from local files, so a remote folder is staged into
a local temporary folder first (`read_hf_params` does it; `SafetensorsFolder` takes a local folder).
An export to an object store is built locally and uploaded with `config.json` written last: a
folder without config.json is not a Hugging Face folder (`read_config` refuses it), so a reader
never takes a half-uploaded export for a whole one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3_jax import storage
from qwen3_jax.config import ModelConfig, RopeScaling
from qwen3_jax.errors import HFConversionError
from qwen3_jax.fileio import atomic_dir
from qwen3_jax.hf_tokenizer import TokenizerExport, default_token_ids, plan_tokenizer_export
from qwen3_jax.params import flat_params, model_from_flat, param_specs

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
COMPLETE_MARKER = "config.json"  # written last into an object store: its presence means the export is whole
# What an export writes (an --overwrite replaces these names, and keeps every other file of the folder).
_EXPORT_NAMES = re.compile(r"config\.json|generation_config\.json|model\.safetensors\.index\.json|.*\.safetensors"
                           r"|tokenizer.*|vocab\.json|merges\.txt|special_tokens_map\.json|added_tokens\.json"
                           r"|chat_template\.jinja|spm\.model")
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}


def np_dtype(name: str) -> np.dtype:
    if name not in _NP_DTYPES:
        raise HFConversionError(f"dtype {name!r} is not one of {sorted(_NP_DTYPES)}")
    return _NP_DTYPES[name]


# -- config.json ----------------------------------------------------------------------------------

def to_hf_config(cfg: ModelConfig, dtype: str = "bfloat16", token_ids: dict[str, int | None] | None = None
                 ) -> dict[str, Any]:
    """config.json for `cfg`; `token_ids` (bos/eos/pad_token_id) from the exported tokenizer (see hf_tokenizer)."""

    model_type = "qwen3_moe" if cfg.is_moe else "qwen3"
    rope: dict[str, Any] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    if cfg.rope_scaling is not None:
        ys = cfg.rope_scaling
        rope.update(rope_type="yarn", factor=ys.factor,
                    original_max_position_embeddings=ys.original_max_position_embeddings,
                    beta_fast=ys.beta_fast, beta_slow=ys.beta_slow, truncate=ys.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(ys, key) is not None:
                rope[key] = getattr(ys, key)
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
        **(token_ids or default_token_ids(cfg.vocab_size)),
        "dtype": dtype,
    }
    if cfg.is_moe:
        d.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_ffn_dim, norm_topk_prob=cfg.norm_topk_prob,
                 decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                 router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    else:
        d.update(layer_types=["full_attention"] * cfg.num_layers, max_window_layers=cfg.num_layers)
    return d


def from_hf_config(d: dict[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
    """ModelConfig from a transformers 4.x or 5.x Qwen3 / Qwen3-MoE config dict."""
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFConversionError(f"{source}: model_type={model_type!r} is not supported "
                                f"(expected one of {sorted(ARCHITECTURES)})")
    if d.get("use_sliding_window"):
        raise HFConversionError(f"{source}: use_sliding_window=true is not supported (Qwen3 pretraining "
                                f"uses full attention)")
    if d.get("attention_bias"):
        raise HFConversionError(f"{source}: attention_bias=true is not supported (Qwen3 has no QKV bias)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise HFConversionError(f"{source}: hidden_act={act!r} is not supported (expected 'silu')")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in d:
            raise HFConversionError(f"{source}: missing key {key!r}")
    rope = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    rope = {**legacy, **rope}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "yarn":
        if rope.get("factor") is None:
            raise HFConversionError(f"{source}: rope_type 'yarn' needs 'factor'")
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                                 or d.get("max_position_embeddings", 32768)),
            attention_factor=rope.get("attention_factor"),
            beta_fast=float(rope.get("beta_fast") or 32.0),
            beta_slow=float(rope.get("beta_slow") or 1.0),
            mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
            truncate=bool(rope.get("truncate", True)))
    elif rope_type != "default":
        raise HFConversionError(f"{source}: rope type {rope_type!r} is not supported "
                                f"(supported: 'default', 'yarn')")
    kw: dict[str, Any] = dict(
        name=d.get("_name_or_path") or model_type,
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        ffn_dim=d["intermediate_size"], tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 40960),
        rms_eps=d.get("rms_norm_eps", 1e-6), initializer_range=d.get("initializer_range", 0.02))
    if model_type == "qwen3_moe":
        experts = d.get("num_local_experts", d.get("num_experts"))
        if not experts:
            raise HFConversionError(f"{source}: qwen3_moe config has no 'num_local_experts' / 'num_experts'")
        kw.update(num_experts=experts, num_experts_per_tok=d.get("num_experts_per_tok", 8),
                  moe_ffn_dim=d.get("moe_intermediate_size", 768),
                  norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                  decoder_sparse_step=d.get("decoder_sparse_step", 1),
                  mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
                  router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise HFConversionError(f"{source}: {e}") from None


# -- the mapping table ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """HF tensor `hf` (shape `hf_shape`) ↔ `ours[index]` under `layout`.

    layout: "same" (identical), "T" (transposed 2-D), "in_heads" (HF [heads*H, D] ↔ ours [D, heads, H]),
    "out_heads" (HF [D, N*H] ↔ ours [N, H, D]), "experts_T" (HF [E, a, b] ↔ ours [E, b, a]),
    "gate_up" (HF fused [E, 2F, D] ↔ ours gate and up [E, D, F]: `ours` names both, comma-joined).
    """

    hf: str
    hf_shape: tuple[int, ...]
    ours: str
    index: tuple[int, ...]
    layout: str
    head_dim: int = 0


def tensor_map(cfg: ModelConfig, fused_experts: bool = False) -> list[Entry]:
    D, N, K, H, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    out = [Entry("model.embed_tokens.weight", (V, D), "embed/embedding", (), "same"),
           Entry("model.norm.weight", (D,), "final_norm/scale", (), "same")]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", (V, D), "lm_head", (), "T"))
    for r, (moe, first, count) in enumerate(cfg.layer_runs()):
        s = f"stacks/{r}/layer"
        for j in range(count):
            p, i = f"model.layers.{first + j}", (j,)
            out += [
                Entry(f"{p}.input_layernorm.weight", (D,), f"{s}/input_norm/scale", i, "same"),
                Entry(f"{p}.post_attention_layernorm.weight", (D,), f"{s}/post_attn_norm/scale", i, "same"),
                Entry(f"{p}.self_attn.q_proj.weight", (N * H, D), f"{s}/attn/q_proj", i, "in_heads", H),
                Entry(f"{p}.self_attn.k_proj.weight", (K * H, D), f"{s}/attn/k_proj", i, "in_heads", H),
                Entry(f"{p}.self_attn.v_proj.weight", (K * H, D), f"{s}/attn/v_proj", i, "in_heads", H),
                Entry(f"{p}.self_attn.o_proj.weight", (D, N * H), f"{s}/attn/o_proj", i, "out_heads", H),
                Entry(f"{p}.self_attn.q_norm.weight", (H,), f"{s}/attn/q_norm/scale", i, "same"),
                Entry(f"{p}.self_attn.k_norm.weight", (H,), f"{s}/attn/k_norm/scale", i, "same"),
            ]
            if not moe:
                F = cfg.ffn_dim
                out += [Entry(f"{p}.mlp.gate_proj.weight", (F, D), f"{s}/mlp/gate", i, "T"),
                        Entry(f"{p}.mlp.up_proj.weight", (F, D), f"{s}/mlp/up", i, "T"),
                        Entry(f"{p}.mlp.down_proj.weight", (D, F), f"{s}/mlp/down", i, "T")]
                continue
            E, F = cfg.num_experts, cfg.moe_ffn_dim
            out.append(Entry(f"{p}.mlp.gate.weight", (E, D), f"{s}/mlp/router", i, "T"))
            if fused_experts:
                out += [Entry(f"{p}.mlp.experts.gate_up_proj", (E, 2 * F, D), f"{s}/mlp/gate,{s}/mlp/up", i,
                              "gate_up"),
                        Entry(f"{p}.mlp.experts.down_proj", (E, D, F), f"{s}/mlp/down", i, "experts_T")]
                continue
            for e in range(E):
                q = f"{p}.mlp.experts.{e}"
                out += [Entry(f"{q}.gate_proj.weight", (F, D), f"{s}/mlp/gate", i + (e,), "T"),
                        Entry(f"{q}.up_proj.weight", (F, D), f"{s}/mlp/up", i + (e,), "T"),
                        Entry(f"{q}.down_proj.weight", (D, F), f"{s}/mlp/down", i + (e,), "T")]
    return out


def to_ours(entry: Entry, x: np.ndarray) -> list[np.ndarray]:
    """The HF tensor in our layout (one array per name in `entry.ours`)."""
    if entry.layout == "same":
        return [x]
    if entry.layout == "T":
        return [x.T]
    if entry.layout == "in_heads":  # [n*H, D] -> [D, n, H]
        return [x.T.reshape(x.shape[1], -1, entry.head_dim)]
    if entry.layout == "out_heads":  # [D, N*H] -> [N, H, D]
        return [x.T.reshape(-1, entry.head_dim, x.shape[0])]
    if entry.layout == "experts_T":
        return [x.transpose(0, 2, 1)]
    if entry.layout == "gate_up":
        F = x.shape[1] // 2
        return [x[:, :F].transpose(0, 2, 1), x[:, F:].transpose(0, 2, 1)]
    raise AssertionError(entry.layout)


def to_hf(entry: Entry, parts: list[np.ndarray]) -> np.ndarray:
    """Our slice(s) in the HF layout (the inverse of `to_ours`)."""
    x = parts[0]
    if entry.layout == "same":
        return x
    if entry.layout == "T":
        return x.T
    if entry.layout == "in_heads":  # [D, n, H] -> [n*H, D]
        return x.reshape(x.shape[0], -1).T
    if entry.layout == "out_heads":  # [N, H, D] -> [D, N*H]
        return x.reshape(-1, x.shape[-1]).T
    if entry.layout == "experts_T":
        return x.transpose(0, 2, 1)
    if entry.layout == "gate_up":
        return np.concatenate([parts[0].transpose(0, 2, 1), parts[1].transpose(0, 2, 1)], axis=1)
    raise AssertionError(entry.layout)


# -- reading and writing folders ------------------------------------------------------------------

class SafetensorsFolder:
    """The tensors of a local Hugging Face folder (single file or sharded with an index), read lazily
    (a remote folder: pass its `storage.staged` copy).

    Every failure (an unreadable or truncated file, a header that does not parse, a tensor the index
    places in a file that lacks it) is an HFConversionError naming the file and the tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFConversionError(f"{index}: not a safetensors index (no valid 'weight_map': "
                                        f"{type(e).__name__} {e})") from None
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).exists():
                    raise HFConversionError(f"{self.path / f}: listed in {index.name} but missing")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise HFConversionError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = {}
            for f in files:
                with self._open(f) as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map

    def _open(self, path: Path):
        try:
            return safe_open(path, "np")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError
            raise HFConversionError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                                    f"corrupted: download or export it again") from None

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _by_file(self, names: list[str]) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        return by_file

    def shapes(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """The shapes of `names` from the file headers alone (no data read)."""
        out = {}
        for fname, group in self._by_file(names).items():
            path = self.path / fname
            with self._open(path) as h:
                present = set(h.keys())
                for n in group:
                    if n not in present:
                        raise HFConversionError(f"{path}: has no tensor {n}, which model.safetensors.index.json "
                                                f"places there (the index and the shard disagree)")
                    out[n] = tuple(h.get_slice(n).get_shape())
        return out

    def read(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, array) one tensor at a time, opening each file once."""
        for fname, group in self._by_file(names).items():
            path = self.path / fname
            with self._open(path) as h:
                for n in group:
                    try:
                        x = h.get_tensor(n)
                    except Exception as e:  # noqa: BLE001
                        raise HFConversionError(f"{path}: tensor {n} does not read ({e}); the file is truncated "
                                                f"or corrupted: download or export it again") from None
                    yield n, x

    def dtype(self) -> str:
        name = next(iter(self.weight_map))
        with self._open(self.path / self.weight_map[name]) as h:
            kind = str(h.get_slice(name).get_dtype())
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(kind, "float32")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face folder's config.json (local or remote); HFConversionError when absent or not JSON."""
    f = storage.path(path) / "config.json"
    if not f.exists():
        raise HFConversionError(f"{f}: not found (is {path} a Hugging Face model folder?)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{f}: not valid JSON ({e})") from None


def check_hf_params(path: str | os.PathLike, cfg: ModelConfig) -> tuple[SafetensorsFolder, list[Entry]]:
    """Every tensor `cfg` needs is present with its shape, read from the headers only (no data)."""
    folder = SafetensorsFolder(path)
    present = folder.names()
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in present)
    table = tensor_map(cfg, fused_experts=fused)
    expected = {e.hf for e in table}
    missing = [e.hf for e in table if e.hf not in present]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise HFConversionError(f"{path}: missing tensor(s) {missing[:5]}{more}")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(present - expected - ignorable)
    if unexpected:
        raise HFConversionError(f"{path}: unexpected tensor(s) {unexpected[:5]} for this config.json")
    shapes = folder.shapes([e.hf for e in table])
    for e in table:
        if shapes[e.hf] != e.hf_shape:
            raise HFConversionError(f"{path}: tensor {e.hf} has shape {shapes[e.hf]}, expected {e.hf_shape} "
                                    f"from config.json")
    return folder, table


def read_hf_params(path: str | os.PathLike, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Our flat parameters from the folder's safetensors, filled tensor by tensor into one copy (a
    remote folder is staged into a local temporary folder while it is read)."""
    with storage.staged(path) as local:
        return _read_local_hf_params(local, cfg, dtype)


def _read_local_hf_params(path: os.PathLike, cfg: ModelConfig, dtype: str) -> dict[str, np.ndarray]:

    folder, table = check_hf_params(path, cfg)
    target = np_dtype(dtype)
    out = {k: np.empty(s.shape, target) for k, s in param_specs(cfg).items()}
    entries = {e.hf: e for e in table}
    for name, x in folder.read([e.hf for e in table]):
        e = entries[name]
        if tuple(x.shape) != e.hf_shape:
            raise HFConversionError(f"{path}: tensor {name} has shape {tuple(x.shape)}, expected {e.hf_shape} "
                                    f"from config.json")
        for ours, part in zip(e.ours.split(","), to_ours(e, x)):
            out[ours][e.index] = part
    return out


def write_hf_params(flat: dict[str, Any], cfg: ModelConfig, out_dir: str | os.PathLike, dtype: str = "bfloat16",
                    max_shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """Writes `model-XXXXX-of-YYYYY.safetensors` shards (per-expert hub layout) and their index."""
    out_dir = Path(out_dir)
    target = np_dtype(dtype)
    table = tensor_map(cfg)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in table:
        nbytes = int(np.prod(e.hf_shape)) * target.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for e in entries:
            parts = [np.asarray(flat[name][e.index]) for name in e.ours.split(",")]
            tensors[e.hf] = np.ascontiguousarray(to_hf(e, parts).astype(target))
            weight_map[e.hf] = fname
            total += tensors[e.hf].nbytes
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return index


def export_owns(name: str) -> bool:
    """Whether a top-level name in an export folder is one an export writes (and --overwrite replaces)."""
    return _EXPORT_NAMES.fullmatch(name) is not None


def write_hf_folder(flat: dict[str, Any], cfg: ModelConfig, path: str | os.PathLike, *, dtype: str = "bfloat16",
                    tokenizer=None, overwrite: bool = False, max_shard_bytes: int = 2 << 30) -> os.PathLike:
    """A complete Hugging Face folder (weights, config, generation config, tokenizer), written atomically.

    `tokenizer`: None, anything `hf_tokenizer.plan_tokenizer_export` takes ('qwen3', a folder, a
    tokenizer.json, a sentencepiece .model) or its result; it is checked before anything is written,
    and its eos / pad / bos ids go into config.json and generation_config.json. An existing folder
    needs `overwrite`, which replaces the files an export writes and keeps any others. `path` may be
    remote: the folder is built locally and uploaded, config.json last (`COMPLETE_MARKER`)."""

    np_dtype(dtype)
    if tokenizer is not None and not isinstance(tokenizer, TokenizerExport):
        tokenizer = plan_tokenizer_export(tokenizer, cfg.vocab_size, cfg.max_position_embeddings)
    hf_cfg = to_hf_config(cfg, dtype=dtype, token_ids=tokenizer.token_ids() if tokenizer else None)
    with atomic_dir(path, overwrite=overwrite, owned=export_owns, keep_others=True, last=COMPLETE_MARKER) as tmp:
        write_hf_params(flat, cfg, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2))
        if tokenizer is not None:
            tokenizer.write(tmp)
    return storage.path(path)


def load_hf(path: str | os.PathLike, dtype: str | None = None, **overrides: Any):
    """A `Qwen3` model from a Hugging Face folder; parameters and compute in `dtype` (default fp32)."""

    dtype = dtype or "float32"
    overrides = {"param_dtype": dtype, "compute_dtype": dtype, **overrides}
    cfg = from_hf_config(read_config(path), source=str(storage.path(path) / "config.json"), **overrides)
    return model_from_flat(cfg, read_hf_params(path, cfg, dtype=cfg.param_dtype))


def save_hf(model, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
            dtype: str | None = None, overwrite: bool = False, max_shard_bytes: int = 2 << 30) -> os.PathLike:
    """Writes `model` as a Hugging Face folder that transformers loads (`Qwen3[Moe]ForCausalLM`)."""

    return write_hf_folder(flat_params(model), model.cfg, path, dtype=dtype or model.cfg.param_dtype,
                           tokenizer=tokenizer, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
