"""Inference: generation settings, the jitted decode loop, the predictor and `vrefer-infer`."""

from vrefer_jax.inference.generate import GenerationOutput, generate_text, generate_multimodal
from vrefer_jax.inference.sampling import GenerationConfig

__all__ = ["GenerationConfig", "GenerationOutput", "generate_text", "generate_multimodal"]
