"""The teacher of a distillation run: where it comes from, its config, its parameters on the mesh,
and its forward pass inside the train step.

`train.teacher` names a Hugging Face folder (config.json + safetensors), a training workdir, a
checkpoint root or one step folder; any Qwen3 preset, dense or MoE, whose vocabulary has exactly
the student's rows (checked from its config alone, before anything is built or compiled; the
error names both sizes). The losses are `qwen3_jax.train.kd_loss` (train.kd_alpha,
kd_temperature, kd_topk, kd_divergence).

The teacher runs in the student's compute dtype, its parameters stored in that dtype too (a bf16
run holds a bf16 teacher), placed by the same logical-axis rules as the student's parameters. They
are loaded once and passed to the jitted step as its third argument: they are not part of
TrainState, get no optimizer state and are never written to the student's checkpoint, whose meta
records which teacher it used (`meta["teacher"]`). The step never differentiates them, and the
teacher's forward runs under `stop_gradient`.

Implementation choices the teacher takes from the student (they do not change its function):
attention_impl and attention_block (resolved for the same mesh), scan_layers; remat is "none"
(there is no teacher backward pass). An aux-loss-free routing bias a MoE teacher trained with is
not applied (the router's own top-k is used).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen3_jax import checkpoint as ckpt
from qwen3_jax import hf, sharding, storage
from qwen3_jax.config import ModelConfig
from qwen3_jax.errors import TrainingError
from qwen3_jax.params import flatten, model_from_flat, nest, param_specs
from qwen3_jax.train import kd_loss


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    path: str  # absolute
    kind: str  # "hf" or "checkpoint"
    step: int | None  # checkpoint step (None for a Hugging Face folder)
    config: ModelConfig  # as stored (its own dtypes)

    def meta(self) -> dict[str, Any]:
        """What the student's checkpoint meta records about its teacher."""
        return {"path": self.path, "kind": self.kind, "step": self.step, "model": self.config.name,
                "vocab_size": self.config.vocab_size, "num_layers": self.config.num_layers,
                "d_model": self.config.d_model, "num_experts": self.config.num_experts}


def find_teacher(path: str | os.PathLike) -> TeacherSource:
    """Reads only the teacher's config: a Hugging Face folder (config.json) or our checkpoint, local
    or on a bucket (`gs://`)."""

    p = storage.path(path)
    if not p.exists():
        raise TrainingError(f"train.teacher={str(path)!r}: no such file or folder")
    if (p / "config.json").is_file() and not (p / "checkpoints").is_dir():

        try:
            cfg = hf.from_hf_config(hf.read_config(p), source=str(p / "config.json"))
        except ValueError as e:
            raise TrainingError(f"train.teacher={str(path)!r}: {e}") from None
        return TeacherSource(str(p), "hf", None, cfg)
    try:
        root, step = ckpt.checkpoint_root(p)
        step = step if step is not None else ckpt.latest_step(root)
    except FileNotFoundError as e:
        raise TrainingError(f"train.teacher={str(path)!r}: neither a Hugging Face folder (config.json) nor a "
                            f"checkpoint ({e})") from None
    if step is None:
        raise TrainingError(f"train.teacher={str(path)!r}: {root} holds no complete checkpoint")
    return TeacherSource(str(storage.path(root) / str(step)), "checkpoint", step,
                         ckpt.read_model_config(root, step))


def teacher_config(source: TeacherSource, student: ModelConfig, seq_len: int) -> ModelConfig:
    """The teacher as this run computes it; refuses a vocabulary or length it cannot serve."""
    t = source.config
    if t.vocab_size != student.vocab_size:
        raise TrainingError(f"train.teacher={source.path!r}: the teacher's vocabulary has {t.vocab_size} rows, the "
                            f"student's ({student.name}) {student.vocab_size}; distillation needs the same vocabulary")
    if seq_len > t.max_position_embeddings and t.rope_scaling is None:
        raise TrainingError(f"train.teacher={source.path!r}: SEQ_LEN={seq_len} exceeds the teacher's "
                            f"max_position_embeddings={t.max_position_embeddings}")
    return t.replace(param_dtype=student.compute_dtype, compute_dtype=student.compute_dtype,
                     attention_impl=student.attention_impl, attention_block=student.attention_block,
                     scan_layers=student.scan_layers, remat="none")


@dataclasses.dataclass
class Distiller:
    """Everything the step and the loop need to know about the teacher (built by `make_distiller`)."""

    source: TeacherSource
    cfg: ModelConfig  # the teacher as computed in this run (`teacher_config`)
    kd: kd_loss.KDConfig
    shardings: Any  # nested dict of NamedShardings, like the parameters
    abstract_params: Any  # nested ShapeDtypeStructs with those shardings (what the step is lowered with)

    def token_terms(self, student_model, h_BTD, batch: dict, teacher_params, chunk: int | None) -> dict:
        """The teacher's forward (no gradient) and the per-token LM and KD terms (kd_loss.token_terms)."""
        teacher = model_from_flat(self.cfg, flatten(teacher_params))
        ht_BTD, _ = teacher.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
        return kd_loss.token_terms(student_model.logits, h_BTD, teacher.logits, jax.lax.stop_gradient(ht_BTD),
                                   batch["targets"], self.kd, chunk)

    def meta(self) -> dict[str, Any]:
        return {"teacher": dict(self.source.meta(), kd_alpha=self.kd.alpha, kd_temperature=self.kd.temperature,
                                kd_topk=self.kd.topk, kd_divergence=self.kd.divergence)}


def kd_config(tc) -> kd_loss.KDConfig:
    return kd_loss.KDConfig(alpha=tc.kd_alpha, temperature=tc.kd_temperature, topk=tc.kd_topk,
                            divergence=tc.kd_divergence)


def make_distiller(student: ModelConfig, tc, mesh) -> Distiller:
    """From `tc.teacher` (config only; no parameters are read): checks, config, shardings."""
    kd = kd_config(tc)
    try:
        kd.validate(student.vocab_size)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    source = find_teacher(tc.teacher)
    cfg = teacher_config(source, student, tc.seq_len)
    specs = param_specs(cfg)
    try:
        flat_sh = sharding.param_shardings(specs, mesh)
    except ValueError as e:
        raise TrainingError(f"train.teacher={source.path!r}: mesh: {e}") from None
    abstract = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_sh[k]) for k, s in specs.items()}
    return Distiller(source=source, cfg=cfg, kd=kd, shardings=nest(flat_sh), abstract_params=nest(abstract))


def load_teacher_params(d: Distiller):
    """The teacher's parameters as a nested dict of device arrays in the compute dtype, on the
    step's shardings (checkpoints are restored shard by shard onto the mesh)."""
    flat_sh = flatten(d.shardings)
    if d.source.kind == "hf":

        flat = hf.read_hf_params(d.source.path, d.cfg, dtype=d.cfg.compute_dtype)
        return nest({k: jax.device_put(v, flat_sh[k]) for k, v in flat.items()})


    stored = param_specs(d.source.config)  # restored in the stored dtype, then cast on the devices
    target = nest({k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_sh[k]) for k, s in stored.items()})
    root = storage.path(d.source.path).parent
    with ckpt.manager(root, create=False) as mgr:
        params = mgr.restore(d.source.step, args=ocp.args.Composite(**{
            ckpt.PARAMS: ocp.args.StandardRestore(target)}))[ckpt.PARAMS]
    dtype = np.dtype(jax.numpy.dtype(d.cfg.compute_dtype))
    cast = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(dtype), t), out_shardings=d.shardings)
    return cast(params)
