"""Shared fixtures of the data-pipeline tests: the built-in corpus prepared once per session."""
import pytest


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """{'code': dir, 'docs': dir}: the Python stdlib (sources, docs) tokenized with the real Qwen3 tokenizer."""
    from data_pipeline.prepare import prepare_builtin
    return prepare_builtin(str(tmp_path_factory.mktemp("stdlib")), "qwen3", shards=4, workers=2)
