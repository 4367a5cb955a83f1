"""The training loop's eval reports bits per byte (the formula launch/evaluate.py uses), and a
damaged record met mid-run ends the run with one line naming the shard, after saving what was
trained."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from train_utils import run, tiny_args


def test_eval_bits_per_byte_matches_the_eval_batches(data_dir, spm512, tmp_path):
    work = tmp_path / "run"
    r = run(tiny_args(data_dir, work, "train.eval_every=4", "train.eval_batches=2", steps=4, every=4))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    ev = [x for x in rows if x["split"] == "eval"][-1]
    assert "bits_per_byte" in ev, ev

    # the same eval batches, their bytes counted independently of the loop
    from data_pipeline.text_tokenizer import load_tokenizer
    from qwen3_jax import configurables
    from qwen3_jax.evaluate import token_byte_lengths

    configurables.parse_gin(["cpu_smoke.gin", "model/tiny-moe.gin"],
                            ["STEPS=4", "SEQ_LEN=64", "BATCH_SIZE=4", "CHECKPOINT_EVERY=4",
                             f"stage_mixture.builtin_dir='{data_dir}'", "stage_mixture.spm_vocab_size=512"])
    model, tc = configurables.run_config()
    bytes_V = token_byte_lengths(load_tokenizer(spm512["tokenizer"]), model.vocab_size)
    it = tc.make_eval_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    nbytes = tokens = 0
    for _ in range(2):
        b = next(it)
        nbytes += int(sum(bytes_V[t] for t, m in zip(b["targets"].ravel(), b["loss_mask"].ravel()) if m > 0))
        tokens += int((b["loss_mask"] > 0).sum())
    assert tokens == ev["tokens"]
    expected = ev["loss"] * ev["tokens"] / math.log(2) / nbytes
    assert ev["bits_per_byte"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_damaged_record_mid_run_names_it_and_keeps_the_steps(spm512, data_dir, tmp_path):
    from data_pipeline.prepare import prepare

    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(3000)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 1 + i % 60))}) + "\n"
                                               for i in range(400)))
    ds = tmp_path / "ds"
    prepare([str(tmp_path / "in.jsonl")], spm512["tokenizer"], str(ds), shards=2, workers=0, progress=False)
    shard = ds / "shard-00001-of-00002.array_record"
    raw = bytearray(shard.read_bytes())
    at = raw.index(b"\0" * 256, 64) // 2  # inside the records: found only when read, not when opened
    raw[at:at + 16] = bytes(x ^ 0xFF for x in raw[at:at + 16])
    shard.write_bytes(bytes(raw))

    work = tmp_path / "run"
    r = run(tiny_args(data_dir, work, f"make_dataset.data='{ds}'", "train.eval_every=0", "train.sample_every=0",
                      steps=200, every=100, seq_len=128))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and "record " in err[0] and "delete" in err[0], r.stderr[-2000:]
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 0 < saved[-1] < 200  # the steps trained before the bad record are kept
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == saved[-1]
    shutil.rmtree(work)
