"""Hugging Face conversion cost at a real shape: wall time and peak RSS of export and import.

  python benchmarks/bench_convert.py [--model qwen3-0.6b] [--workdir /tmp/bench_convert]

Builds the preset with random weights as a checkpoint in our layout (fp32, as training writes
it), then runs `launch/convert_hf.py export` (bf16 on disk, as the hub) and `import` (back to an
fp32 checkpoint) in fresh processes and prints a table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(cmd):
    t0 = time.time()
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stdout}\n{r.stderr}")
    return wall, float(re.search(r"peak RSS ([0-9.]+) GiB", r.stdout).group(1))  # the CLI's own getrusage


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--workdir", default="/tmp/bench_convert")
    args = p.parse_args()
    from qwen3_jax.config import get_config
    from qwen3_jax.params import param_specs
    from qwen3_jax import checkpoint

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cfg = get_config(args.model)
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s.shape, dtype=np.float32) * 0.02 for k, s in param_specs(cfg).items()}
    n = sum(x.size for x in flat.values())
    checkpoint.save_params(work / "ckpt", 0, flat, cfg)
    del flat
    convert = str(ROOT / "launch" / "convert_hf.py")
    t_exp, rss_exp = run([convert, "export", "--checkpoint", str(work / "ckpt"), "--out", str(work / "hf"),
                          "--dtype", "bfloat16"])
    t_imp, rss_imp = run([convert, "import", "--hf", str(work / "hf"), "--out", str(work / "ckpt2")])
    fp32, bf16 = n * 4 / 2**30, n * 2 / 2**30
    print(f"\n{args.model}: {n:,} parameters; fp32 copy {fp32:.2f} GiB, bf16 copy {bf16:.2f} GiB\n")
    print("| direction | reads | writes | wall s | peak RSS GiB | RSS / fp32 copy |")
    print("|---|---|---|---|---|---|")
    print(f"| export | fp32 checkpoint | bf16 safetensors | {t_exp:.1f} | {rss_exp:.2f} | {rss_exp / fp32:.2f} |")
    print(f"| import | bf16 safetensors | fp32 checkpoint | {t_imp:.1f} | {rss_imp:.2f} | {rss_imp / fp32:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
