import os

# libtpu in the environment (for AOT compile tests) must not grab the default backend here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# 8 fake CPU devices for the sharding tests, LLVM -O0 (train_utils.TEST_XLA_FLAGS); must be set
# before jax is imported anywhere.
from train_utils import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (AOT compiles for TPU topologies) refuses a second process on the machine unless told; the
# suite's workers (pytest-xdist) and their subprocesses may each load it at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


import pytest  # noqa: E402


def pytest_configure(config):
    """One persistent compilation cache per session (per xdist worker), for this process's own
    programs and the one-device launch/train.py subprocesses (tests/train_utils.env): the suite
    compiles the same tiny programs dozens of times (measured: test_train + test_handoff +
    test_hf_parity 307 -> 282 CPU s)."""
    import tempfile

    import jax

    cache = tempfile.mkdtemp(prefix="qwen3-jax-compile-cache-")
    os.environ["QWEN3_TEST_COMPILE_CACHE"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The built-in corpus with a 512-token sentencepiece (the tiny presets' vocabulary), prepared
    once per session (~20 s) and shared by every test that trains or evaluates on it:
    `stage_mixture.builtin_dir` for runs (tests/train_utils.tiny_args), `spm512` for the folders."""
    from data_pipeline.prepare import prepare_builtin

    d = tmp_path_factory.mktemp("builtin")
    prepare_builtin(str(d / "spm512"), "spm", spm_vocab_size=512)
    return d


@pytest.fixture(scope="session")
def spm512(data_dir):
    """{'code': folder, 'docs': folder, 'tokenizer': spm.model} of the session's prepared corpus."""
    from data_pipeline.prepare import prepare_builtin

    parts = prepare_builtin(str(data_dir / "spm512"), "spm", spm_vocab_size=512)  # prepared: a no-op
    return {**parts, "tokenizer": str(data_dir / "spm512" / "spm512" / "spm.model")}


from gcs_server import gcs_bucket, gcs_server  # noqa: E402,F401  (fixtures: a real GCS API server)
