"""vrefer-jax: VideoRefer (region-level video LLM) in JAX/Flax."""

__version__ = "0.1.0"
