"""VRVL3 prompts and labels (`vrefer_jax.text.vl3_prompt`) on a tiny Qwen2-style tokenizer built here.

Independent references: the rendered strings quoted in the VRVL3 reference (§9.2, §13), a Jinja
template written in this file from §9.2's description (run by jinja2's sandbox with transformers'
options, the way `apply_chat_template` runs the official one), the official way of expanding visual
tokens (repeat `<image>` in the string, then tokenise), and label masks spelled out token by token.
"""

import json

import numpy as np
import pytest

from vrefer_jax import vl3_batch
from vrefer_jax.config import IGNORE_INDEX
from vrefer_jax.text import HFTokenizer
from vrefer_jax.text import vl3_prompt as vp

QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "<|im_start|>user\nWhat is the object doing in the video?<|im_end|>\n",
    "<|im_start|>assistant\nIt walks the dog. It sits next to the tree.<|im_end|>\n",
    "Please describe in detail the marked object in the video. Time 0.0s: Time 1.5s:",
    "(A) walking (B) running. Answer with the option's letter from the given choices directly.",
] * 20
Q = 4  # region_token_num of these tests


def _bpe():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS])
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A Qwen2.5-like tokenizer folder without the VRVL3 tokens (they are added at load time)."""
    d = tmp_path_factory.mktemp("vl3tok")
    _bpe().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return vp.load_vl3_tokenizer(str(tok_dir))


def enc(tok, text):
    return tok.encode(text)


def official_ids(tok, text, tokens_per_image):
    """The official way: repeat the i-th `<image>` in the string, then tokenise the whole string."""
    chunks = text.split(vp.IMAGE_TOKEN)
    assert len(chunks) == len(tokens_per_image) + 1
    out = chunks[0]
    for n, c in zip(tokens_per_image, chunks[1:]):
        out += vp.IMAGE_TOKEN * n + c
    return tok.encode(out)


# ----------------------------------------------------------------------------- tokens, times


def test_special_tokens_added_in_order(tok, tok_dir):
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert [tok.token_to_id(t) for t in vp.SPECIAL_TOKENS] == [n, n + 1, n + 2, n + 3]
    assert vp.SPECIAL_TOKENS == ("<image>", "<|stream_start|>", "<|stream_end|>", "<REGION>")
    assert tok.token_to_id("<region>") is None  # VideoRefer-7B's token is not part of VRVL3's vocabulary
    assert tok.eos_id == tok.token_to_id("<|im_end|>")
    # the generation prefix is 3 tokens, as with Qwen's vocabulary (the labels rely on it)
    assert len(tok.encode(vp.GENERATION_PROMPT)) == 3


def _jinja():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # transformers compiles chat templates with these options
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


TIMES = [0.0, 0.25, 0.75, 1.0, 1.05, 1.25, 2.675, 12.25, 0.15, 1 / 3, 7.0, 123.45]


def test_time_label_matches_jinja_round():
    # §9.2: Python's round on floats (ties to even on the exact binary value)
    assert vp.time_label(0.25) == "Time 0.2s:"
    assert vp.time_label(0.75) == "Time 0.8s:"
    assert vp.time_label(1.05) == "Time 1.1s:"  # 1.05 is stored slightly above 1.05
    assert vp.time_label(1.0) == "Time 1.0s:"
    assert vp.time_label(0.0) == "Time 0.0s:"
    assert vp.time_label(np.float64(1.05)) == "Time 1.0s:"  # numpy's rounding (official mp4 timestamps)
    assert vp.time_label(2) == "Time 2s:"
    # the template expression, run by jinja2 on the same values and types
    expr = _jinja().from_string("{{ 'Time ' + t | round(1) | string + 's:' }}")
    values = TIMES + [np.float64(t) for t in TIMES] + list(np.arange(0.0, 3.0, 0.35)) + [3, np.float32(1.05)]
    for t in values:
        assert vp.time_label(t) == expr.render(t=t), repr(t)
    for bad in (float("nan"), float("inf"), "1.0", True, None):
        with pytest.raises(ValueError, match="timestamps"):
            vp.time_label(bad)


# ----------------------------------------------------------------------------- regions


def test_expand_regions():
    assert vp.expand_regions("a <region> b <region>.", [2, 1]) == "a [<REGION><REGION>] b [<REGION>]."
    assert vp.expand_regions("<region><region>", [0, 3]) == "[][<REGION><REGION><REGION>]"
    assert vp.expand_regions("no region", []) == "no region"
    with pytest.raises(ValueError, match=r"2 <region> placeholders but 3 region token counts"):
        vp.expand_regions("<region> and <region>", [1, 1, 1])
    with pytest.raises(ValueError, match=r"1 <region> placeholders but 0 region token counts"):
        vp.expand_regions("<region>", [])
    with pytest.raises(ValueError, match=">= 0"):
        vp.expand_regions("<region>", [-1])


# ----------------------------------------------------------------------------- rendering

GEN = "<|im_start|>assistant\n"


def test_rendered_examples_of_the_reference():
    # §9.2 image example (the demo's caption prompt, tag first)
    got = vp.render_inference("<image>\nPlease describe the <region> in the image in detail.", modal="image",
                              region_token_counts=[2])
    assert got == ("<|im_start|>user\n<image>\nPlease describe the [<REGION><REGION>] in the image in detail."
                   "<|im_end|>\n<|im_start|>assistant\n")
    # §9.2 video example: no tag -> frames first
    got = vp.render_inference("Q?", modal="video", num_frames=2, timestamps=[0.0, 1.0])
    assert got == "<|im_start|>user\nTime 0.0s:<image>,Time 1.0s:<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    # §9.2 / §13 Bench-D: the tag after the text -> text first, no separator, fps 4 times
    bench_d = "Please describe in detail the marked object <region> in the video.\n<video>"
    got = vp.render_inference(bench_d, modal="video", num_frames=3, timestamps=[0.0, 0.25, 0.5],
                              region_token_counts=[1])
    assert got == ("<|im_start|>user\nPlease describe in detail the marked object [<REGION>] in the video."
                   "Time 0.0s:<image>,Time 0.2s:<image>,Time 0.5s:<image>\n<|im_end|>\n" + GEN)
    # the same layout from an untagged instruction with text_first
    untagged = bench_d.replace("\n<video>", "")
    assert vp.render_inference(untagged, modal="video", num_frames=3, timestamps=[0.0, 0.25, 0.5],
                               region_token_counts=[1], text_first=True) == got
    # §13 Bench-Q (fps 1, tag auto-prepended)
    q = ("What is <region> doing?" + " " + " ".join(["(A) walking", "(B) running"])
         + ". Answer with the option's letter from the given choices directly.")
    got = vp.render_inference(q, modal="video", num_frames=3, timestamps=[0.0, 1.0, 2.0], region_token_counts=[3])
    assert got == ("<|im_start|>user\nTime 0.0s:<image>,Time 1.0s:<image>,Time 2.0s:<image>\n"
                   "What is [<REGION><REGION><REGION>] doing? (A) walking (B) running. Answer with the option's "
                   "letter from the given choices directly.<|im_end|>\n" + GEN)
    # §13 HC-STVG (tag first with a newline: the chunk is stripped)
    got = vp.render_inference("<video>\nPlease describe the important aspects of the marked object <region> in "
                              "the video. Output in one sentense.", modal="video", num_frames=1,
                              timestamps=[0.0], region_token_counts=[2])
    assert got == ("<|im_start|>user\nTime 0.0s:<image>\nPlease describe the important aspects of the marked "
                   "object [<REGION><REGION>] in the video. Output in one sentense.<|im_end|>\n" + GEN)


# A Jinja statement of §9.2, written here from the reference's description (not the official text).
TEMPLATE_9_2 = """\
{% for m in messages %}
{{- '<|im_start|>' + m['role'] + '\n' -}}
{% if m['content'] is string %}{{- m['content'] -}}{% else %}{% for c in m['content'] %}
{% if c['type'] == 'text' %}{{- c['text'] -}}
{% elif c['type'] == 'image' %}{{- '<image>\n' -}}
{% else %}{% for i in range(c['num_frames']) %}
{% if 'time' in c %}{{- 'Time ' + c['time'][i] | round(1) | string + 's:' -}}{% endif %}
{{- '<image>' + (',' if i < c['num_frames'] - 1 else '\n') -}}
{% endfor %}{% endif %}{% endfor %}{% endif %}
{{- '<|im_end|>\n' -}}
{% endfor %}
{% if add_generation_prompt %}{{- '<|im_start|>assistant\n' -}}{% endif %}"""

MESSAGE_SETS = [
    [{"role": "user", "content": vp.build_user_content("What is <region>?", "video", 3,
                                                       [np.float64(0.25), np.float64(1.05), 2.5])}],
    [{"role": "user", "content": vp.build_user_content("  Describe it.  <image>  and more <image>", "image")},
     {"role": "assistant", "content": " A dog.\n"},
     {"role": "user", "content": vp.build_user_content("Why?", "text")}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": vp.build_user_content("Q", "video", 2)},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": []}],
]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("k", range(len(MESSAGE_SETS)))
def test_render_matches_a_jinja_statement_of_the_template(k, gen):
    want = _jinja().from_string(TEMPLATE_9_2).render(messages=MESSAGE_SETS[k], add_generation_prompt=gen)
    assert vp.render(MESSAGE_SETS[k], add_generation_prompt=gen) == want


def test_build_user_content():
    video = {"type": "video", "num_frames": 2, "time": [0.0, 0.5]}
    assert vp.build_user_content(" Hi  there \n<video>\n", "video", 2, [0.0, 0.5]) == [
        {"type": "text", "text": "Hi  there"}, video]
    assert vp.build_user_content("Hi", "video", 2, [0.0, 0.5]) == [video, {"type": "text", "text": "Hi"}]
    assert vp.build_user_content("Hi", "video", 2, [0.0, 0.5], text_first=True) == [
        {"type": "text", "text": "Hi"}, video]
    assert vp.build_user_content("<image>", "image") == [{"type": "image"}]
    assert vp.build_user_content("a<image>b", "image") == [{"type": "text", "text": "a"}, {"type": "image"},
                                                           {"type": "text", "text": "b"}]
    assert vp.build_user_content(" plain ", "text") == [{"type": "text", "text": "plain"}]
    assert vp.build_user_content("x", "video", 1) == [{"type": "video", "num_frames": 1},
                                                      {"type": "text", "text": "x"}]
    with pytest.raises(ValueError, match="modal 'audio'"):
        vp.build_user_content("x", "audio")
    with pytest.raises(ValueError, match="timestamps: 1 values for num_frames=2"):
        vp.build_user_content("x", "video", 2, [0.0])
    with pytest.raises(ValueError, match="num_frames"):
        vp.build_user_content("x", "video", 0)
    with pytest.raises(ValueError, match="literal <image>"):
        vp.build_user_content("x <image>", "video", 1)
    with pytest.raises(ValueError, match="modal 'text'"):
        vp.build_user_content("<video> x", "text")
    with pytest.raises(ValueError, match="timestamps"):
        vp.build_user_content("x", "image", timestamps=[0.0])


# ----------------------------------------------------------------------------- ids and indices


def test_tokenize_with_visuals(tok):
    text = vp.render_inference("What are <region> and <region>?", modal="video", num_frames=3,
                               timestamps=[0.0, 0.5, 1.0], region_token_counts=[2, 1])
    tpi = [4, 0, 2]  # the middle frame fully pruned
    img, reg = tok.token_to_id("<image>"), tok.token_to_id("<REGION>")
    ids, vis, rix = vp.tokenize_with_visuals(tok, text, tpi, img, region_token_num=Q)
    assert ids.dtype == vis.dtype == rix.dtype == np.int32 and len(ids) == len(vis) == len(rix)
    assert ids.tolist() == official_ids(tok, text, tpi)
    assert (ids == img).sum() == 6
    assert vis[ids == img].tolist() == list(range(6)) and (vis[ids != img] == -1).all()
    assert rix[ids == reg].tolist() == [0, 1, Q] and (rix[ids != reg] == -1).all()
    # the frame runs sit after their "Time ...s:" labels: 4 rows after frame 0's, none after frame 1's
    assert tok.decode(ids[: np.flatnonzero(ids == img)[0]], skip_special_tokens=False).endswith("Time 0.0s:")
    # explicit counts give the same answer; mismatching ones are refused
    again = vp.tokenize_with_visuals(tok, text, tpi, region_token_num=Q, region_token_counts=[2, 1])
    assert all((a == b).all() for a, b in zip(again, (ids, vis, rix)))
    for bad in ([1, 2], [1, 1, 1]):  # the right total, split across the brackets differently
        with pytest.raises(ValueError, match=r"do not match the runs of <REGION> tokens in the prompt \[2, 1\]"):
            vp.tokenize_with_visuals(tok, text, tpi, region_token_num=Q, region_token_counts=bad)
    # a 0-token region keeps its number
    zero = vp.render_inference("<region> <region> <region>", modal="image", region_token_counts=[1, 0, 2])
    _, _, zrix = vp.tokenize_with_visuals(tok, zero, [1], region_token_num=Q, region_token_counts=[1, 0, 2])
    assert zrix[zrix >= 0].tolist() == [0, 2 * Q, 2 * Q + 1]
    with pytest.raises(ValueError, match="has 3 <REGION> tokens but the counts \\[2\\] sum to 2"):
        vp.tokenize_with_visuals(tok, text, tpi, region_token_num=Q, region_token_counts=[2])
    with pytest.raises(ValueError, match="more than region_token_num=1"):
        vp.tokenize_with_visuals(tok, text, tpi, region_token_num=1)
    with pytest.raises(ValueError, match="3 <image> tokens .* but 2 counts"):
        vp.tokenize_with_visuals(tok, text, [4, 0], region_token_num=Q)
    with pytest.raises(ValueError, match="image_token_id=7 but the tokenizer's <image> is"):
        vp.tokenize_with_visuals(tok, text, tpi, 7, region_token_num=Q)
    with pytest.raises(ValueError, match="region_token_id"):
        vp.tokenize_with_visuals(tok, text, tpi, region_token_num=Q, region_token_id=img)

    # the fields satisfy the batch contract's host checks (patches: one per visual token and region cell)
    V, R = 6, 2
    ex = vl3_batch.Example(
        sample_id="s", input_ids=ids, visual_index=vis, region_index=rix,
        patches=np.zeros((V + 1, 3), np.float32), patch_segments=np.ones(V + 1, np.int32),
        patch_coords=np.zeros((V + 1, 2), np.int32), visual_patches=np.arange(V, dtype=np.int32)[:, None],
        region_cells=np.full((R, 2, 4), -1, np.int32), region_weights=np.zeros((R, 2, 4), np.float32),
        region_num_cells=np.array([2, 1], np.int32), region_init=np.zeros((R, Q), np.int32))
    ex.region_cells[:, :, 0] = V
    batch = vl3_batch.stack([vl3_batch.pad_example(ex, L=len(ids) + 3, N=V + 1, V=V, R=R, C=2, Q=Q,
                                                   pad_token_id=tok.pad_id)])
    vl3_batch.check_batch(batch, image_token_id=img, region_token_id=reg, region_token_num=Q)


def test_tokenizer_without_vl3_tokens_is_refused(tok_dir):
    plain = HFTokenizer.from_file(str(tok_dir))  # VideoRefer-7B's loader: adds <region>, not <image>
    with pytest.raises(ValueError, match="image_token_id: the tokenizer does not encode <image> as one token"):
        vp.tokenize_with_visuals(plain, "<image>", [1], region_token_num=Q)


def test_training_example_labels_token_by_token(tok):
    conversation = [
        {"role": "user", "content": "<video>\nWhat is <region> doing?"},
        {"role": "assistant", "content": "It walks the dog."},
        {"role": "user", "content": "And <region>?"},
        {"role": "assistant", "content": "It sits."},
    ]
    tpi = [3, 2]
    ids, labels, vis, rix = vp.training_example(
        tok, conversation, modal="video", num_frames=2, timestamps=[0.0, 0.5], tokens_per_image=tpi,
        region_token_counts=[2, 1], region_token_num=Q)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    img, reg = tok.token_to_id("<image>"), tok.token_to_id("<REGION>")

    # each message on its own, the official way; the parts concatenated
    user1 = official_ids(tok, "<|im_start|>user\nTime 0.0s:<image>,Time 0.5s:<image>\nWhat is "
                              "[<REGION><REGION>] doing?<|im_end|>\n", tpi)
    user2 = enc(tok, "<|im_start|>user\nAnd [<REGION>]?<|im_end|>\n")
    asst = [[im_start] + enc(tok, "assistant\n") + enc(tok, a) + [im_end] + enc(tok, "\n")
            for a in ("It walks the dog.", "It sits.")]
    assert asst[0] == enc(tok, "<|im_start|>assistant\nIt walks the dog.<|im_end|>\n")
    assert ids.tolist() == user1 + asst[0] + user2 + asst[1]

    # labels, token by token: users ignored; assistant: 3 prefix tokens and the final "\n" ignored
    want = [IGNORE_INDEX] * len(user1)
    for k, a in enumerate(("It walks the dog.", "It sits.")):
        want += [IGNORE_INDEX] * 3 + enc(tok, a) + [im_end] + [IGNORE_INDEX]
        if k == 0:
            want += [IGNORE_INDEX] * len(user2)
    assert labels.tolist() == want
    # read back: exactly the answers with their <|im_end|> are supervised
    spans = np.split(np.flatnonzero(labels != IGNORE_INDEX), np.flatnonzero(np.diff(np.flatnonzero(
        labels != IGNORE_INDEX)) != 1) + 1)
    assert [tok.decode(ids[s], skip_special_tokens=False) for s in spans] == [
        "It walks the dog.<|im_end|>", "It sits.<|im_end|>"]
    assert (labels[ids == img] == IGNORE_INDEX).all() and (labels[ids == reg] == IGNORE_INDEX).all()

    # indices: 5 visual rows in order; region 0 in the first turn, region 1 in the second
    assert vis[ids == img].tolist() == list(range(5)) and (vis[ids != img] == -1).all()
    assert rix[ids == reg].tolist() == [0, 1, Q]
    assert np.flatnonzero(ids == reg)[-1] > len(user1) + len(asst[0])

    # the inference prompt of the first turn is the first user part + the generation prompt
    got, gvis, grix = vp.inference_prompt(tok, conversation[0]["content"], modal="video", num_frames=2,
                                          timestamps=[0.0, 0.5], tokens_per_image=tpi, region_token_counts=[2],
                                          region_token_num=Q)
    assert got.tolist() == user1 + enc(tok, GEN)
    assert gvis.tolist() == vis[: len(got)].tolist() and grix[got == reg].tolist() == [0, 1]
    # with the history: the whole conversation up to the last user turn
    got, _, grix = vp.inference_prompt(tok, conversation[:3], modal="video", num_frames=2, timestamps=[0.0, 0.5],
                                       tokens_per_image=tpi, region_token_counts=[2, 1], region_token_num=Q)
    assert got.tolist() == user1 + asst[0] + user2 + enc(tok, GEN)
    assert grix[got == reg].tolist() == [0, 1, Q]


def test_training_example_image_and_text(tok):
    ids, labels, vis, rix = vp.training_example(
        tok, [{"role": "user", "content": "What is <region>?"}, {"role": "assistant", "content": "A dog."}],
        modal="image", tokens_per_image=[4], region_token_counts=[3], region_token_num=Q)
    text = "<|im_start|>user\n<image>\nWhat is [<REGION><REGION><REGION>]?<|im_end|>\n"
    user = official_ids(tok, text, [4])
    assert ids.tolist() == user + enc(tok, "<|im_start|>assistant\nA dog.<|im_end|>\n")
    assert (labels[: len(user)] == IGNORE_INDEX).all() and vis.max() == 3 and rix.max() == 2

    ids, labels, vis, rix = vp.training_example(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
              {"role": "assistant", "content": "Hello."}],
        modal="text", tokens_per_image=[], region_token_num=Q)
    assert ids.tolist() == enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                    "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert tok.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=False) == "Hello.<|im_end|>"
    assert (vis == -1).all() and (rix == -1).all()


def test_conversation_errors(tok):
    user, asst = {"role": "user", "content": "x <region>"}, {"role": "assistant", "content": "y"}
    kw = dict(modal="video", num_frames=1, tokens_per_image=[1], region_token_num=Q)
    with pytest.raises(ValueError, match="1 <region> placeholders but 2 region token counts"):
        vp.training_example(tok, [user, asst], region_token_counts=[1, 1], **kw)
    with pytest.raises(ValueError, match="first non-system message must be a user turn"):
        vp.training_example(tok, [asst, user, asst], region_token_counts=[1], **kw)
    with pytest.raises(ValueError, match="no assistant message"):
        vp.training_example(tok, [user], region_token_counts=[1], **kw)
    with pytest.raises(ValueError, match=r"conversation\[1\]"):
        vp.training_example(tok, [user, {"role": "gpt", "content": "y"}], region_token_counts=[1], **kw)
    with pytest.raises(ValueError, match="assistant message contains <image>"):
        vp.training_example(tok, [user, {"role": "assistant", "content": "<image>"}], region_token_counts=[1], **kw)
    with pytest.raises(ValueError, match="last message must be a user turn"):
        vp.render_inference([user, asst], modal="video", num_frames=1, region_token_counts=[1])
    with pytest.raises(ValueError, match="empty"):
        vp.render_inference([], modal="video", num_frames=1)
