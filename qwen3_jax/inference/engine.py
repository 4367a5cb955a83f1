"""Batched generation with a preallocated KV cache: one prefill, then jitted chunks of decode steps.

Padding: prompts are LEFT-padded to a common length P. Row b's prompt fills slots
P - len_b .. P - 1 (`start_B` = its first slot) and its positions count from 0 at its first
token, so every row's last prompt token sits at slot P - 1 (the prefill logits are read there)
and every row writes its next token at the same slot `index`: a decode step is one
dynamic-update-slice into the cache. Padding never reaches a real token: in the prefill it is
segment 0 of the training kernel's own document mask, in decode its slots (< start_b) are
masked out of the keys.

Buckets: P and the cache length S >= P + max_new_tokens are rounded up (`bucket`), so one
compiled prefill and one compiled decode chunk serve every request of a (batch, P, S) bucket;
the sampling settings, EOS ids and stop-thinking ids are compile-time constants, the token
limit and the thinking budget are not.

Decode: `steps_per_call` steps run in a `lax.while_loop` inside one jitted call, which ends
early once every row is done; the host then collects the tokens, streams them, looks for stop
strings and calls again. One step: choose each row's token (`sampling.sample`, or the next
forced stop-thinking id), record it, feed it through `Qwen3.extend` at slot `index`.

Thinking (per row): phase FREE (before a thinking block), THINK (inside), AFTER (closed). A row
enters THINK when it generates `<think>`, or starts there when its prompt ends inside an open
block (the chat layer's `<think>\\n` under a budget); it leaves when it generates `</think>`.
Tokens generated in THINK (not `</think>`) are thinking tokens. When their count reaches the
budget, the next len(stop_ids) tokens are the stop-thinking ids — forced one per step through
the same cache, as if the model had written them — after which the row is AFTER and samples
freely again. Forced tokens are part of `tokens` and count toward `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.inference.cache import init_cache
from qwen3_jax.inference.sampling import SamplingConfig, sample
from qwen3_jax.model.attention_ops import resolve_impl
from qwen3_jax.model.moe_ep import EXCHANGES, canonical_exchange
from qwen3_jax.params import flat_params, model_from_flat, param_specs

FREE, THINK, AFTER = 0, 1, 2  # thinking phases
ANSWER_TOKEN, THINKING_TOKEN, FORCED_TOKEN = 0, 1, 2  # what each generated token was


def bucket(n: int, minimum: int = 16) -> int:
    """Compiled lengths: powers of two from `minimum` up to 4,096, then multiples of 4,096."""
    if n <= 4096:
        return max(minimum, 1 << max(n - 1, 0).bit_length())
    return -(-n // 4096) * 4096


@dataclasses.dataclass(frozen=True)
class ThinkingSpec:
    """Thinking-block tokens and the budget. `budget` None: no limit (thinking is still counted);
    otherwise `stop_ids` (the tokenized stop-thinking text, ending with `</think>`) are inserted
    after `budget` thinking tokens. The prompt's phase is read after its last `turn_start_id`
    (`<|im_start|>`) when given: a closed block in an earlier turn does not close this one."""

    open_id: int
    close_id: int
    budget: int | None = None
    stop_ids: tuple[int, ...] = ()
    turn_start_id: int | None = None

    def __post_init__(self):
        if self.budget is not None:
            if self.budget < 0:
                raise ValueError(f"thinking budget must be >= 0, got {self.budget}")
            if not self.stop_ids:
                raise ValueError("a thinking budget needs the stop-thinking token ids (stop_ids)")

    def initial_phase(self, prompt: Sequence[int]) -> int:
        prompt = list(prompt)
        if self.turn_start_id is not None and self.turn_start_id in prompt:
            prompt = prompt[len(prompt) - prompt[::-1].index(self.turn_start_id):]
        last = {t: i for i, t in enumerate(prompt) if t in (self.open_id, self.close_id)}
        opened, closed = last.get(self.open_id, -1), last.get(self.close_id, -1)
        return FREE if opened == closed else THINK if opened > closed else AFTER


@dataclasses.dataclass
class Generation:
    """One prompt's result. `tokens`: the generated ids (inserted stop-thinking ids and the final
    EOS included); `thinking_tokens`: how many were generated inside the thinking block before it
    closed or the budget stopped it; `stop_reason`: "eos", "stop_string" or "length"."""

    prompt_tokens: list[int]
    tokens: list[int]
    thinking_tokens: int
    stop_reason: str


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the compiled functions specialise on (hashable)."""

    sampling: SamplingConfig
    eos_ids: tuple[int, ...]
    stop_ids: tuple[int, ...]
    open_id: int
    close_id: int
    steps: int
    pad_id: int


@flax.struct.dataclass
class DecodeState:
    cache: Any  # ((k, v) [L,B,S,K,H] per layer stack)
    logits_BV: jax.Array  # fp32 logits of each row's next token
    index: jax.Array  # int32: the cache slot the next fed token goes to
    step: jax.Array  # int32: decode steps so far (the sampling key is folded with it)
    key: jax.Array
    start_B: jax.Array  # first prompt slot of each row (left padding)
    done_B: jax.Array
    count_B: jax.Array  # tokens generated
    limit: jax.Array  # int32: max_new_tokens
    phase_B: jax.Array  # FREE / THINK / AFTER
    think_count_B: jax.Array
    budget: jax.Array  # int32 (a huge number without a budget)
    force_B: jax.Array  # index into stop_ids of the next forced token; len(stop_ids) = not forcing


def _prefill(cfg: ModelConfig, num_stop_ids: int, max_len: int, params, tokens_BP, start_B, phase_B, done_B,
             limit, budget, key) -> DecodeState:
    model = model_from_flat(cfg, params)
    B, P = tokens_BP.shape
    slots_1P = jnp.arange(P, dtype=jnp.int32)[None]
    segment_ids_BP = (slots_1P >= start_B[:, None]).astype(jnp.int32)  # 0 = padding
    positions_BP = jnp.maximum(slots_1P - start_B[:, None], 0)
    h_BPD, cache = model.extend(tokens_BP, positions_BP, init_cache(cfg, B, max_len), 0,
                                segment_ids_BT=segment_ids_BP)
    logits_BV = model.logits(h_BPD[:, -1:])[:, 0]
    force_B = jnp.where((phase_B == THINK) & (budget <= 0), 0, num_stop_ids).astype(jnp.int32)
    zeros_B = jnp.zeros((B,), jnp.int32)
    return DecodeState(cache=cache, logits_BV=logits_BV, index=jnp.int32(P), step=jnp.int32(0), key=key,
                       start_B=start_B, done_B=done_B, count_B=zeros_B, limit=limit, phase_B=phase_B,
                       think_count_B=zeros_B, budget=budget, force_B=force_B)


def _decode_chunk(cfg: ModelConfig, static: _Static, params, state: DecodeState):
    """Up to `static.steps` decode steps -> (state, tokens [B,C] (-1: none), kinds [B,C])."""
    model = model_from_flat(cfg, params)
    B = state.start_B.shape[0]
    S = state.cache[0][0].shape[2]
    C, F = static.steps, len(static.stop_ids)
    stop_ids = jnp.asarray(static.stop_ids or (0,), jnp.int32)
    eos_ids = jnp.asarray(static.eos_ids or (-1,), jnp.int32)  # -1 matches no token
    slots_1S = jnp.arange(S, dtype=jnp.int32)[None]

    def step(carry):
        i, s, out_BC, kind_BC = carry
        token_B = sample(s.logits_BV, jax.random.fold_in(s.key, s.step), static.sampling)
        forcing_B = s.force_B < F
        token_B = jnp.where(forcing_B, stop_ids[jnp.minimum(s.force_B, max(F - 1, 0))], token_B)
        live_B = ~s.done_B
        token_B = jnp.where(live_B, token_B, static.pad_id)
        free_B = live_B & ~forcing_B
        opened_B = free_B & (s.phase_B == FREE) & (token_B == static.open_id)
        closed_B = free_B & (s.phase_B == THINK) & (token_B == static.close_id)
        inside_B = free_B & (s.phase_B == THINK) & (token_B != static.close_id)
        think_count_B = s.think_count_B + inside_B
        phase_B = jnp.where(opened_B, THINK, s.phase_B)
        phase_B = jnp.where(closed_B | (forcing_B & (s.force_B + 1 >= F)), AFTER, phase_B)
        force_B = jnp.where(forcing_B, s.force_B + 1,
                            jnp.where(inside_B & (think_count_B >= s.budget), 0, s.force_B))
        count_B = s.count_B + live_B
        done_B = s.done_B | (free_B & jnp.isin(token_B, eos_ids)) | (count_B >= s.limit)
        kind_B = jnp.where(forcing_B, FORCED_TOKEN, jnp.where(inside_B, THINKING_TOKEN, ANSWER_TOKEN))
        out_BC = out_BC.at[:, i].set(jnp.where(live_B, token_B, -1))
        kind_BC = kind_BC.at[:, i].set(kind_B.astype(jnp.int32))
        # feed the chosen tokens: slot `index`, each row's own position, keys from its first slot on
        mask_B1S = ((slots_1S >= s.start_B[:, None]) & (slots_1S <= s.index))[:, None]
        h_B1D, cache = model.extend(token_B[:, None], (s.index - s.start_B)[:, None], s.cache, s.index,
                                    mask_BTS=mask_B1S)
        s = s.replace(cache=cache, logits_BV=model.logits(h_B1D)[:, 0], index=s.index + 1, step=s.step + 1,
                      done_B=done_B, count_B=count_B, phase_B=phase_B, think_count_B=think_count_B,
                      force_B=force_B)
        return i + 1, s, out_BC, kind_BC

    def cond(carry):
        i, s, _, _ = carry
        return (i < C) & ~jnp.all(s.done_B)

    init = (jnp.int32(0), state, jnp.full((B, C), -1, jnp.int32), jnp.zeros((B, C), jnp.int32))
    _, state, out_BC, kind_BC = jax.lax.while_loop(cond, step, init)
    return state, out_BC, kind_BC


class Generator:
    """Token-level generation for one model: `Generator(cfg, flat_params).generate(prompts)`.

    `params`: the flat parameter dict (`qwen3_jax.params`; numpy or jax arrays). With `mesh`
    the parameters are placed by the logical-axis rules (`sharding.param_shardings`) and every
    function is traced under `sharding.use_rules(mesh, rules)` (constraints, expert parallelism);
    the batch is padded with idle rows to a multiple of the mesh's batch shards. `moe_exchange`:
    expert parallelism's token exchange (`qwen3_jax.model.moe_ep.EXCHANGES`; the old name
    'ragged' is accepted with a warning).
    """

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], *, mesh=None, rules=sharding.DEFAULT_RULES,
                 moe_exchange: str = "auto", steps_per_call: int = 32, min_bucket: int | None = None):
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self.moe_exchange = canonical_exchange(moe_exchange, "Generator moe_exchange")
        if self.moe_exchange not in EXCHANGES:
            raise ValueError(f"Generator moe_exchange={moe_exchange!r} is not one of {EXCHANGES}")
        self.steps_per_call = int(steps_per_call)
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        specs = param_specs(cfg)
        if set(specs) != set(params):
            raise ValueError(f"parameter keys differ from the model: missing {sorted(set(specs) - set(params))[:5]}, "
                             f"unexpected {sorted(set(params) - set(specs))[:5]}")
        if mesh is not None:
            shardings = sharding.param_shardings(specs, mesh, rules)
            self.params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
            self.platform = mesh.devices.flat[0].platform
        else:
            self.params = {k: jnp.asarray(v) for k, v in params.items()}
            self.platform = jax.default_backend()
        self.batch_shards = 1 if mesh is None else sharding.batch_shards(mesh, rules)
        self.min_bucket = min_bucket or (128 if self.platform == "tpu" else 16)  # splash: 128-token tiles
        self._prefill = jax.jit(self._under_rules(_prefill), static_argnums=(0, 1, 2))
        self._chunk = jax.jit(self._under_rules(_decode_chunk), static_argnums=(0, 1), donate_argnums=(3,))
        self.last_stats: dict[str, Any] = {}

    @classmethod
    def from_model(cls, model, **kw) -> "Generator":
        return cls(model.cfg, flat_params(model), **kw)

    def _under_rules(self, fn: Callable) -> Callable:
        if self.mesh is None:
            return fn

        def traced(*args):
            with sharding.use_rules(self.mesh, self.rules, moe_exchange=self.moe_exchange):
                return fn(*args)
        return traced

    def lengths(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
        """(P, S): the padded prompt length and the cache length of a request's bucket."""
        P = bucket(prompt_len, self.min_bucket)
        if resolve_impl(self.cfg.attention_impl, P, self.cfg.compute_dtype, self.platform) == "splash":
            P = -(-P // 128) * 128
        return P, bucket(P + max_new_tokens, self.min_bucket)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, eos_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
                 thinking: ThinkingSpec | None = None, on_tokens: Callable[[int, list[int]], None] | None = None,
                 pad_id: int = 0) -> list[Generation]:
        """Generates for every prompt (token ids) at once. Stops a row at an id in `eos_ids` (kept
        as its last token), at a stop string (needs `decode`, ids -> text; the tokens end with the
        one that completed it) or after `max_new_tokens`. `on_tokens(row, ids)` receives each
        row's new tokens after every jitted chunk (streaming)."""
        cfg = self.cfg
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary (0..{cfg.vocab_size - 1}): "
                                 f"{bad[:5]}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and decode is None:
            raise ValueError("stop strings need `decode` (token ids -> text)")
        longest = max(map(len, prompts))
        if longest + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        spec = thinking or ThinkingSpec(open_id=-1, close_id=-1)
        static = _Static(sampling=sampling, eos_ids=tuple(sorted(set(map(int, eos_ids)))),
                         stop_ids=tuple(spec.stop_ids) if spec.budget is not None else (),
                         open_id=spec.open_id, close_id=spec.close_id, steps=self.steps_per_call, pad_id=pad_id)
        n = len(prompts)
        B = -(-n // self.batch_shards) * self.batch_shards
        P, S = self.lengths(longest, max_new_tokens)
        tokens_BP = np.full((B, P), pad_id, np.int32)
        start_B = np.full((B,), P, np.int32)
        for b, p in enumerate(prompts):
            tokens_BP[b, P - len(p):] = p
            start_B[b] = P - len(p)
        phase_B = np.array([spec.initial_phase(p) for p in prompts] + [FREE] * (B - n), np.int32)
        done_B = np.arange(B) >= n
        budget = np.int32(spec.budget if spec.budget is not None else np.iinfo(np.int32).max)

        t0 = time.perf_counter()
        state = self._prefill(cfg, len(static.stop_ids), S, self.params, tokens_BP, start_B, phase_B, done_B,
                              np.int32(max_new_tokens), budget, jax.random.PRNGKey(seed))
        jax.block_until_ready(state.logits_BV)
        t1 = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in range(n)]
        kinds: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        steps = 0
        while True:
            state, out_BC, kind_BC = self._chunk(cfg, static, self.params, state)
            out_BC, kind_BC = np.asarray(out_BC), np.asarray(kind_BC)
            steps += int((out_BC >= 0).any(0).sum())
            hit = []
            for b in range(n):
                keep = out_BC[b] >= 0
                new = out_BC[b][keep].tolist()
                if not new or stopped[b]:
                    continue
                before = len(tokens[b])
                tokens[b] += new
                kinds[b] += kind_BC[b][keep].tolist()
                if stop_strings:
                    cut = _stop_string_end(tokens[b], before, stop_strings, decode)
                    if cut is not None:
                        del tokens[b][cut:], kinds[b][cut:]
                        stopped[b] = True
                        hit.append(b)
                if on_tokens is not None and len(tokens[b]) > before:
                    on_tokens(b, tokens[b][before:])
            if hit:
                state = state.replace(done_B=state.done_B.at[np.asarray(hit)].set(True))
            if bool(np.asarray(state.done_B).all()):
                break
        t2 = time.perf_counter()
        self.last_stats = dict(batch=n, padded_batch=B, prompt_bucket=P, cache_len=S, prefill_s=t1 - t0,
                               decode_s=t2 - t1, decode_steps=steps,
                               prompt_tokens=sum(map(len, prompts)), new_tokens=sum(map(len, tokens)))
        eos = set(static.eos_ids)
        out = []
        for b in range(n):
            reason = ("stop_string" if stopped[b] else
                      "eos" if tokens[b] and tokens[b][-1] in eos and kinds[b][-1] != FORCED_TOKEN else "length")
            out.append(Generation(prompt_tokens=prompts[b], tokens=tokens[b],
                                  thinking_tokens=sum(k == THINKING_TOKEN for k in kinds[b]), stop_reason=reason))
        return out


def _stop_string_end(tokens: list[int], new_from: int, stop_strings: Sequence[str], decode) -> int | None:
    """The length of the shortest token prefix whose text contains a stop string, looking only at
    prefixes that end in the new tokens (`tokens[new_from:]`); None when no stop string appears."""
    if not any(s in decode(tokens) for s in stop_strings):
        return None
    for end in range(max(new_from, 1), len(tokens) + 1):
        text = decode(tokens[:end])
        if any(s in text for s in stop_strings):
            return end
    return len(tokens)
