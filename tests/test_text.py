"""Text side against `transformers` on a tiny Qwen2-style tokenizer built here (offline).

The reference label mask is a direct re-statement of the official `preprocess` with
`transformers`' `apply_chat_template` and a chunked tokeniser written in this file.
"""

import copy
import io
import json
import os

import pytest

from vrefer_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from vrefer_jax.text import (
    HFTokenizer,
    SentencePieceTokenizer,
    build_inference_prompt,
    build_training_example,
    conversations_to_messages,
    load_tokenizer,
    render_chat,
    render_inference_prompt,
    tokenize_multimodal,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-7B-Instruct's chat template (Jinja), as stored in its tokenizer_config.json.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = [
    "The red car is parked next to the tree. It isn't moving; they're waiting.",
    "What is <region> doing in the video? Describe <region> and <region> in detail.",
    "A person walks a dog.\nThe dog runs after the ball 123 times!\n\nThen it stops.",
    "Naïve café owners über alles, 2024-05-01: 3.14 apples   and   spaces.",
    "You are a helpful assistant. Please answer the question about the object.",
] * 10

CONVS = {
    "video_multi_turn": ("<video>", [
        {"from": "human", "value": "<video>\nWhat is <region> doing?"},
        {"from": "gpt", "value": "It walks the dog."},
        {"from": "human", "value": "And <region> and <region>? Compare   them."},
        {"from": "gpt", "value": "The first is red; the second isn't.\nBoth move 12 m."},
    ]),
    "video_tag_at_end_leading_gpt": ("<video>", [
        {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "Describe <region> in the video. <video>  "},
        {"from": "gpt", "value": " A café owner.  "},
        {"from": "human", "value": "Where is <region>?"},
        {"from": "gpt", "value": "Next to the tree."},
        {"from": "human", "value": "<region> ok?"},
        {"from": "gpt", "value": "Yes"},
    ]),
    "image": ("<image>", [
        {"from": "human", "value": "What is <region>?\n<image>"},
        {"from": "gpt", "value": "A dog."},
    ]),
    "text_only": (None, [
        {"from": "human", "value": "Hello <video> there <region>"},
        {"from": "gpt", "value": "Hi."},
    ]),
}


# ----------------------------------------------------------------------------- fixtures


def _train_qwen_like():
    """Byte-level BPE with Qwen2's normaliser / pre-tokeniser; specials appended after the vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tokenizers import AddedToken

    root = tmp_path_factory.mktemp("tok")
    tok = _train_qwen_like()
    n_base = tok.get_vocab_size(with_added_tokens=False)
    # 1) tokenizer.json without <region>: our loader must add it as the official code does.
    bare = root / "bare"
    bare.mkdir()
    tok.save(str(bare / "tokenizer.json"))
    # 2) fast tokenizer (as trained by VideoRefer: <region> added special) + Qwen2-Instruct config.
    tok.add_special_tokens([AddedToken("<region>", special=True, normalized=False)])
    fast = root / "fast"
    fast.mkdir()
    tok.save(str(fast / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN2_TEMPLATE,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
           "clean_up_tokenization_spaces": False, "model_max_length": 2048}
    (fast / "tokenizer_config.json").write_text(json.dumps(cfg))
    # 3) slow-tokenizer layout (vocab.json + merges.txt + added_tokens.json), like VideoRefer-7B.
    slow = root / "slow"
    slow.mkdir()
    tok.model.save(str(slow))
    added = {t: n_base + k for k, t in enumerate(SPECIALS + ["<region>"])}
    (slow / "added_tokens.json").write_text(json.dumps(added))
    scfg = dict(cfg, tokenizer_class="Qwen2Tokenizer", added_tokens_decoder={
        str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                 "single_word": False} for t, i in added.items()})
    (slow / "tokenizer_config.json").write_text(json.dumps(scfg))
    (slow / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
    return {"bare": str(bare), "fast": str(fast), "slow": str(slow), "n_base": n_base}


@pytest.fixture(scope="module")
def hf(dirs):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(dirs["fast"])


@pytest.fixture(scope="module")
def ours(dirs):
    return HFTokenizer.from_file(dirs["fast"])


# ----------------------------------------------------------------------------- reference (official)


def ref_tokenize_mm(hf, text, modal_token):
    """Official tokenizer_multimodal_token with a transformers tokenizer."""
    index = {"<image>": IMAGE_TOKEN_INDEX, "<video>": VIDEO_TOKEN_INDEX}.get(modal_token)
    if index is None:
        return hf(text, add_special_tokens=False).input_ids
    chunks = [hf(c, add_special_tokens=False).input_ids for c in text.split(modal_token)]
    ids = []
    for i in range(1, 2 * len(chunks)):
        ids.extend(chunks[i // 2]) if i % 2 else ids.append(index)
    return ids


def ref_preprocess(hf, source, modal_token):
    """Official preprocess_multimodal + preprocess on one sample."""
    source = copy.deepcopy(source)
    if modal_token is not None:
        for s in source:
            if modal_token in s["value"]:
                s["value"] = (modal_token + "\n" + s["value"].replace(modal_token, "").strip()).strip()
    roles = {"human": "user", "gpt": "assistant"}
    if roles[source[0]["from"]] != "user":
        source = source[1:]
    msgs = [{"role": roles[s["from"]], "content": s["value"]} for s in source]
    ids = ref_tokenize_mm(hf, hf.apply_chat_template(msgs, tokenize=False), modal_token)
    labels = list(ids)
    cur, prefix = 0, []
    for idx in range(1, len(source), 2):
        pair = [{"role": roles[source[idx - 1]["from"]], "content": source[idx - 1]["value"]},
                {"role": roles[source[idx]["from"]], "content": source[idx]["value"]}]
        instr = hf.apply_chat_template(prefix + pair[:1], tokenize=False, add_generation_prompt=True)
        conv = hf.apply_chat_template(prefix + pair, tokenize=False, add_generation_prompt=False)
        il, cl = len(ref_tokenize_mm(hf, instr, modal_token)), len(ref_tokenize_mm(hf, conv, modal_token))
        labels[cur:il] = [IGNORE_INDEX] * len(labels[cur:il])
        cur = cl
        prefix += pair
    return ids, labels


def _ids(out):
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else list(out)


# ----------------------------------------------------------------------------- chat template

MESSAGE_SETS = [
    [{"role": "user", "content": "<video>\nWhat is <region> doing?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <region>"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n"},
     {"role": "user", "content": " c "}, {"role": "assistant", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("k", range(len(MESSAGE_SETS)))
def test_render_chat_matches_template(hf, ours, k, gen):
    msgs = MESSAGE_SETS[k]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_chat(msgs, add_generation_prompt=gen) == want
    if msgs:  # token ids through the template, same text -> same ids
        assert ours.encode(render_chat(msgs, add_generation_prompt=gen)) == _ids(
            hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))


def test_render_chat_custom_system():
    msgs = [{"role": "user", "content": "q"}]
    assert render_chat(msgs, default_system=None) == "<|im_start|>user\nq<|im_end|>\n"
    assert render_chat(msgs, default_system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    # The template emits the system turn inside its message loop: nothing for no messages.
    assert render_chat([]) == "" and render_chat([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_conversations_to_messages():
    _, conv = CONVS["video_tag_at_end_leading_gpt"]
    msgs = conversations_to_messages(conv, "<video>")
    assert len(msgs) == 6 and msgs[0] == {"role": "user", "content": "<video>\nDescribe <region> in the video."}
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert msgs[1]["content"] == " A café owner.  "  # turns without the tag are untouched
    assert conversations_to_messages(conv)[0]["content"] == conv[1]["value"]  # no modal: no move
    with pytest.raises(ValueError):
        conversations_to_messages([{"from": "robot", "value": "x"}])
    with pytest.raises(ValueError):
        conversations_to_messages(conv, "<audio>")


# ----------------------------------------------------------------------------- tokenizer


def test_hf_tokenizer_matches_transformers(hf, ours):
    assert ours.vocab_size == len(hf)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (hf.eos_token_id, hf.pad_token_id, None)
    assert ours.eos_token == "<|im_end|>" and ours.region_id == hf.convert_tokens_to_ids("<region>")
    n_ids = 0
    for modal, conv in CONVS.values():
        text = render_chat(conversations_to_messages(conv, modal), add_generation_prompt=True)
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False).input_ids
        assert ids.count(ours.region_id) == text.count("<region>") >= 1
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        n_ids += len(ids)
    for text in CORPUS[:5] + ["café = cafe\u0301 ", "  lead\n\n\ttrail  ", "", "<region><region> 7<|im_end|>x"]:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids
    print(f"\nHF backend: {n_ids} conversation ids identical to transformers")


def test_decode_skips_specials(ours):
    ids = ours.encode("<|im_start|>assistant\nThe <region> runs.<|im_end|>\n<|endoftext|>")
    assert ours.decode(ids) == "assistant\nThe  runs.\n"
    assert ours.decode(ids, skip_special_tokens=False) == \
        "<|im_start|>assistant\nThe <region> runs.<|im_end|>\n<|endoftext|>"
    mm = [VIDEO_TOKEN_INDEX] + ours.encode("\nHi") + [IGNORE_INDEX]
    assert ours.decode(mm) == "\nHi" and ours.decode(mm, skip_special_tokens=False) == "<video>\nHi"
    assert ours.decode([]) == ""


def test_region_added_when_absent(dirs, ours):
    bare = HFTokenizer.from_file(os.path.join(dirs["bare"], "tokenizer.json"))
    assert bare.region_id == dirs["n_base"] + len(SPECIALS) == ours.region_id
    assert bare.region_id in bare.special_ids and bare.vocab_size == ours.vocab_size
    # No config: eos defaults to <|im_end|>, pad to <|endoftext|> (Qwen2-Instruct's).
    assert (bare.eos_id, bare.pad_id) == (ours.eos_id, ours.pad_id)
    assert bare.encode("x <region> y") == ours.encode("x <region> y")


def test_slow_layout_matches_transformers_qwen2(dirs, ours):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(dirs["slow"])
    slow = load_tokenizer(dirs["slow"])
    assert isinstance(slow, HFTokenizer) and slow.vocab_size == len(ref) == ours.vocab_size
    assert (slow.eos_id, slow.pad_id) == (ref.eos_token_id, ref.pad_token_id)
    assert slow.special_ids == ours.special_ids
    for modal, conv in CONVS.values():
        text = render_chat(conversations_to_messages(conv, modal))
        assert slow.encode(text) == ref(text, add_special_tokens=False).input_ids == ours.encode(text)
    for text in CORPUS[:5] + ["café = cafe\u0301 ", "  lead\n\n\ttrail  "]:
        assert slow.encode(text) == ref(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- multimodal ids


def test_tokenize_multimodal(hf, ours):
    text = render_inference_prompt("What is <region> doing?")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<video>\nWhat is <region> doing?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenize_multimodal(ours, text, "<video>")
    assert ids == ref_tokenize_mm(hf, text, "<video>")
    assert ids.count(VIDEO_TOKEN_INDEX) == 1
    pos = ids.index(VIDEO_TOKEN_INDEX)
    head, tail = text.split("<video>")
    assert ids[:pos] == ours.encode(head) and ids[pos + 1:] == ours.encode(tail)
    assert ids[pos + 1] == ours.encode("\n")[0]  # the "\n" after <video> starts the next chunk
    assert build_inference_prompt(ours, "What is <region> doing?") == ids
    # several tags; a tag at the very start/end gives empty chunks
    t2 = "<video>a<video><video>b <video>"
    assert tokenize_multimodal(ours, t2) == ref_tokenize_mm(hf, t2, "<video>")
    assert tokenize_multimodal(ours, t2)[:1] == [VIDEO_TOKEN_INDEX]
    # image: -200; <video> is then plain text; None: plain tokenisation
    t3 = "<image>\n<video> x"
    assert tokenize_multimodal(ours, t3, "<image>") == [IMAGE_TOKEN_INDEX] + ours.encode("\n<video> x")
    assert tokenize_multimodal(ours, t3, None) == ours.encode(t3)
    with pytest.raises(ValueError):
        tokenize_multimodal(ours, t3, "<audio>")


def test_inference_prompt_variants(hf, ours):
    img = build_inference_prompt(ours, "Describe <region>.", modal="image")
    assert img.count(IMAGE_TOKEN_INDEX) == 1 and VIDEO_TOKEN_INDEX not in img
    txt = render_inference_prompt("Hi", modal="text")
    assert "<|im_start|>user\n\nHi<|im_end|>" in txt
    assert build_inference_prompt(ours, "Hi", modal="text") == ours.encode(txt)
    multi = [{"role": "user", "content": "Q1 <region>"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}]
    want = hf.apply_chat_template([dict(multi[0], content="<video>\nQ1 <region>")] + multi[1:],
                                  tokenize=False, add_generation_prompt=True)
    assert render_inference_prompt(multi) == want and multi[0]["content"] == "Q1 <region>"
    sys_text = render_inference_prompt("Q", system_message="SYS")
    assert sys_text.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<video>\nQ")
    with pytest.raises(ValueError):
        build_inference_prompt(ours, "Q", modal="audio")


# ----------------------------------------------------------------------------- training labels


@pytest.mark.parametrize("name", list(CONVS))
def test_label_mask_matches_official(hf, ours, name):
    modal, conv = CONVS[name]
    ids, labels = build_training_example(ours, conv, modal)
    ref_ids, ref_labels = ref_preprocess(hf, conv, modal)
    assert ids == ref_ids and labels == ref_labels
    assert len(ids) == len(labels)
    # Supervised spans are exactly "reply<|im_end|>\n" for each assistant turn.
    spans, run = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if run:
                spans.append(run)
            run = []
        else:
            assert lab == i
            run.append(i)
    if run:
        spans.append(run)
    replies = [m["content"] for m in conversations_to_messages(conv, modal) if m["role"] == "assistant"]
    assert [ours.decode(s, skip_special_tokens=False) for s in spans] == [r + "<|im_end|>\n" for r in replies]
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i < 0)
    print(f"\n{name}: {len(ids)} ids, {sum(l != IGNORE_INDEX for l in labels)} supervised, identical to reference")


def test_label_mask_errors(ours):
    with pytest.raises(ValueError):
        build_training_example(ours, [{"from": "human", "value": "a"}])
    with pytest.raises(ValueError):
        build_training_example(ours, [{"from": "gpt", "value": "a"}])


# ----------------------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    # LLaMA-style settings: identity normalisation, whitespace kept, byte fallback, dummy prefix.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
        user_defined_symbols=["<region>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_sentencepiece(sp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tok = SentencePieceTokenizer.from_file(sp_path, added_tokens=("<region>", "<obj>"))
    assert isinstance(load_tokenizer(os.path.dirname(sp_path)), SentencePieceTokenizer)
    n = sp.get_piece_size()
    r = tok.region_id
    assert r == sp.piece_to_id("<region>") < n and tok.token_to_id("<obj>") == n and tok.vocab_size == n + 1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # no pad piece: unk, as the official trainer
    text = "What is <region> doing? Compare <region>,<region> with <obj> 😀 café\nnext  line"
    ids = tok.encode(text)
    assert ids.count(r) == 3 and ids.count(n) == 1
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert "<region>" not in tok.decode(ids) and "<obj>" in tok.decode(ids)  # <obj> is not special
    # <region> is a user-defined piece: sentencepiece keeps it whole, same ids as sp itself.
    assert tok.encode("What is <region> doing?") == sp.encode("What is <region> doing?")
    # control pieces written in the text become their ids and are skipped when decoding
    ids = tok.encode("<s>Hi</s>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == "Hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>Hi</s>"
    mm = tokenize_multimodal(tok, "<video>\nWhat is <region>?")
    assert mm[0] == VIDEO_TOKEN_INDEX and mm[1:] == tok.encode("\nWhat is <region>?") and r in mm
