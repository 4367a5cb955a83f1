"""qwen3-jax data pipeline: raw text → tokenized ArrayRecord shards → packed per-host batches (grain).

Modules
  text_tokenizer.py  load_tokenizer("qwen3" | HF folder / tokenizer.json | spm .model); train_sentencepiece()
                 (`python -m data_pipeline.text_tokenizer train-spm --out DIR --vocab-size 4096`)
  corpus.py      input formats (jsonl[.gz|.zst], parquet, txt) and the built-in corpus
                 builtin:python-stdlib (= -code: the stdlib's .py sources, + -docs: pydoc topics and docstrings)
  data_state.py     DataSave / DataRestore: the data position in an orbax checkpoint, per data shard
  prepare.py     `python data_pipeline/prepare.py --input … --tokenizer … --out DIR [--shards N] [--workers N]
                 [--strict] [--skip-bad-files] [--text-key text] [--dedup] [--decontaminate FILE …]
                 [--quality rules[,model:PATH]] [--runner local|DataflowRunner|…]`; prepare(...);
                 prepare_builtin(out_dir, tokenizer="qwen3")
  beam_run.py, beam_worker.py   prepare's pipelines on Apache Beam (local runner: N worker processes)
  write_stage.py tokenize + write one shard per element; shard_writer.py the shard files
  qa_*.py        the data QA stages: qa_store (order, reasons, qa/ files), qa_config (settings,
                 benchmarks), qa_text (MinHash, LSH, n-grams), qa_rules (Gopher / C4), qa_pipeline
                 (decontamination, rules, exact + near dedup on Beam), qa_model (bits per byte under
                 a model), qa_report (stats.json "qa", removed_samples.jsonl, report PNGs)
  shards.py      ShardSource: a prepared folder's shards checked against stats.json when opened; read errors
                 (ShardError) name the shard file and record
  pipeline.py    make_dataset(...) → DataIterator; DatasetSpec, Mixture, LengthBuckets; to_global(...)
  transforms.py  the grain steps between records and batches (parse, split long documents, rows, finish:
                 targets and loss mask), BATCH_KEYS / BATCH_DTYPES
  inspect_data.py  `python launch/inspect_data.py DIR… --tokenizer qwen3` (stats + decoded packed rows)
  cli.py         the tools' ArgumentParser: every multi-word flag in both spellings (--gin_param / --gin-param)

Failures are one line naming the file (or key) and the fix, exit code 2: an input file that cannot be read
whole (corpus.CorpusError; prepare --skip-bad-files leaves such files out and lists them in stats.json),
a run that yields no document, a shard that does not match its stats (shards.ShardError).

Contract with the training code
  it = make_dataset(data, seq_len=T, global_batch_size=B, seed=0)   # gin: make_dataset.*
  batch = next(it)   # dict of numpy arrays for THIS host, B_host = B // jax.process_count():
    tokens       int32   [B_host, T]  0 on padding
    targets      int32   [B_host, T]  the next token of the same document (already shifted inside each
                                       row); 0 where loss_mask is 0
    loss_mask    float32 [B_host, T]  1 where targets is valid: 0 on padding, on each document's last
                                       token (its <|endoftext|>), and on the last token of a document
                                       piece whose continuation is in another row; in a response
                                       dataset (launch/make_responses.py, stats "loss_on": "response")
                                       also where the target is one of the document's prompt tokens
    segment_ids  int32   [B_host, T]  0 = padding, documents numbered 1, 2, … within each row
    positions    int32   [B_host, T]  restart at 0 per document (pieces of a document longer than a row
                                       restart too, or continue with split_positions="continue")
  Training needs no shifting or masking of its own: loss = CE(logits(tokens), targets) · loss_mask;
  attention mask = same segment_ids (non-zero) and causal. Every document ends with <|endoftext|>
  (151643 for Qwen3), which the model learns to predict after the document's last token.
  With with_ids=True two more keys: doc_ids [B_host,T] and dataset_ids [B_host,T] (-1 = padding).

  State: it.get_state() → small JSON-serialisable dict; it.set_state(state) (on an iterator built with
  the same configuration; a mismatch raises) reproduces exactly the batches that followed. For
  orbax use `args.Composite(state=..., data=data_state.DataSave(it))` and restore with
  `data_state.DataRestore(it)`: one JSON file per data shard (make_dataset's data_shards,
  default one per process), so with data_shards fixed the batches and the saved position do not
  depend on the process count.

  Global arrays: to_global(batch, mesh, PartitionSpec(("data",), None)) → {key: jax.Array} through
  jax.make_array_from_process_local_data (spec for [B,T]; cut to rank for lower-rank arrays, or a
  dict of specs per key). The global batch is B_host × process_count.

Gin configurables: make_dataset, DatasetSpec(path, name=None, weight=1.0, length_range=None),
  Mixture(weights={name: w}, root=DIR | paths={name: DIR}, datasets=[DatasetSpec…]),
  LengthBuckets(source=Mixture|DatasetSpec|DIR, buckets=((16384, 32768, .75), (4096, 16384, .25))).
  Weights are shares of packed tokens (see make_dataset's `mix`). configs/data/*.gin has examples.

Built-in corpus: prepare_builtin(out_dir, tokenizer="qwen3" | "spm" | path) → {"code": DIR, "docs": DIR},
  idempotent; "spm" first trains a 4K sentencepiece model on the corpus (~1 s). Training runs cache it
  under corpus.BUILTIN_CACHE_DIR (runs/cache/stdlib-corpus; gin: stage_mixture.builtin_dir).
"""
