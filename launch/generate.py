"""Generate with a Qwen3 model in JAX: KV cache, batched prompts, chat and thinking modes.

  python launch/generate.py --hf DIR --prompt "def fib(n):" --max_new_tokens 64
  python launch/generate.py --checkpoint runs/stage3 [--tokenizer qwen3|DIR|sp.model] --prompt ...
  python launch/generate.py --hf DIR --chat --thinking_budget 256 --prompt "Is 9.11 > 9.9?" --json
  python launch/generate.py --hf DIR --chat --no_thinking --prompts_file prompts.jsonl --json
  python launch/generate.py --hf gs://BUCKET/hf/x --prompt "def fib(n):"   # any path may be a bucket

--prompts_file: one JSON value per line, a string, {"prompt": "..."} or {"messages": [...]} (chat).
Sampling: --temperature 0 (the default) is greedy; otherwise temperature -> top-k -> top-p with
--seed. --chat applies the tokenizer's chat template (thinking on by default; --no_thinking
closes an empty block); --thinking_budget B starts the turn inside `<think>\\n` and inserts the
stop-thinking text after B thinking tokens. --json prints one object per prompt (prompt_tokens,
tokens, text, thinking_tokens, stop_reason); otherwise the text streams to the terminal, one
prompt after another. Bad input exits 2 with a one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen3_jax import storage
from qwen3_jax.errors import HFConversionError
from qwen3_jax.inference import SamplingConfig, load_text_generator


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv=None) -> argparse.Namespace:
    p = _Parser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face folder (config.json, *.safetensors, tokenizer files)")
    src.add_argument("--checkpoint", help="training workdir, checkpoint root or step folder")
    p.add_argument("--tokenizer", help="'qwen3', a tokenizer folder / tokenizer.json, or a sentencepiece .model "
                                       "(default: the model folder's files, else qwen3)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", help="jsonl: a string, {\"prompt\": ...} or {\"messages\": [...]} per line")
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--thinking", dest="thinking", action="store_true", default=None)
    think.add_argument("--no_thinking", dest="thinking", action="store_false")
    p.add_argument("--thinking_budget", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps_per_call", type=int, default=16, help="decode steps per jitted call")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        p.error("give --prompt TEXT or --prompts_file F.jsonl")
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.thinking_budget is not None and args.thinking_budget < 0:
        p.error(f"--thinking_budget must be >= 0, got {args.thinking_budget}")
    if not args.chat and (args.thinking is not None or args.thinking_budget is not None):
        p.error("--thinking / --no_thinking / --thinking_budget need --chat")
    if args.thinking is False and args.thinking_budget is not None:
        p.error(f"--no_thinking with --thinking_budget {args.thinking_budget}")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        p.error(f"bad sampling settings: --temperature {args.temperature} (>= 0), --top_k {args.top_k} (>= 0), "
                f"--top_p {args.top_p} (in (0, 1])")
    if args.steps_per_call < 1:
        p.error(f"--steps_per_call must be >= 1, got {args.steps_per_call}")
    return args


def read_prompts(args) -> list:
    """--prompt values, then --prompts_file's lines (the file local or on a bucket, gs://)."""
    prompts = list(args.prompt)
    if args.prompts_file:
        path = storage.path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts_file {path}: no such file")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if isinstance(item, dict) and "messages" in item and args.chat:
                prompts.append(item["messages"])
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompts.append(item["prompt"])
            elif isinstance(item, str):
                prompts.append(item)
            else:
                raise ValueError(f"{path}:{n}: expected a string, {{\"prompt\": str}} or (with --chat) "
                                 f"{{\"messages\": [...]}}")
    return prompts


def main(argv=None) -> int:
    args = parse(argv)

    try:
        prompts = read_prompts(args)

        gen = load_text_generator(hf=args.hf, checkpoint=args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                                  steps_per_call=args.steps_per_call)
        kw = dict(chat=args.chat, thinking=args.thinking, thinking_budget=args.thinking_budget,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, stop_strings=tuple(args.stop),
                  sampling=SamplingConfig(args.temperature, args.top_k, args.top_p))
        if args.json:
            for result in gen.generate(prompts, **kw):
                print(json.dumps(result, ensure_ascii=False), flush=True)
            return 0
        for i, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"=== [{i}] {prompt if isinstance(prompt, str) else json.dumps(prompt)}", flush=True)
            gen.generate([prompt], on_text=lambda _, text: print(text, end="", flush=True), **kw)
            print(flush=True)
    except (HFConversionError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"generate.py: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
