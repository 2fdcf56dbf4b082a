"""VRVL3 checkpoints: config.json <-> VL3Config, import (into shardings), export, store, CLI, param counts.

The official folder is built here from the reference alone (§12 key names, §2/§3 sizes), not from
our key rules: random tensors under `Videollama3Qwen2ForCausalLM`'s state-dict names in PyTorch
layout, two safetensors shards + index, a config.json with the fields the official code reads, a
word-level tokenizer with the Qwen2 specials and the VRVL3 tokens (§9.1), a generation config.
"""

import dataclasses
import json
import os
import pathlib

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from safetensors.numpy import save_file

from vrefer_jax import families
from vrefer_jax.checkpoints import cli, hf_config, hf_import, key_map, st_io, store
from vrefer_jax.checkpoints import vl3_hf_config as vcfg
from vrefer_jax.checkpoints.key_map import KeyMappingError
from vrefer_jax.checkpoints.vl3_hf import TiedHeadMismatch, export_vl3, import_vl3
from vrefer_jax.sharding import logical_axis_rules
from vrefer_jax.vl3_config import VL3Config

ROOT = pathlib.Path(__file__).resolve().parents[1]
GINS = ROOT / "configs" / "models"
FAMILY = "videorefer_videollama3"
N_WORDS = 505
# Qwen2 specials, then the VRVL3 tokens in the order the official code adds them (§9.1).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|stream_start|>", "<|stream_end|>",
            "<REGION>"]
IMAGE_ID, REGION_ID, PAD_ID, EOS_ID = 508, 511, 505, 507
GENERATION = {"bos_token_id": PAD_ID, "do_sample": False, "eos_token_id": [EOS_ID, PAD_ID], "pad_token_id": PAD_ID,
              "repetition_penalty": 1.05, "top_k": 20, "top_p": 0.8, "temperature": 0.7}
# §12: every field the official code reads, and the written-but-unused ones; plus the Qwen2 fields.
SECTION_12 = ["model_type", "vision_encoder", "mm_projector_type", "mm_hidden_size", "spatial_merge_size",
              "mm_max_length", "use_token_compression", "image_token_index", "region_token_index", "torch_dtype",
              "mm_attn_implementation", "mm_vision_select_layer", "mm_vision_select_feature", "image_aspect_ratio",
              "image_size", "image_token_length", "is_alignment", "max_frames", "llm_lr", "mm_projector_lr",
              "vision_encoder_lr", "region_encoder_lr", "tokenizer_model_max_length", "tokenizer_padding_side",
              "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings"]


def gin_config(name: str) -> VL3Config:
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(GINS / name)], [])
    try:
        return VL3Config()
    finally:
        gin.clear_config()


def tiny_cfg(tied: bool = False) -> VL3Config:
    c = gin_config("vl3_tiny.gin")
    return c.replace(text=dataclasses.replace(c.text, tie_word_embeddings=tied))


# ----------------------------------------------------------------------------- the official layout


def sizes_of(cfg: VL3Config) -> dict:
    v, t = cfg.vision, cfg.text
    return dict(E=v.hidden_size, M=v.intermediate_size, Lv=v.num_hidden_layers, C=v.num_channels, p=v.patch_size,
                H=t.hidden_size, I=t.intermediate_size, Lt=t.num_hidden_layers, nq=t.num_attention_heads,
                nkv=t.num_key_value_heads, V=t.vocab_size, tied=t.tie_word_embeddings)


def official_shapes(s: dict) -> dict[str, tuple]:
    """`Videollama3Qwen2ForCausalLM`'s state dict (§12), PyTorch shapes, from the sizes alone."""
    E, M, H, I, V = s["E"], s["M"], s["H"], s["I"], s["V"]
    hd = H // s["nq"]
    out = {}
    vp = "model.vision_encoder.vision_encoder.vision_model."
    out[vp + "embeddings.patch_embedding.weight"] = (E, s["C"], s["p"], s["p"])
    out[vp + "embeddings.patch_embedding.bias"] = (E,)
    for i in range(s["Lv"]):
        lp = f"{vp}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[f"{lp}{n}.weight"] = out[f"{lp}{n}.bias"] = (E,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{lp}self_attn.{n}.weight"], out[f"{lp}self_attn.{n}.bias"] = (E, E), (E,)
        out[f"{lp}mlp.fc1.weight"], out[f"{lp}mlp.fc1.bias"] = (M, E), (M,)
        out[f"{lp}mlp.fc2.weight"], out[f"{lp}mlp.fc2.bias"] = (E, M), (E,)
    out[vp + "post_layernorm.weight"] = out[vp + "post_layernorm.bias"] = (E,)
    for prefix in ("model.mm_projector.readout.", "model.region_encoder.feat_linear."):
        out[prefix + "0.weight"], out[prefix + "0.bias"] = (H, E), (H,)
        out[prefix + "2.weight"], out[prefix + "2.bias"] = (H, H), (H,)
    out["model.embed_tokens.weight"] = (V, H)
    for i in range(s["Lt"]):
        lp = f"model.layers.{i}."
        for n, rows in (("q_proj", s["nq"] * hd), ("k_proj", s["nkv"] * hd), ("v_proj", s["nkv"] * hd)):
            out[f"{lp}self_attn.{n}.weight"], out[f"{lp}self_attn.{n}.bias"] = (rows, H), (rows,)
        out[f"{lp}self_attn.o_proj.weight"] = (H, s["nq"] * hd)
        out[f"{lp}mlp.gate_proj.weight"] = out[f"{lp}mlp.up_proj.weight"] = (I, H)
        out[f"{lp}mlp.down_proj.weight"] = (H, I)
        out[f"{lp}input_layernorm.weight"] = out[f"{lp}post_attention_layernorm.weight"] = (H,)
    out["model.norm.weight"] = (H,)
    if not s["tied"]:
        out["lm_head.weight"] = (V, H)
    return out


def official_tensors(cfg: VL3Config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in official_shapes(sizes_of(cfg)).items():
        if "norm" in name and name.endswith("weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


def official_config(cfg: VL3Config, vision_encoder: str) -> dict:
    """A config.json as the official trainer writes it (transformers 4.46 spelling), no nested vision dict."""
    t = cfg.text
    return {
        "architectures": ["Videollama3Qwen2ForCausalLM"], "model_type": "videollama3_qwen2",
        "attention_dropout": 0.0, "bos_token_id": PAD_ID, "eos_token_id": EOS_ID, "hidden_act": "silu",
        "hidden_size": t.hidden_size, "initializer_range": 0.02, "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings, "max_window_layers": 21,
        "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": True, "vocab_size": t.vocab_size,
        "vision_encoder": vision_encoder, "mm_vision_encoder": vision_encoder, "mm_hidden_size": cfg.vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1, "mm_vision_select_feature": "patch",
        "spatial_merge_size": 2, "mm_max_length": 8192, "use_token_compression": True,
        "image_token_index": IMAGE_ID, "region_token_index": REGION_ID, "image_aspect_ratio": "square",
        "image_size": 28, "image_token_length": 1, "is_alignment": False, "max_frames": 180, "llm_lr": 1e-5,
        "mm_projector_lr": 1e-5, "vision_encoder_lr": None, "region_encoder_lr": 1e-5, "use_mm_proj": True,
        "tokenizer_model_max_length": 16384, "tokenizer_padding_side": "right",
    }


def save_tokenizer(folder) -> str:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(N_WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    hf_config.write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "clean_up_tokenization_spaces": False})
    return str(folder)


def write_sharded(folder, tensors: dict[str, np.ndarray], n_shards: int = 2) -> None:
    names = sorted(tensors)
    files = st_io.shard_file_names(n_shards)
    weight_map = {}
    for f, idx in zip(files, np.array_split(np.arange(len(names)), n_shards)):
        save_file({names[i]: tensors[names[i]] for i in idx}, os.path.join(folder, f), metadata={"format": "pt"})
        weight_map.update({names[i]: f for i in idx})
    hf_config.write_json(os.path.join(folder, st_io.INDEX_NAME), {"metadata": {"total_size": 0},
                                                                  "weight_map": weight_map})


def make_folder(root, name, cfg, tensors, encoder_folder, **config_edits) -> str:
    d = pathlib.Path(root) / name
    d.mkdir()
    write_sharded(d, tensors)
    hf_config.write_json(d / "config.json", {**official_config(cfg, encoder_folder), **config_edits})
    save_tokenizer(d)
    hf_config.write_json(d / "generation_config.json", GENERATION)
    return str(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl3ck")
    # the vision encoder folder the config names (as VL3-SigLIP-NaViT: config + preprocessor config)
    navit = root / "VL3-SigLIP-NaViT"
    navit.mkdir()
    v = tiny_cfg().vision
    hf_config.write_json(navit / "config.json", {
        "model_type": "videollama3_vision_encoder", "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads, "num_channels": 3, "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6})
    out = dict(root=root, navit=str(navit))
    for tied in (False, True):
        cfg = tiny_cfg(tied)
        tensors = official_tensors(cfg, seed=int(tied))
        key = "tied" if tied else "untied"
        out[key] = dict(cfg=cfg, tensors=tensors, dir=make_folder(root, key, cfg, tensors, str(navit)))
    return out


def assert_same_tree(a, b):
    fa, fb = key_map.flatten_paths(a), key_map.flatten_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg="/".join(k))


def assert_matches_official(params, cfg, tensors):
    """Our tree, mapped back through the family's rules, is the official tensors, bit for bit."""
    back = key_map.flax_to_hf(params, families.get(FAMILY).key_rules(cfg))
    assert set(back) == set(tensors) - ({"lm_head.weight"} if cfg.text.tie_word_embeddings else set())
    for k, v in back.items():
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)


def same_file(a, b) -> bool:
    return pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()


def mesh8():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


# ----------------------------------------------------------------------------- config.json


def test_config_read_and_written(world, tmp_path, caplog):
    cfg = world["untied"]["cfg"]
    d = hf_config.read_json(os.path.join(world["untied"]["dir"], "config.json"))
    # vision sizes from the local encoder folder, ids from config.json and the tokenizer
    got = vcfg.vl3_config_from_hf(d, folder=world["untied"]["dir"],
                                  **vcfg.tokenizer_ids(world["untied"]["dir"]))
    assert got == cfg.replace(mm_max_length=8192)
    # written: every §12 field, and it reads back to the same config (nested vision dict)
    hf = vcfg.vl3_config_to_hf(got, torch_dtype="float32", base=d)
    missing = [k for k in SECTION_12 if k not in hf]
    assert not missing, missing
    assert hf["architectures"] == ["Videollama3Qwen2ForCausalLM"] and hf["vision_encoder"] == "vision_encoder"
    assert hf["mm_vision_encoder"] == "vision_encoder" and hf["torch_dtype"] == "float32"
    assert hf["llm_lr"] == 1e-5 and hf["max_frames"] == 180  # the base's unused fields are kept
    assert vcfg.vl3_config_from_hf(hf) == got
    # the official config class is a Qwen2Config: transformers reads our decoder fields
    transformers = pytest.importorskip("transformers")
    qc = transformers.Qwen2Config.from_dict({**hf, "model_type": "qwen2"})
    assert (qc.hidden_size, qc.num_key_value_heads, qc.vocab_size) == (64, 2, 512)
    assert qc.rope_parameters["rope_theta"] == 1e6 and qc.tie_word_embeddings is False
    # mm_max_length absent: the official default (None = 9477 // merge**2), written as its value
    no_max = {k: v for k, v in d.items() if k != "mm_max_length"}
    c2 = vcfg.vl3_config_from_hf(no_max, folder=world["untied"]["dir"])
    assert c2.mm_max_length is None and vcfg.vl3_config_to_hf(c2)["mm_max_length"] == 9477 // 4
    # token ids: from the tokenizer when config.json lacks them; a disagreement is refused
    bare = {k: v for k, v in d.items() if k not in ("image_token_index", "region_token_index")}
    ids = vcfg.tokenizer_ids(world["untied"]["dir"])
    assert ids == {"image_token_id": IMAGE_ID, "region_token_id": REGION_ID, "pad_token_id": PAD_ID}
    assert vcfg.vl3_config_from_hf(bare, folder=world["untied"]["dir"], **ids) == got
    with pytest.raises(vcfg.ConfigFieldError, match="'region_token_index' and no tokenizer <REGION>"):
        vcfg.vl3_config_from_hf({**bare, "image_token_index": IMAGE_ID}, folder=world["untied"]["dir"])
    with pytest.raises(vcfg.ConfigFieldError, match="region_token_index 511 but the tokenizer's <REGION> is 7"):
        vcfg.vl3_config_from_hf(d, folder=world["untied"]["dir"], region_token_id=7)
    # a nested vision dict wins; no vision information at all: the VL3-SigLIP-NaViT sizes, with a note
    nested = {**d, "vision_encoder": "/nowhere", "mm_vision_encoder": "/nowhere",
              "vision_encoder_config": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                                        "num_hidden_layers": 2}}
    assert vcfg.vl3_config_from_hf(nested).vision == cfg.vision
    with caplog.at_level("WARNING", logger="vrefer_jax.checkpoints.vl3_hf_config"):
        far = vcfg.vl3_config_from_hf({**d, "mm_hidden_size": 1152, "vision_encoder": "DAMO-NLP-SG/VL3-SigLIP-NaViT",
                                       "mm_vision_encoder": "/mnt/x/VL3-SigLIP-NaViT"})
    assert far.vision.hidden_size == 1152 and far.vision.num_hidden_layers == 27
    assert "assuming the VL3-SigLIP-NaViT sizes" in caplog.text


@pytest.mark.parametrize("field", ["spatial_merge_size", "mm_hidden_size", "mm_projector_type",
                                   "use_token_compression", "tie_word_embeddings", "rope_theta",
                                   "max_position_embeddings", "num_key_value_heads"])
def test_config_required_fields(world, field):
    d = hf_config.read_json(os.path.join(world["untied"]["dir"], "config.json"))
    del d[field]
    with pytest.raises(vcfg.ConfigFieldError, match=f"missing field '{field}'"):
        vcfg.vl3_config_from_hf(d, folder=world["untied"]["dir"])


@pytest.mark.parametrize("edit, message", [
    ({"use_token_compression": False}, "use_token_compression is False; VRVL3 needs true"),
    ({"model_type": "qwen2"}, "model_type 'qwen2' is not 'videollama3_qwen2'"),
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear'"),
    ({"mm_hidden_size": 48}, "mm_hidden_size 48 != the vision encoder's hidden_size 32"),
    ({"image_token_index": 600}, "image_token_id 600 is outside the vocabulary"),
])
def test_config_refused_values(world, edit, message):
    d = hf_config.read_json(os.path.join(world["untied"]["dir"], "config.json"))
    with pytest.raises(vcfg.ConfigFieldError, match=message):
        vcfg.vl3_config_from_hf({**d, **edit}, folder=world["untied"]["dir"])


# ----------------------------------------------------------------------------- import


def test_cli_import_then_forward(world, tmp_path):
    """`vrefer-convert import` picks VRVL3 from model_type; the imported folder restores the official
    tensors bit for bit, names the family, and the model runs on the family's dummy batch."""
    w = world["untied"]
    out = tmp_path / "ck"
    assert cli.main(["import", w["dir"], str(out)]) == 0
    assert json.loads((out / store.MODEL_CONFIG).read_text())["family"] == FAMILY
    assert same_file(out / store.HF / "generation_config.json", pathlib.Path(w["dir"], "generation_config.json"))
    cfg, params = store.load_imported(str(out))
    assert cfg == w["cfg"].replace(mm_max_length=8192)
    assert_matches_official(params, cfg, w["tensors"])
    fam = families.get(FAMILY)
    batch = fam.dummy_batch(cfg)
    logits, _ = jax.jit(lambda p, b: fam.module(cfg).apply({"params": p}, b))(params, batch)
    logits = np.asarray(logits)
    assert logits.shape == (1, batch["input_ids"].shape[1], cfg.text.vocab_size)
    assert np.isfinite(logits).all() and logits.std() > 0
    # VideoRefer-7B options are refused by name, on one line
    assert cli.main(["import", w["dir"], str(tmp_path / "x"), "--vision-tower", w["dir"]]) == 2


def test_tied_checkpoint(world, tmp_path):
    """Tied: imports without lm_head.weight (logits from the embedding); an lm_head equal to the
    embedding is ignored, a different one refused."""
    w = world["tied"]
    cfg, params = import_vl3(w["dir"])
    assert cfg.text.tie_word_embeddings and "lm_head" not in params
    assert_matches_official(params, cfg, w["tensors"])
    emb = w["tensors"]["model.embed_tokens.weight"]
    same = make_folder(tmp_path, "same", cfg, {**w["tensors"], "lm_head.weight": emb.copy()}, world["navit"])
    _, p2 = import_vl3(same)
    assert_same_tree(p2, params)
    other = emb.copy()
    other[-1, 0] += 1.0  # one value in the last row block
    diff = make_folder(tmp_path, "diff", cfg, {**w["tensors"], "lm_head.weight": other}, world["navit"])
    with pytest.raises(TiedHeadMismatch, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        import_vl3(diff)
    # the family's output embedding is the (transposed) embedding table
    np.testing.assert_array_equal(families.get(FAMILY).output_embedding(params), emb.T)


def _variant(world, tmp_path, name, edit=None, **config_edits):
    w = world["untied"]
    tensors = dict(w["tensors"])
    if edit is not None:
        edit(tensors)
    return make_folder(tmp_path, name, w["cfg"], tensors, world["navit"], **config_edits)


@pytest.mark.parametrize("name, edit, message", [
    ("missing", lambda t: t.pop("model.vision_encoder.vision_encoder.vision_model.encoder.layers.1.mlp.fc2.bias"),
     "missing tensor 'model.vision_encoder.vision_encoder.vision_model.encoder.layers.1.mlp.fc2.bias'"),
    ("missing_head", lambda t: t.pop("lm_head.weight"), "missing tensor 'lm_head.weight'"),
    ("unexpected", lambda t: t.__setitem__("model.region_encoder.feat_linear.4.weight", np.zeros(3, np.float32)),
     r"unexpected tensors in checkpoint: \['model.region_encoder.feat_linear.4.weight'\]"),
    ("shape", lambda t: t.__setitem__("model.mm_projector.readout.2.weight", np.zeros((64, 63), np.float32)),
     "wrong shape for tensor 'model.mm_projector.readout.2.weight'"),
])
def test_bad_tensors_are_named(world, tmp_path, name, edit, message):
    folder = _variant(world, tmp_path, name, edit)
    with pytest.raises(KeyMappingError, match=message):
        import_vl3(folder)


def test_bad_folders_from_the_cli(world, tmp_path, capsys):
    """Wrong model_type, compression off, a missing tensor: exit status 2 and one line naming it."""
    cases = [
        (_variant(world, tmp_path, "qwen", model_type="qwen2"), "no model family reads model_type 'qwen2'"),
        (_variant(world, tmp_path, "nocomp", use_token_compression=False), "use_token_compression is False"),
        (_variant(world, tmp_path, "gone", lambda t: t.pop("model.norm.weight")), "missing tensor 'model.norm.weight'"),
    ]
    for folder, message in cases:
        assert cli.main(["import", folder, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    with pytest.raises(vcfg.ConfigFieldError, match="model_type 'qwen2' is not 'videollama3_qwen2'"):
        import_vl3(cases[0][0])
    # the vision encoder named by a hub name, no nested sizes: the defaults' note, then the shape check
    far = _variant(world, tmp_path, "far", vision_encoder="DAMO-NLP-SG/VL3-SigLIP-NaViT", mm_vision_encoder=None)
    with pytest.raises(vcfg.ConfigFieldError, match="mm_hidden_size 32 != the vision encoder's hidden_size 1152"):
        import_vl3(far)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_export_import_bit_exact(world, tmp_path, tied):
    w = world["tied" if tied else "untied"]
    cfg, params = import_vl3(w["dir"])
    out = tmp_path / "hf"
    base = hf_config.read_json(os.path.join(w["dir"], "config.json"))
    hf = export_vl3(params, cfg, str(out), tokenizer_folder=w["dir"], dtype="float32", max_shard_size="60KB",
                    base_config=base)
    # the official names (the tied model ships no lm_head), several shards + index
    wmap = json.loads((out / st_io.INDEX_NAME).read_text())["weight_map"]
    assert set(wmap) == set(w["tensors"]) and len(set(wmap.values())) > 2
    reader = st_io.SafetensorsReader(str(out))
    for k, v in w["tensors"].items():
        np.testing.assert_array_equal(reader.get(k), v, err_msg=k)
    # config.json: every §12 field; the vision encoder sub-folder it names by relative path
    written = json.loads((out / "config.json").read_text())
    assert written == hf and not [k for k in SECTION_12 if k not in written]
    assert written["tie_word_embeddings"] is tied and written["vision_encoder"] == "vision_encoder"
    venc = out / written["vision_encoder"]
    vconf = json.loads((venc / "config.json").read_text())
    assert (vconf["hidden_size"], vconf["num_hidden_layers"], vconf["patch_size"]) == (32, 2, 14)
    assert json.loads((venc / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    vreader = st_io.SafetensorsReader(str(venc))
    prefix = "model.vision_encoder.vision_encoder."
    want = {k[len(prefix):]: v for k, v in w["tensors"].items() if k.startswith(prefix)}
    assert set(vreader.keys()) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(vreader.get(k), v, err_msg=k)
    # tokenizer and generation config kept
    assert same_file(out / "generation_config.json", pathlib.Path(w["dir"], "generation_config.json"))
    assert same_file(out / "tokenizer.json", pathlib.Path(w["dir"], "tokenizer.json"))
    # import again: the same config and bit-identical parameters; exporting again: the same bytes
    cfg2, p2 = import_vl3(str(out))
    assert cfg2 == cfg
    assert_same_tree(p2, params)
    again = tmp_path / "again"
    export_vl3(p2, cfg2, str(again), tokenizer_folder=str(out), dtype="float32", max_shard_size="60KB",
               base_config=written)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    with pytest.raises(FileExistsError):
        export_vl3(p2, cfg2, str(again))
    # bfloat16 (the release dtype): exactly the rounded values
    half = tmp_path / "bf16"
    export_vl3(params, cfg, str(half), tokenizer_folder=w["dir"])
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, pb = import_vl3(str(half), cfg)
    rounded = jax.tree.map(lambda x: np.asarray(jax.numpy.asarray(x).astype("bfloat16").astype("float32")), params)
    assert_same_tree(pb, rounded)


def test_cli_export_dispatches_by_stored_family(world, tmp_path, capsys):
    w = world["tied"]
    ck, out = tmp_path / "ck", tmp_path / "hf"
    assert cli.main(["import", w["dir"], str(ck)]) == 0
    assert cli.main(["export", str(ck), str(out), "--dtype", "float32"]) == 0
    cfg, params = store.load_imported(str(ck))
    cfg2, p2 = import_vl3(str(out))
    assert cfg2 == cfg
    assert_same_tree(p2, params)
    assert same_file(out / "generation_config.json", pathlib.Path(w["dir"], "generation_config.json"))
    assert json.loads((out / "config.json").read_text())["llm_lr"] == 1e-5  # the imported config's fields kept
    # default dtype: bfloat16; --vision-encoder sets config.json's value; VideoRefer's flag is refused
    out2 = tmp_path / "hf2"
    assert cli.main(["export", str(ck), str(out2), "--vision-encoder", "/abs/enc"]) == 0
    written = json.loads((out2 / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["vision_encoder"] == "/abs/enc"
    assert written["mm_vision_encoder"] == "/abs/enc"
    capsys.readouterr()
    assert cli.main(["export", str(ck), str(tmp_path / "hf3"), "--mm-vision-tower", "x"]) == 2
    assert "--mm-vision-tower: not for VRVL3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shardings


def test_import_and_restore_on_8_devices(world, tmp_path, monkeypatch):
    """import_vl3 places every leaf in its target sharding; an imported folder restores straight
    into the target shardings (Orbax is asked for them)."""
    assert len(jax.devices()) >= 8
    w = world["untied"]
    cfg = w["cfg"].replace(mm_max_length=8192)
    mesh, rules = mesh8(), logical_axis_rules()
    want = key_map.flatten_paths(hf_import.param_shardings(cfg, mesh, rules))
    _, sharded = import_vl3(w["dir"], shardings=hf_import.param_shardings(cfg, mesh, rules))
    for k, x in key_map.flatten_paths(sharded).items():
        assert x.sharding.is_equivalent_to(want[k], x.ndim), (k, x.sharding, want[k])
    gate = sharded["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert len({str(s.index) for s in gate.addressable_shards}) > 1  # really split, not replicated
    assert_matches_official(jax.tree.map(np.asarray, sharded), cfg, w["tensors"])

    ck = tmp_path / "ck"
    assert cli.main(["import", w["dir"], str(ck)]) == 0
    targets = []
    real_restore = ocp.StandardCheckpointer.restore

    def spy(self, directory, target=None, *a, **k):
        targets.append(target)
        return real_restore(self, directory, target, *a, **k)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", spy)
    cfg2, restored = store.load_imported(str(ck), mesh, rules)
    assert cfg2 == cfg
    (target,) = targets
    for k, t in key_map.flatten_paths(target).items():
        assert isinstance(t, jax.ShapeDtypeStruct) and t.sharding == want[k], k
    for k, x in key_map.flatten_paths(restored).items():
        assert x.sharding.is_equivalent_to(want[k], x.ndim), k
    assert_same_tree(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, sharded))


# ----------------------------------------------------------------------------- store


def test_model_config_json_names_the_family(tmp_path):
    """model_config.json carries the family; a folder written before the field existed reads as
    VideoRefer-7B; unknown fields are named."""
    from vrefer_jax.config import model_config_from_gin

    vr = model_config_from_gin([str(GINS / "tiny.gin")])
    vl = tiny_cfg(tied=True)
    for cfg, name in ((vr, "videorefer"), (vl, FAMILY)):
        d = store.config_to_dict(cfg)
        assert d["family"] == name
        (tmp_path / name).mkdir()
        hf_config.write_json(tmp_path / name / store.MODEL_CONFIG, d)
        assert store.read_model_config(str(tmp_path / name)) == cfg
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    hf_config.write_json(legacy / store.MODEL_CONFIG, dataclasses.asdict(vr))
    assert store.read_model_config(str(legacy)) == vr
    hf_config.write_json(legacy / store.MODEL_CONFIG, {**store.config_to_dict(vl), "text": {
        **dataclasses.asdict(vl.text), "n_experts": 8}})
    with pytest.raises(ValueError, match=r"model_config.json: text: unknown TextConfig fields \['n_experts'\]"):
        store.read_model_config(str(legacy))


# ----------------------------------------------------------------------------- parameter counts


# §2 / §3 sizes, written out here (not read from the gin files)
REAL = {
    "vl3_2b.gin": dict(E=1152, M=4304, Lv=27, C=3, p=14, H=1536, I=8960, Lt=28, nq=12, nkv=2, V=151936, tied=True),
    "vl3_7b.gin": dict(E=1152, M=4304, Lv=27, C=3, p=14, H=3584, I=18944, Lt=28, nq=28, nkv=4, V=152064, tied=False),
}


def official_count(s: dict) -> int:
    """The official module tree's parameter count from the sizes: SigLIP-NaViT (patch conv, per layer
    2 LNs + q/k/v/out with biases + fc1/fc2, post-LN), projector and region encoder (Linear E->H,
    Linear H->H), Qwen2.5 (embedding, q/k/v with biases, o, SwiGLU, 2 RMSNorms per layer, final
    norm, lm_head unless tied)."""
    E, M, H, I, V = s["E"], s["M"], s["H"], s["I"], s["V"]
    hd = H // s["nq"]
    vision = (E * s["C"] * s["p"] ** 2 + E) + s["Lv"] * (4 * E + 4 * (E * E + E) + (E * M + M) + (M * E + E)) + 2 * E
    mlp2 = (E * H + H) + (H * H + H)
    q, kv = s["nq"] * hd, s["nkv"] * hd
    layer = (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * I + 2 * H
    llm = V * H + s["Lt"] * layer + H
    return vision + 2 * mlp2 + llm + (0 if s["tied"] else V * H)


@pytest.mark.parametrize("gin_name", sorted(REAL))
def test_param_count_at_real_shapes(gin_name, capsys):
    from vrefer_jax import param_count

    cfg = families.config_from_gin([str(GINS / gin_name)])  # the family detected from the gin
    assert isinstance(cfg, VL3Config) and sizes_of(cfg) == REAL[gin_name]
    counts = param_count.part_counts(cfg)  # eval_shape: nothing allocated
    want = official_count(REAL[gin_name])
    assert sum(int(np.prod(s)) for s in official_shapes(REAL[gin_name]).values()) == want  # formula = key list
    print(f"{gin_name}: ours {sum(counts.values()):,}  official {want:,}  per part {counts}")
    assert sum(counts.values()) == want
    param_count.main([str(GINS / gin_name)])
    out = capsys.readouterr().out
    assert f"family           {FAMILY}" in out and f"{want:,}" in out.splitlines()[-1]


def test_param_count_family_detection():
    from vrefer_jax.config import ModelConfig

    assert isinstance(families.config_from_gin([str(GINS / "videorefer_7b.gin")]), ModelConfig)
    with pytest.raises(families.UnknownFamily, match="bind no model config classes"):
        families.config_from_gin([], ["TextConfig.vocab_size = 8"])
    assert families.config_from_gin([], ["VL3Config.spatial_merge_size = 1"]).spatial_merge_size == 1
    with pytest.raises(families.UnknownFamily, match="bind several"):
        families.config_from_gin([], ["VL3Config.spatial_merge_size = 1", "ModelConfig.num_frames = 2"])
    tiny = families.config_from_gin([], ["ModelConfig.num_frames = 2"], family=FAMILY)
    assert isinstance(tiny, VL3Config) and VL3Config().spatial_merge_size == 2  # bindings cleared


def test_vrefer_infer_reads_an_official_vl3_folder(world, tmp_path, capsys):
    """`vrefer-infer` on the official folder (imported on the fly by the family its model_type names):
    an image with a box, then a requests file mixing an image with 2 objects, a video object on 2
    frames and a bad line, batched on a (2, 1, 4) mesh; --num-frames (a VideoRefer-7B option) is refused."""
    import av
    from PIL import Image

    from vrefer_jax.inference import cli as infer_cli

    ckpt = world["untied"]["dir"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)).save(tmp_path / "i.png")
    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 84, 56, "yuv420p"
        for i in range(8):
            img = np.full((56, 84, 3), 20 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    base = ["--checkpoint", ckpt, "--max-new-tokens", "3"]
    assert infer_cli.main(base + ["--image", str(tmp_path / "i.png"), "--question", "What is <region>?",
                                  "--box", "5,5,40,30"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # one answer line (random weights: any text)
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"id": "img", "image": "i.png", "question": "<region> and <region>?",
         "objects": [{"box": "5,5,40,30"}, {"box": "50,20,80,50"}]},
        {"id": "vid", "video": "v.mp4", "question": "Where is <region>?",
         "objects": [{"frames": {"1": {"box": "10,10,40,40"}, "5": {"box": "30,10,60,40"}}}]},
        {"id": "bad", "image": "missing.png", "question": "<region>?", "objects": [{"box": "1,1,5,5"}]},
    ]) + "\n")
    out = tmp_path / "a.jsonl"
    rc = infer_cli.main(base + ["--requests", str(reqs), "--output", str(out), "--batch-size", "2",
                                "--mesh", "data=2,fsdp=1,tensor=4"])
    rows = [json.loads(line) for line in open(out)]
    assert rc == 1 and [r["id"] for r in rows] == ["img", "vid", "bad"]
    assert "answer" in rows[0] and "answer" in rows[1] and "error" in rows[2]
    single = tmp_path / "b.jsonl"
    reqs.write_text(reqs.read_text().splitlines()[1] + "\n")
    assert infer_cli.main(base + ["--requests", str(reqs), "--output", str(single)]) == 0
    assert json.loads(open(single).read())["answer"] == rows[1]["answer"]  # batched on a mesh = alone
    capsys.readouterr()
    assert infer_cli.main(base + ["--image", str(tmp_path / "i.png"), "--question", "<region>?",
                                  "--box", "5,5,40,30", "--num-frames", "8"]) == 2
    assert "num_frames does not apply" in capsys.readouterr().err
