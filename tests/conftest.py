import os

# libtpu in the environment (for AOT compile tests) must not grab the default backend here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The built-in corpus with a 512-token sentencepiece (the tiny presets' vocabulary), prepared
    once: `stage_mixture.builtin_dir` for runs, `prepare_builtin(data_dir / 'spm512', ...)` for folders."""
    from data_pipeline.prepare import prepare_builtin

    d = tmp_path_factory.mktemp("builtin")
    prepare_builtin(str(d / "spm512"), "spm", spm_vocab_size=512)
    return d
