"""lm-evaluation-harness backend: our JAX model as an lm-eval `LM` (model name "qwen3_jax").

    import lm_eval, qwen3_jax.lm_eval_model                           # registers "qwen3_jax"
    lm_eval.simple_evaluate(model="qwen3_jax", model_args="hf=hf/qwen3-0.6b,batch_size=16",
                            tasks=["hellaswag"])
    lm = Qwen3LM(checkpoint="runs/stage1", tokenizer="runs/spm4k/spm.model")   # or an instance
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Needs the [eval] extra (`pip install -e .[eval]`: lm-eval, accelerate); import this module only
where lm-eval is wanted (launch/evaluate.py does, for --tasks).

Model args: exactly one of `hf` (a Hugging Face folder) / `checkpoint` (a training workdir,
checkpoint root or step folder); `tokenizer` (default: `inference.loading.resolve_tokenizer`);
`batch_size` (rows per forward / per generation batch, default 16); `max_length` (default: the
model's max_position_embeddings, as lm-eval's `hf` backend reads it from config.json);
`max_gen_toks` (256); `enable_thinking` (true / false: the chat template's switch, with
`--apply_chat_template`); `thinking_budget` (B thinking tokens, then the model is told to answer:
`qwen3_jax.inference.chat`'s budget; a task's `generation_kwargs: {thinking_budget: B}` sets it
per request); `think_end_token` (e.g. `</think>`: generated text is cut after its last
occurrence, as the `hf` backend does; `</think>` by default under a thinking budget); `seed`
(sampling).

Scores are the model's own forward in fp32: parameters and compute in float32,
`Qwen3.hidden` then `Qwen3.logits` at the scored positions only, log-softmax and greedy check
per token; the requests are tokenized, truncated and windowed exactly as lm-eval's `hf`
backend does (context + continuation joined, the last `max_length` tokens kept;
loglikelihood_rolling through lm-eval's own `get_rolling_token_windows`), so both backends give
the same numbers on the same model up to fp32 round-off (tests/test_lm_eval.py).
`generate_until` runs `qwen3_jax.inference.Generator` (KV cache, left-padded batches, stop
strings, EOS ids of the tokenizer and generation_config.json); greedy unless `do_sample`.
Everything runs on one device.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from qwen3_jax.config import ModelConfig
from qwen3_jax.inference.chat import THINK_OPEN, as_messages
from qwen3_jax.inference.engine import ThinkingSpec, bucket
from qwen3_jax.inference.loading import load_text_generator
from qwen3_jax.inference.sampling import SamplingConfig
from qwen3_jax.params import model_from_flat

LOGITS_PER_PIECE = 1 << 25  # fp32 logits made at once (128 MiB): longer continuations are scored in pieces
_IGNORED_ARGS = ("device", "max_batch_size")  # lm-eval's additional config: one device, a fixed batch size


def _as_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"qwen3_jax model arg {name}={value!r}: not true / false")


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"qwen3_jax model arg {name}={value!r}: not an integer") from None
    if n < minimum:
        raise ValueError(f"qwen3_jax model arg {name}={value!r}: must be >= {minimum}")
    return n


def score_function(cfg: ModelConfig, piece: int):
    """jit(params, tokens_BT, positions_BT, segment_ids_BT, index_BC, targets_BC) -> (log p [B,C],
    greedy [B,C]): log-softmax of the target and whether it is the argmax, at positions index_BC."""

    def score(params, tokens_BT, positions_BT, segment_ids_BT, index_BC, targets_BC):
        model = model_from_flat(cfg, params)
        h_BTD, _ = model.hidden(tokens_BT, positions_BT, segment_ids_BT)
        h_BCD = jnp.take_along_axis(h_BTD, index_BC[..., None], axis=1)

        def one(h, t):
            logits = model.logits(h).astype(jnp.float32)
            target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
            return target - jax.nn.logsumexp(logits, axis=-1), target >= jnp.max(logits, axis=-1)

        B, C, D = h_BCD.shape
        if C <= piece:
            return one(h_BCD, targets_BC)
        n = C // piece  # both powers of two
        h_nBcD = jnp.moveaxis(h_BCD.reshape(B, n, piece, D), 1, 0)
        t_nBc = jnp.moveaxis(targets_BC.reshape(B, n, piece), 1, 0)
        logp, greedy = jax.lax.map(lambda a: one(*a), (h_nBcD, t_nBc))
        return jnp.moveaxis(logp, 0, 1).reshape(B, C), jnp.moveaxis(greedy, 0, 1).reshape(B, C)

    return jax.jit(score)


@register_model("qwen3_jax")
class Qwen3LM(TemplateLM):
    """lm-eval's LM over `qwen3_jax.inference` (see the module docstring for the model args)."""

    def __init__(self, hf: str | None = None, checkpoint: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 16, max_length: int | str | None = None, max_gen_toks: int | str = 256,
                 enable_thinking: bool | str | None = None, think_end_token: str | None = None,
                 thinking_budget: int | str | None = None, seed: int | str = 0, text_generator=None,
                 **lm_eval_config: Any):
        super().__init__()
        unknown = sorted(set(lm_eval_config) - set(_IGNORED_ARGS))
        if unknown:
            raise ValueError(f"qwen3_jax: unknown model args {unknown} (known: hf, checkpoint, tokenizer, batch_size, "
                             f"max_length, max_gen_toks, enable_thinking, think_end_token, thinking_budget, seed)")
        if text_generator is None:
            if (hf is None) == (checkpoint is None):
                raise ValueError("qwen3_jax: give exactly one of the model args hf=DIR / checkpoint=DIR")
            text_generator = load_text_generator(hf=hf, checkpoint=checkpoint, tokenizer=tokenizer, dtype="float32")
        self.text_generator = text_generator
        self.generator, self.tok = text_generator.generator, text_generator.tokenizer
        self.cfg = self.generator.cfg
        if self.cfg.compute_dtype != "float32":
            raise ValueError(f"qwen3_jax: the model computes in {self.cfg.compute_dtype}; scores need float32")
        self.template = text_generator.template
        self._batch_size = _as_int("batch_size", 16 if batch_size == "auto" else batch_size)
        self._max_length = _as_int("max_length", max_length if max_length is not None
                                   else self.cfg.max_position_embeddings, 2)
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.enable_thinking = _as_bool("enable_thinking", enable_thinking)
        self.think_end_token = think_end_token
        self.thinking_budget = None if thinking_budget is None else _as_int("thinking_budget", thinking_budget, 0)
        self.seed = _as_int("seed", seed, 0)
        piece = max(1, LOGITS_PER_PIECE // (self._batch_size * self.cfg.vocab_size))
        self._score = score_function(self.cfg, 1 << (piece.bit_length() - 1))

    # -- what lm-eval asks of a model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Special tokens spelled in the text are matched, as transformers' tokenizers do by default;
        # nothing is added (Qwen3 has no BOS).
        return self.tok.encode(string, allow_special=True)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        if self.template is None:
            raise ValueError(f"qwen3_jax: tokenizer {self.tok.name} has no chat template")
        return self.template.source

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template rendered as transformers' `apply_chat_template(..., tokenize=False,
        continue_final_message=not add_generation_prompt, enable_thinking=...)` renders it."""
        if self.template is None:
            raise ValueError(f"qwen3_jax: tokenizer {self.tok.name} has no chat template")
        text = self.template.render(as_messages(chat_history), add_generation_prompt=add_generation_prompt,
                                    enable_thinking=self.enable_thinking)
        if not add_generation_prompt and chat_history:  # continue the final (assistant) message
            final = chat_history[-1]["content"].strip()
            if final and final in text:
                text = text[:text.rindex(final) + len(final)]
        return text

    # -- scores -------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether every continuation token is the argmax)."""
        rows = []
        for key, context, cont in requests:
            if not cont:
                raise ValueError(f"qwen3_jax: an empty continuation for {key!r}")
            if len(cont) > self.max_length:
                raise ValueError(f"qwen3_jax: a continuation of {len(cont)} tokens, more than max_length="
                                 f"{self.max_length}")
            ids = (list(context) + list(cont))[-(self.max_length + 1):]
            rows.append((ids[:-1], list(cont)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
        B = self.batch_size
        for s in tqdm(range(0, len(order), B), disable=disable_tqdm, desc="qwen3_jax loglikelihood"):
            chunk = order[s:s + B]
            T = bucket(max(len(rows[r][0]) for r in chunk))
            C = bucket(max(len(rows[r][1]) for r in chunk), 4)
            tokens, seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
            index, targets = np.zeros((B, C), np.int32), np.zeros((B, C), np.int32)
            for i, r in enumerate(chunk):
                inp, cont = rows[r]
                tokens[i, :len(inp)], seg[i, :len(inp)] = inp, 1
                index[i, :len(cont)] = np.arange(len(inp) - len(cont), len(inp))
                targets[i, :len(cont)] = cont
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
            logp, greedy = jax.device_get(self._score(self.generator.params, tokens, positions, seg, index, targets))
            for i, r in enumerate(chunk):
                n = len(rows[r][1])
                out[r] = (float(np.sum(logp[i, :n], dtype=np.float64)), bool(np.all(greedy[i, :n])))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over every token of each text, in windows of max_length (lm-eval's own
        `get_rolling_token_windows`, the first token conditioned on the prefix token)."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, scores):
            out[r] += logp
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # -- generation ---------------------------------------------------------------------------------
    def _thinking(self, budget) -> tuple[ThinkingSpec | None, list[int]]:
        """(the generator's thinking spec, the tokens that open the block after the prompt) for a
        thinking budget; (None, []) without one."""
        if budget is None:
            return None, []
        tg = self.text_generator
        if tg.think_open is None or tg.think_close is None:
            raise ValueError(f"qwen3_jax: thinking_budget={budget}, but tokenizer {self.tok.name} has no "
                             f"<think> / </think> tokens")
        spec = ThinkingSpec(open_id=tg.think_open, close_id=tg.think_close, budget=_as_int("thinking_budget", budget, 0),
                            stop_ids=tg.stop_ids, turn_start_id=tg.turn_start)
        return spec, self.tok_encode(THINK_OPEN + "\n")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) generation until a stop string, an EOS id or
        max_gen_toks; batched per distinct gen_kwargs."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.tok.decode([self.eot_token_id])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="qwen3_jax generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"qwen3_jax: max_gen_toks {max_gen} must be less than max_length {self.max_length}")
            sampling = SamplingConfig()
            if kwargs.pop("do_sample", False):
                sampling = SamplingConfig(temperature=float(kwargs.pop("temperature", 1.0) or 1.0),
                                          top_k=int(kwargs.pop("top_k", 0) or 0),
                                          top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
            budget = kwargs.pop("thinking_budget", self.thinking_budget)
            thinking, opening = self._thinking(budget)
            contexts = [(self.tok_encode(requests[i].args[0]) + opening)[-(self.max_length - max_gen):]
                        for i in members]
            think_end = self.think_end_token or ("</think>" if thinking is not None else None)
            order = sorted(range(len(members)), key=lambda k: -len(contexts[k]))
            for s in range(0, len(order), self.batch_size):
                part = order[s:s + self.batch_size]
                gens = self.generator.generate([contexts[k] for k in part], max_new_tokens=max_gen,
                                               sampling=sampling, seed=self.seed, eos_ids=self.text_generator.eos_ids,
                                               stop_strings=[u for u in until if u], decode=self.tok.decode,
                                               thinking=thinking)
                for k, g in zip(part, gens):
                    toks = g.tokens[:-1] if g.stop_reason == "eos" else g.tokens
                    text = postprocess_generated_text(self.tok.decode(toks), until, think_end)
                    out[members[k]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[k]].args, text)
                    bar.update(1)
        bar.close()
        return out
