"""Convert between a Hugging Face folder and our orbax checkpoint layout.

  python launch/convert_hf.py import --hf DIR --out CKPT [--dtype float32] [--overwrite]
  python launch/convert_hf.py export --checkpoint WORKDIR_OR_CKPT [--step N] --out DIR
                                     [--dtype bfloat16] [--tokenizer qwen3|DIR|FILE] [--overwrite]

`import` writes step 0 of a checkpoint root (`CKPT/0/{params,model_config,meta}`) that training
can start from; `export` takes a training workdir (its latest checkpoint), a checkpoint root or
one step folder. Both check their arguments, the source and the target before loading anything,
stream tensor by tensor and write to a temporary folder renamed at the end. With --overwrite,
export replaces the files an export writes and keeps any others; import replaces a previous
import (step 0) and refuses a folder holding anything else (a training workdir, say).

Every path may be a bucket (`gs://...`). An import from one stages the folder locally (safetensors
reads local files); an import to one lets orbax write step 0 there (its `commit_success.txt` marks
the step complete). An export to one is built locally and uploaded with `config.json` written last
(a folder without it is not a Hugging Face folder, so a reader never takes a partial upload for an
export); --overwrite there deletes the old config.json first.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import jax

from qwen3_jax import checkpoint, hf, storage
from qwen3_jax.errors import HFConversionError
from qwen3_jax.fileio import atomic_dir, check_target
from qwen3_jax.hf_tokenizer import plan_tokenizer_export


def _rss_gib() -> float:  # /proc is this machine's, never a user path
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cmd_import(args) -> None:

    t0 = time.time()
    src = storage.path(args.hf)
    hf.np_dtype(args.dtype)
    cfg = hf.from_hf_config(hf.read_config(src), source=str(src / "config.json"), param_dtype=args.dtype)
    owned = {"0"}.__contains__  # an import writes step 0; anything else in --out is someone else's
    check_target(args.out, args.overwrite, owned=owned)
    with storage.staged(src) as local:  # a remote folder's files, downloaded once
        folder, _ = hf.check_hf_params(local, cfg)  # names, shapes, every file's header: before any data is read
        hf_dtype = folder.dtype()
        flat = hf.read_hf_params(local, cfg, dtype=args.dtype)

    for k in list(flat):  # hand each array to jax now, one at a time, so orbax does not copy them all at once
        flat[k] = jax.device_put(flat[k])
    with atomic_dir(args.out, overwrite=args.overwrite, owned=owned, stage_remote=False) as tmp:
        checkpoint.save_params(tmp, 0, flat, cfg, meta={"source": str(src), "hf_dtype": hf_dtype})
    n = sum(x.size for x in flat.values())
    print(f"imported {src} -> {args.out} (step 0): {n:,} parameters, {cfg.num_layers} layers, "
          f"{time.time() - t0:.1f}s, peak RSS {_rss_gib():.2f} GiB")


def _export_step(path: str, step: int | None) -> tuple[os.PathLike, int]:
    """(checkpoint root, step) for --checkpoint / --step, checked without loading any parameters."""

    root, found = checkpoint.checkpoint_root(path)
    if found is not None and step is not None and step != found:
        raise ValueError(f"--checkpoint {path} is the folder of step {found} but --step {step} was given")
    step = step if step is not None else found if found is not None else checkpoint.latest_step(root)
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / checkpoint.PARAMS).is_dir())
    if step is None or step not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise FileNotFoundError(f"{root}: no complete checkpoint for step {step} (steps with {checkpoint.PARAMS}/: "
                                f"{have})" if step is not None else f"{root}: no complete checkpoint")
    return root, step


def cmd_export(args) -> None:

    t0 = time.time()
    if args.dtype is not None:
        hf.np_dtype(args.dtype)
    if not args.max_shard_gib > 0:
        raise ValueError(f"--max-shard-gib {args.max_shard_gib}: must be > 0")
    # everything is checked before any parameter is loaded or any folder is created
    root, step = _export_step(args.checkpoint, args.step)
    cfg, meta = checkpoint.read_model_config(root, step), checkpoint.read_meta(root, step)
    tokenizer = (plan_tokenizer_export(args.tokenizer, cfg.vocab_size, cfg.max_position_embeddings)
                 if args.tokenizer else None)
    kept = check_target(args.out, args.overwrite, owned=hf.export_owns, keep_others=True)
    cfg, flat, step, meta = checkpoint.restore_params_numpy(root, step)
    dtype = args.dtype or meta.get("hf_dtype") or "bfloat16"
    cfg = cfg.replace(param_dtype=dtype if dtype in ("float32", "bfloat16") else cfg.param_dtype)
    hf.write_hf_folder(flat, cfg, args.out, dtype=dtype, tokenizer=tokenizer, overwrite=args.overwrite,
                       max_shard_bytes=int(args.max_shard_gib * 2**30))
    n = sum(x.size for x in flat.values())
    print(f"exported {args.checkpoint} (step {step}) -> {args.out}: {n:,} parameters as {dtype}, "
          f"{time.time() - t0:.1f}s, peak RSS {_rss_gib():.2f} GiB")
    if tokenizer is not None:
        print(f"tokenizer {tokenizer.source}: {', '.join(sorted(tokenizer.files))}; eos {tokenizer.eos!r} "
              f"(id {tokenizer.eos_id}), pad {tokenizer.pad!r}, bos {tokenizer.bos!r}")
    if kept:
        print(f"kept {len(kept)} file(s) in {args.out} that the export does not write: {', '.join(kept)}")
    if meta.get("router_bias"):
        print("note: this run's aux-loss-free routing bias (train.router_bias_rate) is training state and is not "
              "exported: Qwen3 has no router bias, so the exported model routes by its router weights alone")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("import", help="Hugging Face folder -> checkpoint")
    a.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="checkpoint root to create")
    a.add_argument("--dtype", default="float32", help="parameter dtype of the checkpoint (default float32)")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("export", help="checkpoint -> Hugging Face folder")
    b.add_argument("--checkpoint", required=True, help="training workdir, checkpoint root or step folder")
    b.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default=None, help="tensor dtype on disk (default: the imported source's, else bfloat16)")
    b.add_argument("--tokenizer", default=None,
                   help="the training data's tokenizer: 'qwen3', a tokenizer folder, a tokenizer.json or a "
                        "sentencepiece .model (converted to tokenizer.json)")
    b.add_argument("--max-shard-gib", type=float, default=2.0)
    b.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    try:
        (cmd_import if args.cmd == "import" else cmd_export)(args)
    except (HFConversionError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
