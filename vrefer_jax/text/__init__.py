"""Text side: tokenizers (no `transformers` at run time), Qwen2 ChatML, multimodal prompt ids."""

from vrefer_jax.text.chat import (
    DEFAULT_SYSTEM,
    conversations_to_messages,
    move_modal_token,
    render_chat,
)
from vrefer_jax.text.multimodal import (
    MODAL_INDEX,
    build_inference_prompt,
    build_training_example,
    render_inference_prompt,
    tokenize_multimodal,
)
from vrefer_jax.text.tokenizer import (
    REGION_TOKEN,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_SYSTEM", "MODAL_INDEX", "REGION_TOKEN", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
    "build_inference_prompt", "build_training_example", "conversations_to_messages", "load_tokenizer",
    "move_modal_token", "render_chat", "render_inference_prompt", "tokenize_multimodal",
]
