"""One builder from (model config, train config, devices) to the compiled train step.

`build()` returns a `Program`: the mesh, the abstract train state with its shardings, the batch
spec, the jitted train and eval steps. With `model.remat == 'auto'` it compiles the remat
candidates on the devices and returns the chosen one's Program, its step compiled
(`remat_at_startup`, the search's rules in `qwen3_jax.remat_search`). The training loop runs `program.lower().compile()`; the
AOT tool (`launch/aot_compile.py`) compiles the same `program.lower()` for a TPU slice's devices.
Nothing here reads gin or files, so what the AOT report describes is the program train.py runs
on that topology: attention resolved for the target backend, remat, loss chunk, micro-batches,
expert exchange all come from the two configs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import optax

from data_pipeline.pipeline import BATCH_DTYPES
from qwen3_jax import hosts, quant, remat_search, sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.errors import TrainingError
from qwen3_jax.hlo_stats import hlo_flops
from qwen3_jax.lm_loss import make_eval_step
from qwen3_jax.memory import device_memory_bytes, format_bytes, peak_bytes
from qwen3_jax.model.attention_ops import resolve_impl
from qwen3_jax.params import param_specs
from qwen3_jax.train import distill, onpolicy
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.optim import make_optimizer
from qwen3_jax.train.step import TrainState, init_state, make_train_step


@dataclasses.dataclass
class Program:
    model: ModelConfig
    train: TrainConfig
    mesh: jax.sharding.Mesh
    attention: str  # the attention implementation the step runs (`auto` resolved for the mesh)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    abstract_batch: dict[str, jax.ShapeDtypeStruct]  # the global [B,T] arrays the step reads
    step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Callable  # jitted (params, batch) -> {"nll_sum", "tokens"}
    sharding_fallbacks: list[str]  # parameter dims replicated because the mesh does not divide them
    distill: Any = None  # train.teacher: a qwen3_jax.train.distill.Distiller; the step then takes its params
    rollout: Callable | None = None  # on-policy: jitted (params, prompts, step, eos_id) -> the step's batch
    abstract_prompts: dict[str, jax.ShapeDtypeStruct] | None = None  # its [B, P] prompt rows
    # remat='auto' (remat_at_startup): the step already compiled for the chosen
    # policy, the search's rows, the seconds the search took
    lowered: jax.stages.Lowered | None = None
    compiled: jax.stages.Compiled | None = None
    remat_rows: list[dict] | None = None
    compile_s: float | None = None

    def lower_rollout(self) -> jax.stages.Lowered | None:
        """The on-policy sampling program (qwen3_jax.train.onpolicy), None off-policy."""
        if self.rollout is None:
            return None
        scalar = jax.ShapeDtypeStruct((), jax.numpy.int32)
        return self.rollout.lower(self.abstract_state.params, self.abstract_prompts, scalar, scalar)

    def lower(self) -> jax.stages.Lowered:
        teacher = (self.distill.abstract_params,) if self.distill is not None else ()
        return self.step.lower(self.abstract_state, self.abstract_batch, *teacher)

    def init_state(self, params=None) -> TrainState:
        """A fresh train state on the mesh (`params`: start from these, e.g. a previous stage's)."""
        cfg, tc, opt = self.model, self.train, self.optimizer
        init = self._under_rules(lambda p: init_state(cfg, opt, tc.seed, params=p, spike_window=tc.spike_window))
        return jax.jit(init, out_shardings=self.state_shardings)(params)

    def _under_rules(self, fn: Callable) -> Callable:
        return _under_rules(fn, self.mesh, self.train)


def _under_rules(fn: Callable, mesh, tc: TrainConfig) -> Callable:
    """`fn` traced with the sharding rules active (constraints, expert parallelism, kernels)."""
    def traced(*args):
        with sharding.use_rules(mesh, moe_exchange=tc.moe_exchange, capacity_factor=tc.capacity_factor):
            return fn(*args)
    return traced


def build(model: ModelConfig, tc: TrainConfig, devices: Sequence[Any] | None = None,
          num_slices: int | None = None, process_count: int | None = None) -> Program:
    """The train step of `model` under `tc` on `devices` (default: all of this job's devices).

    Raises TrainingError naming the setting for anything that cannot work: bad values, a mesh
    the devices or the parameters do not divide, a batch the data shards do not divide, a
    sequence length the model or the attention kernel cannot take."""
    tc.validate()
    if model.remat == "auto":  # the cheapest policy that fits these devices, chosen by compiling
        return remat_at_startup(lambda policy: build(model.replace(remat=policy), tc, devices, num_slices,
                                                            process_count))
    try:
        mesh = sharding.make_mesh(tc.mesh, devices, num_slices)
        fallbacks = sharding.check_shardable(param_specs(model), mesh)
        sharding.check_batch(tc.batch_size, tc.micro_batches, mesh)
    except ValueError as e:
        raise TrainingError(f"mesh: {e}") from None
    procs = jax.process_count() if process_count is None else process_count
    if tc.batch_size % procs:
        raise TrainingError(f"BATCH_SIZE={tc.batch_size} is not divisible by {procs} processes")
    if tc.seq_len > model.max_position_embeddings and model.rope_scaling is None:
        raise TrainingError(f"SEQ_LEN={tc.seq_len} exceeds the model's max_position_embeddings="
                            f"{model.max_position_embeddings}")
    platform = mesh.devices.flat[0].platform
    attention = resolve_impl(model.attention_impl, tc.seq_len, model.compute_dtype, platform)
    _check_context(mesh, model, tc, attention)
    if attention == "splash" and tc.seq_len % 128:
        raise TrainingError(f"SEQ_LEN={tc.seq_len} must be a multiple of 128 for splash attention "
                            f"(attention_impl={model.attention_impl!r} on {platform})")
    if attention == "splash" and platform != "tpu":
        raise TrainingError(f"attention_impl='splash' is a TPU kernel; these devices are {platform!r} "
                            f"(use 'auto' or 'chunked')")
    if attention == "cudnn" and platform not in ("gpu", "cuda"):
        raise TrainingError(f"attention_impl='cudnn' needs an NVIDIA GPU; these devices are {platform!r}")

    try:  # 8-bit training: the expert form qwix quantizes on this platform (qwen3_jax.quant)
        model = model.replace(moe_impl=quant.moe_impl(model, platform))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    # distillation hook: the teacher's config (read from train.teacher) checked before anything is built
    distiller = distill.make_distiller(model, tc, mesh) if tc.teacher is not None else None
    optimizer, schedule = make_optimizer(tc.optim, tc.steps)
    specs = param_specs(model)
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, tc.seed, spike_window=tc.spike_window))
    state_sh = sharding.tree_shardings(abstract, specs, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), dt, sharding=batch_sh)
             for k, dt in BATCH_DTYPES.items()}
    step = make_train_step(model, optimizer, tc.loss, micro_batches=tc.micro_batches, schedule=schedule,
                           spike_factor=tc.spike_factor, distill=distiller)
    step = quant.intercepted(step, model.quantization)  # 8-bit matmuls (a teacher's forward too)
    teacher_sh = (distiller.shardings,) if distiller is not None else ()
    step_fn = jax.jit(_under_rules(step, mesh, tc), in_shardings=(state_sh, batch_sh, *teacher_sh),
                      out_shardings=(state_sh, None), donate_argnums=0)
    eval_fn = jax.jit(_under_rules(quant.intercepted(make_eval_step(model, tc.loss_chunk), model.quantization),
                                   mesh, tc),
                      in_shardings=(state_sh.params, batch_sh))
    rollout_fn = prompts = None
    if tc.onpolicy_prompt_len is not None:  # on-policy distillation: the student samples the batch
        ro = onpolicy.Rollout(tc.onpolicy_prompt_len, tc.seq_len - tc.onpolicy_prompt_len + 1, tc.onpolicy_sampling())
        if resolve_impl(model.attention_impl, ro.prompt_len, model.compute_dtype, platform) == "splash" \
                and ro.prompt_len % 128:
            raise TrainingError(f"train.onpolicy_prompt_len={ro.prompt_len} must be a multiple of 128 for splash "
                                f"attention (the prompts' prefill)")
        prompts = {k: jax.ShapeDtypeStruct((tc.batch_size, ro.prompt_len), BATCH_DTYPES[k], sharding=batch_sh)
                   for k in ("tokens", "segment_ids")}
        rollout_fn = jax.jit(_under_rules(onpolicy.make_rollout(model, ro, tc.seed), mesh, tc),
                             in_shardings=(state_sh.params, batch_sh, None, None), out_shardings=batch_sh)
    return Program(model=model, train=tc, mesh=mesh, attention=attention, optimizer=optimizer, schedule=schedule,
                   state_shardings=state_sh, batch_sharding=batch_sh, abstract_state=abstract, abstract_batch=batch,
                   step=step_fn, eval_step=eval_fn, sharding_fallbacks=fallbacks, distill=distiller,
                   rollout=rollout_fn, abstract_prompts=prompts)


def _check_context(mesh, model: ModelConfig, tc: TrainConfig, attention: str) -> None:
    """Context parallelism (model/context_parallel.py): zig-zag chunks that divide the sequence,
    a kernel it runs (splash on TPU; the pure-JAX blocked kernel elsewhere, not cuDNN)."""
    cp = mesh.shape.get("context", 1)
    if cp == 1:
        return
    if tc.seq_len % (2 * cp):
        raise TrainingError(f"SEQ_LEN={tc.seq_len} is not divisible by 2 x MeshConfig context={cp} (zig-zag chunks)")
    if attention == "splash" and (tc.seq_len // (2 * cp)) % 128:
        raise TrainingError(f"SEQ_LEN={tc.seq_len}: splash under context={cp} needs zig-zag chunks of "
                            f"SEQ_LEN/(2·{cp}) tokens that are a multiple of 128")
    if model.attention_impl == "cudnn":
        raise TrainingError(f"model_config.attention_impl='cudnn' does not run under context parallelism "
                            f"(MeshConfig context={cp}); use 'auto' (the blocked pure-JAX kernel off TPU)")


def remat_at_startup(build_policy: Callable[[str], Program], headroom: float = remat_search.HEADROOM) -> Program:
    """remat='auto' for the devices this job runs on: compiles the candidates (`build_policy(p)`:
    the Program for `model_config.remat = p`) on them, most kept first, and returns the Program
    of the fewest-FLOPs policy that fits `headroom` x each device's memory, with its compiled step
    (`program.compiled`) and the search's rows (`program.remat_rows`). On a CPU 'none' fits unless
    the host is short of RAM, and every other policy keeps less, so one program is compiled."""
    t0 = time.time()
    first = build_policy("full")
    device = first.mesh.devices.flat[0]
    limit = device_memory_bytes(device)
    if limit is None:
        raise TrainingError(f"model_config.remat='auto': the memory of {device.device_kind} is unknown here; "
                            f"set model_config.remat (launch/aot_compile.py --remat auto searches for a slice)")
    built: dict[str, Program] = {"full": first}

    def compile_policy(policy: str) -> dict:
        program = built.get(policy) or build_policy(policy)
        program.lowered = program.lower()
        program.compiled = program.lowered.compile()
        built[policy] = program
        peak, _ = peak_bytes(program.compiled.memory_analysis(), device.platform)
        flops = hlo_flops(program.compiled.as_text(), causal=True).get("total", 0.0)
        return {"bytes_per_chip_peak": peak, "hbm_bytes_per_chip": limit, "flops_per_chip": flops}

    policies = remat_search.candidates(first.model, device.platform)
    choice, _, rows = remat_search.search(compile_policy, policies, headroom)
    choice = hosts.broadcast_str(choice or "") or None  # every host runs process 0's choice
    if choice is not None and (choice not in built or built[choice].compiled is None):
        compile_policy(choice)
    if choice is None:
        full = next((r["peak_gib"] * 2**30 for r in rows if r["policy"] == "full"), float("nan"))
        raise TrainingError(f"model_config.remat='auto': no remat policy fits {headroom:.0%} of {format_bytes(limit)} "
                            f"per {device.platform} device (full remat needs {format_bytes(full)}); shrink BATCH_SIZE / "
                            f"SEQ_LEN, raise train.micro_batches or shard over more devices")
    program = built[choice]
    program.remat_rows, program.compile_s = rows, time.time() - t0
    compiled = sum(r["compiled"] for r in rows)
    peak = next((r["peak_gib"] for r in rows if r["policy"] == choice), float("nan")) * 2**30
    print(f"remat auto -> {choice!r}: peak {format_bytes(peak)} of {format_bytes(limit)} per {device.platform} device "
          f"({compiled} of {len(rows)} candidates compiled)", flush=True)
    if compiled > 1:
        print(remat_search.format_rows(rows, choice, headroom), flush=True)
    return program
