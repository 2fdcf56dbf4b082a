"""Checkpoint import / export against `transformers` (tiny random fp32 models, offline).

A VideoRefer folder is assembled the way the release is laid out: Qwen2ForCausalLM tensors, the
stored SigLIP copy under `model.vision_tower.vision_tower.vision_model.*` (fp16-rounded, like the
release), `model.mm_projector.*`, `model.region_encoder.*`, three shards + index, an official-style
config.json whose `mm_vision_tower` is a local SigLIP folder (Google layout: `vision_model.*` plus a
text tower and logit scale/bias).
"""

import copy
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import hf_config, key_map, st_io, store
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.checkpoints.hf_export import export_videorefer
from vrefer_jax.checkpoints.hf_import import import_videorefer, param_shardings
from vrefer_jax.checkpoints.key_map import KeyMappingError
from vrefer_jax.checkpoints.parts import init_from_parts
from vrefer_jax.config import ModelConfig, model_config_from_gin
from vrefer_jax.models import videorefer
from vrefer_jax.models.videorefer import VideoRefer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

pytestmark = pytest.mark.torch

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.gin"
VOCAB = 160
TOL = 1e-4
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=30, patch_size=7, num_channels=3, layer_norm_eps=1e-6)
QWEN2 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tiny_cfg() -> ModelConfig:
    c = model_config_from_gin([str(TINY)])
    return c.replace(text=c.text.__class__(**{**c.text.__dict__, "vocab_size": VOCAB}),
                     region_token_id=VOCAB - 1, pad_token_id=VOCAB - 4)


def _randomise(model, scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def make_tokenizer(n_words: int, with_region: bool = True):
    """A word-level tokenizer with the Qwen2 specials (ids n_words..n_words+2), `<region>` next."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if with_region:
        tok.add_special_tokens([AddedToken("<region>", special=True, normalized=False)])
    return tok


def save_tokenizer(tok, folder):
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    hf_config.write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "clean_up_tokenization_spaces": False})
    return str(folder)


def official_config(cfg: ModelConfig, siglip_dir: str) -> dict:
    """A config.json as the release writes it (transformers 4.40 spelling); the projector depth of
    the tiny model is the one field the official format cannot express."""
    t = cfg.text
    return {
        "architectures": ["VideoReferQwen2ForCausalLM"], "model_type": "videorefer_qwen2",
        "attention_dropout": 0.0, "bos_token_id": VOCAB - 4, "eos_token_id": VOCAB - 2, "hidden_act": "silu",
        "hidden_size": t.hidden_size, "initializer_range": 0.02, "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings, "max_window_layers": 28,
        "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.40.0", "use_cache": True, "vocab_size": VOCAB,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "square", "mm_hidden_size": SIGLIP["hidden_size"],
        "mm_projector_lr": None, "mm_projector_type": "stc_connector_v35", "mm_region_encoder_type": "pooling",
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": siglip_dir,
        "num_frames": cfg.num_frames, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False, "tune_region_encoder": False, "use_mm_proj": True,
        "mm_projector_depth": cfg.connector.depth,
    }


def module_tensors(cfg: ModelConfig, rng) -> dict[str, np.ndarray]:
    """Random `model.mm_projector.*` / `model.region_encoder.*` tensors in PyTorch layout."""
    shapes = videorefer.abstract_params(cfg)
    out = {}
    for prefix, rules, top in (
        ("model.mm_projector.", keys.connector_rules(cfg.connector, cfg.vision.hidden_size, cfg.text.hidden_size),
         "mm_projector"),
        ("model.region_encoder.", keys.object_encoder_rules(cfg.object_encoder), "region_encoder"),
    ):
        for r in rules:
            shp = key_map.hf_shape(r, key_map.get_path(shapes[top], r.flax).shape)
            out[prefix + r.hf] = (0.2 * rng.standard_normal(shp)).astype(np.float32)
    return out


def write_sharded(folder, tensors: dict[str, np.ndarray], n_shards: int):
    names = sorted(tensors)
    chunks = np.array_split(np.arange(len(names)), n_shards)
    files = st_io.shard_file_names(n_shards)
    weight_map = {}
    for f, idx in zip(files, chunks):
        save_file({names[i]: tensors[names[i]] for i in idx}, os.path.join(folder, f), metadata={"format": "pt"})
        weight_map.update({names[i]: f for i in idx})
    if n_shards > 1:
        hf_config.write_json(os.path.join(folder, st_io.INDEX_NAME),
                             {"metadata": {"total_size": 0}, "weight_map": weight_map})


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    """transformers' load reports list every multimodal tensor the Qwen2 loader skips."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    qwen = _randomise(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **QWEN2, rope_parameters={"rope_type": "default", "rope_theta": cfg.text.rope_theta},
        tie_word_embeddings=False, attn_implementation="eager")), 0.1)
    sig = _randomise(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        **SIGLIP, hidden_act="gelu_pytorch_tanh", attn_implementation="eager")), 0.3)
    qwen_dir = root / "qwen2"
    qwen.save_pretrained(qwen_dir, max_shard_size="100KB")
    # transformers-5 layout (no `vision_model.` prefix), as save_pretrained writes it
    sig_t5 = root / "siglip_t5"
    sig.save_pretrained(sig_t5)
    sig_sd = {"vision_model." + k: v for k, v in key_map.torch_state_to_numpy(sig.state_dict()).items()}
    # Google layout: a full SiglipModel file (vision_model.* + text tower + logit scale / bias)
    sig_dir = root / "siglip"
    sig_dir.mkdir()
    save_file({**sig_sd, "text_model.embeddings.token_embedding.weight": np.ones((7, 4), np.float32),
               "logit_scale": np.ones((1,), np.float32), "logit_bias": np.zeros((1,), np.float32)},
              str(sig_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_config.write_json(sig_dir / "config.json", {"model_type": "siglip", "text_config": {"vocab_size": 7},
                                                   "vision_config": {**SIGLIP, "model_type": "siglip_vision_model"}})
    qwen_sd = key_map.torch_state_to_numpy(qwen.state_dict())
    mods = module_tensors(cfg, rng)
    stored_tower = {"model.vision_tower.vision_tower." + k: v.astype(np.float16).astype(np.float32)
                    for k, v in sig_sd.items()}
    vr_dir = root / "videorefer"
    vr_dir.mkdir()
    write_sharded(vr_dir, {**qwen_sd, **stored_tower, **mods}, 3)
    hf_config.write_json(vr_dir / "config.json", official_config(cfg, str(sig_dir)))
    save_tokenizer(make_tokenizer(VOCAB - 4), vr_dir)
    # the same tensors as torch pickles, as VideoLLaMA2 / stage 2 ship them
    proj_bin, reg_bin = root / "mm_projector.bin", root / "region_encoder.bin"
    torch.save({k: torch.from_numpy(v) for k, v in mods.items() if "mm_projector" in k}, proj_bin)
    torch.save({k: torch.from_numpy(v) for k, v in mods.items() if "region_encoder" in k}, reg_bin)
    reg_st = root / "region_encoder.safetensors"  # without the `model.` prefix
    save_file({k.removeprefix("model."): v for k, v in mods.items() if "region_encoder" in k}, str(reg_st))
    return dict(root=root, cfg=cfg, qwen=qwen, sig=sig, qwen_dir=str(qwen_dir), sig_dir=str(sig_dir),
                sig_t5=str(sig_t5), vr_dir=str(vr_dir), qwen_sd=qwen_sd, sig_sd=sig_sd, mods=mods,
                stored_tower=stored_tower, proj_bin=str(proj_bin), reg_bin=str(reg_bin), reg_st=str(reg_st))


@pytest.fixture(scope="module")
def imported(world):
    return import_videorefer(world["vr_dir"])


# ----------------------------------------------------------------------------- model runs


@functools.lru_cache(maxsize=None)
def _fns(cfg: ModelConfig):
    model = VideoRefer(cfg)

    def text(m, ids):
        B, L = ids.shape
        pos = jnp.broadcast_to(jnp.arange(L), (B, L))
        h, _ = m.decode(m.embed_tokens(ids), pos, jnp.ones((B, L), jnp.int32))
        return m.logits(h)

    text_fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=text))
    vis_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.vision_tower(x)))
    return text_fn, vis_fn


IDS = np.random.default_rng(1).integers(0, VOCAB, size=(2, 12)).astype(np.int32)
PIXELS = np.random.default_rng(2).uniform(-1, 1, size=(2, 30, 30, 3)).astype(np.float32)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def torch_vision(model, pixels, layer=-2):
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        return model(pixel_values=x, output_hidden_states=True).hidden_states[layer].numpy()


def assert_same_tree(a, b):
    fa, fb = key_map.flatten_paths(a), key_map.flatten_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg="/".join(k))


# ----------------------------------------------------------------------------- config


def test_config_read_and_written(world, imported):
    cfg, _ = imported
    assert cfg == world["cfg"]  # sizes from config.json + SigLIP folder, ids from the tokenizer
    hf = hf_config.model_config_to_hf(cfg, mm_vision_tower="/x/siglip-so400m", torch_dtype="bfloat16")
    for k, v in dict(model_type="videorefer_qwen2", architectures=["VideoReferQwen2ForCausalLM"],
                     mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=32,
                     mm_projector_type="stc_connector_v35", mm_region_encoder_type="pooling",
                     image_aspect_ratio="square", num_frames=4, tie_word_embeddings=False,
                     torch_dtype="bfloat16", vocab_size=VOCAB, use_mm_proj=True, tune_mm_mlp_adapter=False).items():
        assert hf[k] == v, k
    assert hf_config.model_config_from_hf(hf) == cfg  # mm_vision_config carries the tower's sizes
    # transformers reads our Qwen2 fields (rope_theta spelled the 4.40 way)
    qc = transformers.Qwen2Config.from_dict({**hf, "model_type": "qwen2"})
    assert qc.rope_parameters["rope_theta"] == cfg.text.rope_theta and qc.num_key_value_heads == 2
    # Qwen2-Instruct's generation_config.json from Qwen2's ids
    gen = hf_config.generation_config(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)
    assert gen == {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                   "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20,
                   "top_p": 0.8}
    with pytest.raises(ValueError, match="rope type"):
        hf_config.text_config_from_hf({**hf, "rope_scaling": {"type": "yarn", "factor": 4.0}})


# ----------------------------------------------------------------------------- import


def test_import_matches_transformers(world, imported):
    cfg, params = imported
    text_fn, vis_fn = _fns(cfg)
    e_text = err(text_fn(params, IDS), torch_logits(world["qwen"], IDS))
    e_vis = err(vis_fn(params, PIXELS), torch_vision(world["sig"], PIXELS))
    print(f"import: text logits max abs err {e_text:.2e}; vision hidden_states[-2] {e_vis:.2e}")
    assert e_text <= TOL and e_vis <= TOL
    # the tower came from the SigLIP folder (fp32), not the fp16-rounded stored copy
    fc1 = world["sig_sd"]["vision_model.encoder.layers.0.mlp.fc1.weight"]
    np.testing.assert_array_equal(params["vision_tower"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"][0], fc1.T)
    # projector / region encoder tensors land exactly
    back = key_map.flax_to_hf(params, keys.videorefer_rules(cfg))
    for k, v in world["mods"].items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_import_stored_vision_tower(world, imported):
    cfg, params = imported
    _, p_stored = import_videorefer(world["vr_dir"], use_stored_vision_tower=True)
    back = key_map.flax_to_hf(p_stored, keys.videorefer_rules(cfg))
    name = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(back[name], world["stored_tower"][name])
    assert not np.array_equal(back[name], world["sig_sd"][name.split("vision_tower.vision_tower.")[1]])
    assert_same_tree(p_stored["llm"], params["llm"])
    # no SigLIP folder reachable: a clear error
    cfg_json = hf_config.read_json(os.path.join(world["vr_dir"], "config.json"))
    d = world["root"] / "no_siglip"
    d.mkdir()
    hf_config.write_json(d / "config.json", {**cfg_json, "mm_vision_tower": "google/siglip-so400m-patch14-384"})
    with pytest.raises(FileNotFoundError, match="vision_tower_folder"):
        import_videorefer(str(d))


def test_prefix_tolerance(world, imported):
    """Keys without `model.`, a single file, and a SigLIP folder without `vision_model.`."""
    cfg, params = imported
    d = world["root"] / "noprefix"
    d.mkdir()
    tensors = {k.removeprefix("model."): v for k, v in
               {**world["qwen_sd"], **world["mods"], **world["stored_tower"]}.items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf_config.write_json(d / "config.json", hf_config.read_json(os.path.join(world["vr_dir"], "config.json")))
    _, p2 = import_videorefer(str(d), cfg, vision_tower_folder=world["sig_t5"])
    assert_same_tree(p2, params)


def _variant(world, name, edit):
    d = world["root"] / name
    d.mkdir()
    tensors = {**world["qwen_sd"], **world["mods"]}
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf_config.write_json(d / "config.json", hf_config.read_json(os.path.join(world["vr_dir"], "config.json")))
    return str(d)


@pytest.mark.parametrize("name, edit, message", [
    ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("unexpected", lambda t: t.__setitem__("model.mm_projector.extra.weight", np.zeros(3, np.float32)),
     "unexpected tensors in checkpoint: \\['model.mm_projector.extra.weight'\\]"),
    ("shape", lambda t: t.__setitem__("model.region_encoder.feat_linear.2.weight", np.zeros((64, 63), np.float32)),
     "wrong shape for tensor 'model.region_encoder.feat_linear.2.weight'"),
    ("embed_rows", lambda t: t.__setitem__("model.embed_tokens.weight", np.zeros((VOCAB + 1, 64), np.float32)),
     "wrong shape for tensor 'model.embed_tokens.weight'"),
    ("twice", lambda t: t.__setitem__("norm.weight", t["model.norm.weight"]), "'norm.weight' are both stored"),
])
def test_key_errors_name_the_tensor(world, name, edit, message):
    folder = _variant(world, name, edit)
    with pytest.raises(KeyMappingError, match=message):
        import_videorefer(folder, world["cfg"], vision_tower_folder=world["sig_dir"])


def test_siglip_folder_missing_tensor(world):
    d = world["root"] / "siglip_broken"
    d.mkdir()
    sd = dict(world["sig_sd"])
    del sd["vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf_config.write_json(d / "config.json", SIGLIP)
    with pytest.raises(KeyMappingError, match="missing tensor 'vision_model.encoder.layers.0.mlp.fc1.weight'"):
        import_videorefer(world["vr_dir"], vision_tower_folder=str(d))


def test_sharded_import_on_8_devices(world, imported):
    from jax.sharding import Mesh, PartitionSpec as P

    cfg, params = imported
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    want = param_shardings(cfg, mesh)
    _, sharded = import_videorefer(world["vr_dir"], shardings=want)
    got_flat, want_flat = key_map.flatten_paths(sharded), key_map.flatten_paths(want)
    assert got_flat.keys() == want_flat.keys()
    for k, x in got_flat.items():
        assert x.sharding.is_equivalent_to(want_flat[k], x.ndim), (k, x.sharding, want_flat[k])
    assert sharded["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert sharded["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert len(sharded["lm_head"]["kernel"].addressable_shards) == 8
    assert_same_tree(jax.tree.map(np.asarray, sharded), params)


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(world, imported, tmp_path_factory):
    cfg, params = imported
    out = tmp_path_factory.mktemp("export") / "vr"
    base = hf_config.read_json(os.path.join(world["vr_dir"], "config.json"))
    export_videorefer(params, cfg, str(out), tokenizer_folder=world["vr_dir"], dtype="float32",
                      max_shard_size="120KB", base_config=base)
    return str(out)


def test_export_layout_and_reload_with_transformers(world, imported, exported):
    cfg, params = imported
    files = sorted(os.listdir(exported))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "tokenizer.json" in files
    wmap = json.loads(pathlib.Path(exported, "model.safetensors.index.json").read_text())["weight_map"]
    # official names; the tower only with the layers the model runs (no layer 2, post-LN, head)
    tower = [k for k in wmap if k.startswith("model.vision_tower.vision_tower.vision_model.")]
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias" in tower
    assert not any(".layers.2." in k or "post_layernorm" in k or ".head." in k for k in tower)
    assert {k for k in wmap if not k.startswith("model.vision_tower.")} == set(world["qwen_sd"]) | set(world["mods"])
    gen = hf_config.read_json(os.path.join(exported, "generation_config.json"))
    assert gen["eos_token_id"] == [VOCAB - 2, VOCAB - 4] and gen["bos_token_id"] == VOCAB - 4
    assert gen["pad_token_id"] == VOCAB - 4 and gen["top_k"] == 20
    hf = hf_config.read_json(os.path.join(exported, "config.json"))
    # the complete tower is exported beside the weights and config.json points there (issue #15 item 19)
    assert hf["mm_vision_tower"] == os.path.join(os.path.abspath(exported), "siglip_vision_tower")
    assert hf["eos_token_id"] == VOCAB - 2

    # Qwen2 part through transformers' own loader (it skips the multimodal tensors)
    qcfg = transformers.Qwen2Config.from_dict({**hf, "model_type": "qwen2", "attn_implementation": "eager"})
    qwen = transformers.Qwen2ForCausalLM.from_pretrained(exported, config=qcfg).eval()
    ref = torch_logits(world["qwen"], IDS)
    e_hf = err(torch_logits(qwen, IDS), ref)
    text_fn, vis_fn = _fns(cfg)
    e_ours = err(text_fn(params, IDS), torch_logits(qwen, IDS))
    print(f"export -> transformers Qwen2: logits vs original {e_hf:.2e}, vs ours {e_ours:.2e}")
    assert e_hf == 0.0 and e_ours <= TOL
    # vision tower: the exported copy in a SiglipVisionModel with the layers it holds
    sig = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        **{**hf["mm_vision_config"], "num_hidden_layers": cfg.vision.num_layers_run}, attn_implementation="eager"))
    reader = st_io.SafetensorsReader(exported)
    prefix = "model.vision_tower.vision_tower.vision_model."
    missing, unexpected = sig.load_state_dict(
        {k[len(prefix):]: torch.from_numpy(reader.get(k)) for k in tower}, strict=False)
    assert not unexpected and all(k.startswith(("post_layernorm", "head")) for k in missing)
    e_vis = err(torch_vision(sig.eval(), PIXELS, -1), vis_fn(params, PIXELS))
    print(f"export -> transformers SigLIP: features vs ours {e_vis:.2e}")
    assert e_vis <= TOL


def test_round_trip_bit_exact(world, imported, exported, tmp_path):
    cfg, params = imported
    cfg2, p2 = import_videorefer(exported)
    assert cfg2 == cfg
    assert_same_tree(p2, params)
    _, p3 = import_videorefer(exported, use_stored_vision_tower=True)  # our stored copy is the tower
    assert_same_tree(p3, params)
    # export again: the same bytes
    again = tmp_path / "again"
    export_videorefer(p2, cfg2, str(again), tokenizer_folder=exported, dtype="float32", max_shard_size="120KB",
                      base_config=hf_config.read_json(os.path.join(exported, "config.json")))
    files = sorted(str(p.relative_to(exported)) for p in pathlib.Path(exported).rglob("*") if p.is_file())
    assert any(f.startswith("siglip_vision_tower/") and f.endswith(".safetensors") for f in files)
    for f in files:
        a, b = pathlib.Path(exported, f).read_bytes(), (again / f).read_bytes()
        if f == "config.json":  # mm_vision_tower names each export's own tower folder
            a, b = ({**json.loads(x), "mm_vision_tower": None} for x in (a, b))
        assert a == b, f
    with pytest.raises(FileExistsError):
        export_videorefer(p2, cfg2, str(again))
    # half precision: exactly the rounded values
    half = tmp_path / "bf16"
    export_videorefer(params, cfg, str(half), dtype="bfloat16", base_config=hf_config.read_json(
        os.path.join(exported, "config.json")))
    assert hf_config.read_json(half / "config.json")["torch_dtype"] == "bfloat16"
    _, pb = import_videorefer(str(half), cfg, use_stored_vision_tower=True)
    rounded = jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)), params)
    assert_same_tree(pb, rounded)


def test_export_adds_region_to_tokenizer(world, imported, tmp_path):
    cfg, params = imported
    bare = save_tokenizer(make_tokenizer(VOCAB - 4, with_region=False), tmp_path / "tok")
    out = tmp_path / "out"
    export_videorefer(params, cfg, str(out), tokenizer_folder=bare, dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.convert_tokens_to_ids("<region>") == VOCAB - 1 and len(hf_tok) == VOCAB
    assert hf_tok("w3 <region> w5", add_special_tokens=False).input_ids == [3, VOCAB - 1, 5]
    bad = save_tokenizer(make_tokenizer(VOCAB - 5), tmp_path / "tok_bad")  # <region> at VOCAB - 2
    with pytest.raises(ValueError, match="region"):
        export_videorefer(params, cfg, str(tmp_path / "bad"), tokenizer_folder=bad, dtype="float32")


# ----------------------------------------------------------------------------- training start


def test_init_from_parts_shrinks_vocab(world, imported, tmp_path):
    """Padded 160-row Qwen2 + a 130-id tokenizer: the first 130 rows, as resize_token_embeddings."""
    from vrefer_jax.text import HFTokenizer

    cfg_full, p_full = imported
    tok = HFTokenizer(make_tokenizer(126, with_region=False))  # <region> added -> 130 ids
    assert len(tok) == 130 and tok.region_id == 129
    cfg, params = init_from_parts(world["qwen_dir"], world["sig_dir"], world["proj_bin"], world["reg_st"],
                                  tokenizer=tok, base_cfg=world["cfg"])
    assert cfg.text.vocab_size == 130 and cfg.region_token_id == 129 and cfg.pad_token_id == 126
    emb = world["qwen_sd"]["model.embed_tokens.weight"]
    np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"], emb[:130])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], world["qwen_sd"]["lm_head.weight"][:130].T)
    for top in ("vision_tower", "mm_projector", "region_encoder"):
        assert_same_tree(params[top], p_full[top])
    ref = copy.deepcopy(world["qwen"])
    ref.resize_token_embeddings(130)
    ids = IDS % 130
    e = err(_fns(cfg)[0](params, ids), torch_logits(ref.eval(), ids))
    print(f"init_from_parts (160 -> 130 rows): logits vs transformers resize_token_embeddings {e:.2e}")
    assert e <= TOL


def test_init_from_parts_fresh_modules_and_growth(world):
    from vrefer_jax.text import HFTokenizer

    tok = HFTokenizer(make_tokenizer(166))  # 170 ids > 160 stored rows
    cfg, params = init_from_parts(world["qwen_dir"], world["sig_dir"], tokenizer=tok, base_cfg=world["cfg"],
                                  rng=jax.random.key(3))
    emb = world["qwen_sd"]["model.embed_tokens.weight"]
    got = np.asarray(params["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(got[:VOCAB], emb)
    np.testing.assert_allclose(got[VOCAB:], np.broadcast_to(emb.mean(0), (10, emb.shape[1])), rtol=1e-6)
    ref = copy.deepcopy(world["qwen"])
    ref.resize_token_embeddings(170)  # mean_resizing: mean + noise of ~3e-5 std
    e_grow = err(got[VOCAB:], ref.get_input_embeddings().weight.detach().numpy()[VOCAB:])
    print(f"grown rows vs transformers mean_resizing: {e_grow:.2e}")
    assert e_grow < 1e-3
    # fresh region encoder / projector: PyTorch default init (U(+-1/sqrt(fan_in)), LayerNorm 1 / 0)
    re = params["region_encoder"]
    k0, b0 = np.asarray(re["feat_linear_0"]["kernel"]), np.asarray(re["feat_linear_0"]["bias"])
    bound = 1 / np.sqrt(cfg.vision.hidden_size)
    assert np.abs(k0).max() <= bound and np.abs(k0).max() > 0.9 * bound and np.abs(b0).max() <= bound
    assert abs(k0.std() - bound / np.sqrt(3)) < 0.1 * bound
    bn = params["mm_projector"]["s1"]["b1"]["conv1"]["bn"]
    assert np.all(np.asarray(bn["scale"]) == 1) and np.all(np.asarray(bn["bias"]) == 0)
    dw = np.asarray(params["mm_projector"]["s1"]["b1"]["conv2"]["conv"]["kernel"])  # depthwise: fan_in 9
    assert np.abs(dw).max() <= 1 / 3 and np.abs(dw).max() > 0.9 / 3
    # deterministic in the key; grow_init="normal" (transformers 4.40): N(0, initializer_range)
    _, again = init_from_parts(world["qwen_dir"], world["sig_dir"], tokenizer=tok, base_cfg=world["cfg"],
                               rng=jax.random.key(3), grow_init="normal")
    np.testing.assert_array_equal(again["region_encoder"]["feat_linear_2"]["kernel"], re["feat_linear_2"]["kernel"])
    new = np.asarray(again["llm"]["embed_tokens"]["embedding"])[VOCAB:]
    assert abs(new.std() - 0.02) < 0.004 and abs(new.mean()) < 0.004


def test_projector_file_wrong_shape(world, tmp_path):
    from vrefer_jax.text import HFTokenizer

    bad = tmp_path / "mm_projector.bin"
    t = {k: torch.from_numpy(v) for k, v in world["mods"].items() if "mm_projector" in k}
    t["model.mm_projector.readout.2.weight"] = torch.zeros(3, 3)
    torch.save(t, bad)
    with pytest.raises(KeyMappingError, match="mm_projector.bin: wrong shape for tensor 'model.mm_projector.readout.2"):
        init_from_parts(world["qwen_dir"], world["sig_dir"], str(bad), tokenizer=HFTokenizer(make_tokenizer(126)),
                        base_cfg=world["cfg"])


# ----------------------------------------------------------------------------- CLI


def test_cli_import_export(world, imported, tmp_path):
    from vrefer_jax.checkpoints import cli

    cfg, params = imported
    ck, out = tmp_path / "orbax", tmp_path / "hf"
    assert cli.main(["import", world["vr_dir"], str(ck)]) == 0
    assert cli.main(["export", str(ck), str(out), "--dtype", "float32", "--max-shard-size", "200KB"]) == 0
    cfg2, p2 = import_videorefer(str(out))
    assert cfg2 == cfg
    assert_same_tree(p2, params)
    assert (out / "tokenizer.json").is_file()
    # from-parts -> export -> import: the training starting point as an HF folder
    tok_dir = save_tokenizer(make_tokenizer(126, with_region=False), tmp_path / "tok")
    parts, out2 = tmp_path / "parts", tmp_path / "hf2"
    assert cli.main(["from-parts", str(parts), "--qwen2", world["qwen_dir"], "--siglip", world["sig_dir"],
                     "--projector", world["proj_bin"], "--region-encoder", world["reg_bin"],
                     "--tokenizer", tok_dir, "--gin", str(TINY)]) == 0
    assert cli.main(["export", str(parts), str(out2), "--dtype", "float32"]) == 0
    cfg3, p3 = import_videorefer(str(out2))
    assert cfg3.text.vocab_size == 130 and cfg3.region_token_id == 129 and cfg3.connector == cfg.connector
    # the complete tower (kept at from-parts) is exported beside the weights (issue #15 item 19)
    assert hf_config.read_json(out2 / "config.json")["mm_vision_tower"] == str(out2 / "siglip_vision_tower")
    assert_same_tree(import_videorefer(str(out2), vision_tower_folder=world["sig_dir"])[1]["vision_tower"],
                     p3["vision_tower"])
    for top in ("mm_projector", "region_encoder"):
        assert_same_tree(p3[top], params[top])
    np.testing.assert_array_equal(p3["lm_head"]["kernel"], world["qwen_sd"]["lm_head.weight"][:130].T)
    r = subprocess.run([sys.executable, "-m", "vrefer_jax.checkpoints.cli", "--help"], capture_output=True,
                       text=True, cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0 and "import" in r.stdout and "export" in r.stdout


# ----------------------------------------------------------------------------- hardening (issue #15)


def _copy_folder(src, dst, **config_edits):
    """A copy of a checkpoint folder with config.json fields replaced."""
    import shutil

    shutil.copytree(src, dst)
    cfg_json = hf_config.read_json(os.path.join(dst, "config.json"))
    hf_config.write_json(os.path.join(dst, "config.json"), {**cfg_json, **config_edits})
    return str(dst)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_outside_folder_refused(world, tmp_path, entry):
    """Shard names in the index are data: each must stay inside the checkpoint folder."""
    from vrefer_jax.paths import PathOutsideRoot

    d = _copy_folder(world["vr_dir"], tmp_path / "vr")
    (tmp_path / "outside.safetensors").write_bytes(pathlib.Path(d, "model-00001-of-00003.safetensors").read_bytes())
    index = pathlib.Path(d, st_io.INDEX_NAME)
    idx = json.loads(index.read_text())
    name = next(iter(sorted(idx["weight_map"])))
    idx["weight_map"][name] = entry
    index.write_text(json.dumps(idx))
    with pytest.raises(PathOutsideRoot, match=st_io.INDEX_NAME) as e:
        import_videorefer(d)
    assert e.value.reason == "media_outside_root" and repr(name) in str(e.value) and entry in str(e.value)
    # a subfolder inside the checkpoint is fine; a malformed index is a clear error
    os.mkdir(os.path.join(d, "sub"))
    os.replace(os.path.join(d, "model-00001-of-00003.safetensors"), os.path.join(d, "sub", "s1.safetensors"))
    idx["weight_map"] = {k: ("sub/s1.safetensors" if v == "model-00001-of-00003.safetensors" else v)
                         for k, v in idx["weight_map"].items() if k != name}
    idx["weight_map"][name] = "sub/s1.safetensors"
    index.write_text(json.dumps(idx))
    assert st_io.SafetensorsReader(d).file_of(name) == os.path.join(d, "sub", "s1.safetensors")
    index.write_text('{"weight_map": ["x"]}')
    with pytest.raises(ValueError, match="weight_map"):
        st_io.SafetensorsReader(d)


def test_cli_user_error_is_one_line(world, tmp_path, capsys):
    from vrefer_jax.checkpoints import cli

    d = _copy_folder(world["vr_dir"], tmp_path / "vr")
    index = pathlib.Path(d, st_io.INDEX_NAME)
    idx = json.loads(index.read_text())
    idx["weight_map"]["model.norm.weight"] = "../../elsewhere.safetensors"
    index.write_text(json.dumps(idx))
    assert cli.main(["import", d, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "media_outside_root" in err and "'model.norm.weight'" in err, err


def _generate(folder, n=32):
    """Tokens `transformers` generates from a VideoRefer folder's Qwen2 part with the folder's own
    generation_config.json (what `mm_infer` merges its kwargs into)."""
    hf = hf_config.read_json(os.path.join(folder, "config.json"))
    qcfg = transformers.Qwen2Config.from_dict({**hf, "model_type": "qwen2", "attn_implementation": "eager"})
    model = transformers.Qwen2ForCausalLM.from_pretrained(folder, config=qcfg).eval()
    gen = transformers.GenerationConfig.from_pretrained(folder)
    gen.max_new_tokens, gen.min_new_tokens = n, n
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(torch.as_tensor(IDS[:1], dtype=torch.long), generation_config=gen)[0].tolist()


def test_export_keeps_generation_config(world, tmp_path, caplog):
    """Export keeps the imported generation config (greedy here): the exported folder generates the
    same tokens as the original. Defaults are written only when there is none, with a warning."""
    from vrefer_jax.checkpoints import cli

    src = _copy_folder(world["vr_dir"], tmp_path / "vr")
    greedy = {"bos_token_id": VOCAB - 4, "eos_token_id": [VOCAB - 2, VOCAB - 4], "pad_token_id": VOCAB - 4,
              "do_sample": False, "repetition_penalty": 1.3}
    hf_config.write_json(os.path.join(src, "generation_config.json"), greedy)
    ck, out = tmp_path / "orbax", tmp_path / "hf"
    assert cli.main(["import", src, str(ck)]) == 0
    assert cli.main(["export", str(ck), str(out), "--dtype", "float32"]) == 0
    assert (out / "generation_config.json").read_bytes() == pathlib.Path(src, "generation_config.json").read_bytes()
    want = _generate(src)
    assert _generate(str(out)) == want and len(want) == IDS.shape[1] + 32
    # no generation config anywhere: Qwen2-Instruct's defaults, and a warning saying so
    cfg, params = store.load_imported(str(ck))
    with caplog.at_level("WARNING", logger="vrefer_jax.checkpoints.hf_export"):
        export_videorefer(params, cfg, str(tmp_path / "bare"), dtype="float32", write_vision_tower=False)
    assert "no generation_config.json" in caplog.text
    assert hf_config.read_json(tmp_path / "bare" / "generation_config.json")["do_sample"] is True


def test_image_aspect_ratio_carried(world, imported, tmp_path):
    """`image_aspect_ratio` goes config.json -> ModelConfig -> model_config.json -> config.json."""
    from vrefer_jax.checkpoints import cli

    cfg, params = imported
    src = _copy_folder(world["vr_dir"], tmp_path / "vr", image_aspect_ratio="pad")
    ck, out = tmp_path / "orbax", tmp_path / "hf"
    assert cli.main(["import", src, str(ck)]) == 0
    cfg_pad, _ = store.load_imported(str(ck))
    assert cfg_pad == cfg.replace(image_aspect_ratio="pad")
    assert cli.main(["export", str(ck), str(out), "--dtype", "float32"]) == 0
    assert hf_config.read_json(out / "config.json")["image_aspect_ratio"] == "pad"
    assert import_videorefer(str(out))[0].image_aspect_ratio == "pad"
    # absent / null: square, as the official process_images; an unsupported value is refused
    d = hf_config.read_json(os.path.join(world["vr_dir"], "config.json"))
    del d["image_aspect_ratio"]
    assert hf_config.model_config_from_hf(d, vision=cfg.vision).image_aspect_ratio == "square"
    with pytest.raises(ValueError, match="image_aspect_ratio 'anyres'"):
        hf_config.model_config_from_hf({**d, "image_aspect_ratio": "anyres"}, vision=cfg.vision)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        cfg.replace(image_aspect_ratio="Pad")


def test_exported_vision_tower_is_complete(world, imported, exported, tmp_path, caplog):
    """The exported `siglip_vision_tower/` is a whole SigLIP: transformers loads it with nothing
    missing and gives the source model's outputs (every layer, post-LN, head)."""
    vdir = os.path.join(exported, "siglip_vision_tower")
    assert os.path.isfile(os.path.join(vdir, "preprocessor_config.json"))
    transformers.SiglipImageProcessor.from_pretrained(vdir)  # the official tower loads it too
    sig, info = transformers.SiglipVisionModel.from_pretrained(vdir, attn_implementation="eager",
                                                               output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref_sd, got_sd = world["sig"].state_dict(), sig.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    x = torch.from_numpy(PIXELS).permute(0, 3, 1, 2)
    with torch.no_grad():
        a, b = world["sig"](pixel_values=x), sig.eval()(pixel_values=x)
    assert torch.equal(a.pooler_output, b.pooler_output)
    # a fine-tuned tower is exported as trained: the layers the model runs come from the parameters
    cfg, params = imported
    tuned = jax.tree.map(lambda v: v, params)
    tuned["vision_tower"] = jax.tree.map(lambda v: np.asarray(v) * 1.5, params["vision_tower"])
    out = tmp_path / "tuned"
    export_videorefer(tuned, cfg, str(out), dtype="float32", base_config=hf_config.read_json(
        os.path.join(world["vr_dir"], "config.json")))
    r = st_io.SafetensorsReader(str(out / "siglip_vision_tower"))
    k0, k2 = "vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.encoder.layers.2.mlp.fc1.weight"
    np.testing.assert_array_equal(r.get(k0), world["sig_sd"][k0] * np.float32(1.5))
    np.testing.assert_array_equal(r.get(k2), world["sig_sd"][k2])
    # no source folder: only the layers the model runs, and a warning saying so
    with caplog.at_level("WARNING", logger="vrefer_jax.checkpoints.hf_export"):
        export_videorefer(params, cfg, str(tmp_path / "nosrc"), dtype="float32")
    assert "no SigLIP source folder" in caplog.text
    assert k0 in st_io.SafetensorsReader(str(tmp_path / "nosrc" / "siglip_vision_tower")).keys()
    # a moved export (mm_vision_tower no longer there) still finds its own tower
    import shutil

    moved = shutil.copytree(exported, tmp_path / "moved")
    hf_config.write_json(moved / "config.json", {**hf_config.read_json(moved / "config.json"),
                                                 "mm_vision_tower": str(tmp_path / "gone" / "siglip")})
    assert_same_tree(import_videorefer(str(moved))[1], params)
