"""The tools on a bucket: HF export / import, generate and evaluate with `gs://` paths, against a
real GCS API server (tests/gcs_server.py). The CLIs run in this process (their `main(argv)`), so
each test pays for JAX once; the server is the same one a user's emulator or GCS would be."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(name: str):
    """launch/NAME.py as a module (its `main(argv)` returns the exit status)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_params(seed: int = 0):
    """(tiny-dense config, random float32 flat parameters)."""
    from qwen3_jax.config import get_config
    from qwen3_jax.params import param_specs

    cfg = get_config("tiny-dense")
    rng = np.random.default_rng(seed)
    return cfg, {k: (0.1 * rng.standard_normal(s.shape)).astype(np.float32) for k, s in param_specs(cfg).items()}


def tiny_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer.json with the special tokens the data pipeline needs (< 512 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_pipeline.text_tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "the quick brown fox jumps"] * 20, trainer)
    tok.save(str(path))
    return path


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Runs the test in an empty folder and checks that no local `gs:` folder appeared there (what
    `pathlib.Path("gs://b/x")` would create)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / "gs:").exists(), "a gs:// path was treated as a local folder"


def test_export_import_round_trip_on_bucket(gcs_bucket, in_tmp_cwd, capsys):
    """checkpoint (gs://) -> HF export (gs://, config.json marks it whole) -> import (gs://): exact."""
    from qwen3_jax import storage
    from qwen3_jax import checkpoint

    cfg, flat = tiny_params()
    checkpoint.save_params(f"{gcs_bucket}/run", 0, flat, cfg)
    convert = cli("convert_hf")
    hf_dir = f"{gcs_bucket}/hf/x"
    assert convert.main(["export", "--checkpoint", f"{gcs_bucket}/run", "--out", hf_dir, "--dtype", "float32",
                         "--max-shard-gib", "1e-4"]) == 0, capsys.readouterr().err
    names = {p.name for p in storage.path(hf_dir).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= names
    assert sum(n.endswith(".safetensors") for n in names) > 1  # several shards

    assert convert.main(["export", "--checkpoint", f"{gcs_bucket}/run", "--out", hf_dir]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    storage.write_text(f"{hf_dir}/README.md", "mine")  # not an export's file: an --overwrite keeps it
    assert convert.main(["export", "--checkpoint", f"{gcs_bucket}/run", "--out", hf_dir, "--dtype", "float32",
                         "--overwrite"]) == 0, capsys.readouterr().err
    names = {p.name for p in storage.path(hf_dir).iterdir()}
    assert "README.md" in names and sum(n.endswith(".safetensors") for n in names) == 1  # old shards gone

    ckpt = f"{gcs_bucket}/ckpt/y"
    assert convert.main(["import", "--hf", hf_dir, "--out", ckpt]) == 0, capsys.readouterr().err
    assert (storage.path(ckpt) / "0" / "commit_success.txt").exists()  # orbax marked the step complete
    cfg2, flat2, step, meta = checkpoint.restore_params_numpy(ckpt)
    assert step == 0 and cfg2.num_layers == cfg.num_layers and meta["source"] == hf_dir
    assert set(flat2) == set(flat)
    for k in flat:
        assert np.array_equal(np.asarray(flat2[k]), flat[k]), k
    assert convert.main(["import", "--hf", hf_dir, "--out", ckpt]) == 2  # not empty, no --overwrite
    assert convert.main(["import", "--hf", hf_dir, "--out", ckpt, "--overwrite"]) == 0, capsys.readouterr().err


def test_interrupted_remote_export_is_incomplete(gcs_bucket, monkeypatch):
    """An upload that dies before config.json leaves a folder readers refuse (config.json is last)."""
    from qwen3_jax import fileio, hf, storage

    target = f"{gcs_bucket}/hf/partial"
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(target, last="config.json") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not storage.path(target).exists()  # nothing was uploaded
    calls = []

    def upload_then_die(local, dst, last=None):
        calls.append(last)
        (storage.path(dst) / "model.safetensors").write_bytes(b"x")  # the first file, then the crash
        raise OSError("connection lost")

    monkeypatch.setattr(storage, "upload_tree", upload_then_die)
    with pytest.raises(OSError):
        with fileio.atomic_dir(target, last="config.json") as tmp:
            (tmp / "config.json").write_text("{}")
    assert calls == ["config.json"]
    from qwen3_jax.errors import HFConversionError

    with pytest.raises(HFConversionError, match="config.json: not found"):
        hf.read_config(target)


def test_generate_evaluate_responses_from_bucket_export(gcs_bucket, in_tmp_cwd, capsys):
    """An export with a tokenizer from the bucket, then reading that export: generate (a few
    tokens), evaluate (the bundled multiple-choice set, results written to the bucket) and
    make_responses (its dataset written to the bucket)."""
    from qwen3_jax import hf, storage

    cfg, flat = tiny_params(seed=1)
    tok = f"{gcs_bucket}/tok/tokenizer.json"
    storage.write_bytes(tok, tiny_tokenizer(in_tmp_cwd / "tokenizer.json").read_bytes())
    hf_dir = f"{gcs_bucket}/hf/gen"
    hf.write_hf_folder(flat, cfg, hf_dir, dtype="float32", tokenizer=tok)
    assert (storage.path(hf_dir) / "tokenizer.json").exists()

    assert cli("generate").main(["--hf", hf_dir, "--prompt", "def f", "--max_new_tokens", "4", "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert 1 <= len(result["tokens"]) <= 4, out

    report = f"{gcs_bucket}/eval/mc.json"
    assert cli("evaluate").main(["--hf", hf_dir, "--mc", "tiny", "--mc_batch_size", "64", "--json", report]) == 0, \
        capsys.readouterr().err
    got = json.loads(storage.path(report).read_text())
    assert got["hf"] == hf_dir and got["multiple_choice"]["examples"] > 0

    prompts = in_tmp_cwd / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f"}) + "\n" + json.dumps({"prompt": "the fox"}) + "\n")
    out = f"{gcs_bucket}/responses"
    assert cli("make_responses").main(["--teacher", hf_dir, "--prompts", str(prompts), "--out", out, "--shards", "1",
                                       "--modes", "no_think", "--max_new_tokens", "3", "--temperature", "0",
                                       "--batch_size", "2", "--no_progress"]) == 0, capsys.readouterr().err
    stats = json.loads((storage.path(out) / "stats.json").read_text())
    assert stats["documents"] == 2 and (storage.path(out) / "shard-00000-of-00001.json").exists()
