from qwen3_jax.model.transformer import Qwen3, abstract_model, create_model  # noqa: F401
