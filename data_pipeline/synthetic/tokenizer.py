"""The synthetic set's tokenizer: byte-level BPE trained on the generated text."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from data_pipeline.bench_formats import bench_q_prompt
from vrefer_jax.json_files import write_json

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<region>")


def corpus_texts(train: Sequence[Mapping], bench_q: Sequence[Mapping] = (),
                 bench_d: Sequence[Mapping] = ()) -> list[str]:
    """Text the tokenizer is trained on: every conversation turn and eval prompt/answer, in ChatML."""
    texts = []
    for s in train:
        for t in s["conversations"]:
            role = "user" if t["from"] == "human" else "assistant"
            texts.append(f"<|im_start|>{role}\n{t['value']}<|im_end|>\n")
    for e in bench_q:
        texts.append(bench_q_prompt(e["Question"], e["options"]) + " " + e["Answer"])
    texts.extend(e["caption"] for e in bench_d)
    texts.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    return texts


def train_tokenizer(texts: Sequence[str], out_dir: str, vocab_size: int = 1024) -> str:
    """Byte-level BPE (Qwen2-style pre-tokenizer) with `SPECIAL_TOKENS` as single ids; writes
    `tokenizer.json` and `tokenizer_config.json` (eos `<|im_end|>`, pad `<|endoftext|>`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from vrefer_jax.text.tokenizer import QWEN2_PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    write_json(os.path.join(out_dir, "tokenizer_config.json"),
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                "unk_token": None, "clean_up_tokenization_spaces": False,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<region>"],
                "tokenizer_class": "PreTrainedTokenizerFast"})
    return path
