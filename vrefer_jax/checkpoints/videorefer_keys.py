"""Hugging Face key rules of the VideoRefer family, as data (`key_map.KeyRule` lists).

Which official tensor name feeds which Flax parameter, and in what layout, is a property of the
checkpoint format, not of the modules: the models under `vrefer_jax/models/` know nothing of it
(they do not import this package), and `key_map` is the generic engine that applies these lists.

One function per sub-tree, each relative to its own sub-tree (no prefixes); the composite
`videorefer_rules` prefixes them into the official `VideoReferQwen2ForCausalLM` names. The part
rules (`siglip_rules`, `qwen2_rules`, ...) are reusable by another family built from the same parts.

  siglip_rules / siglip_ignore_patterns   `SiglipVisionModel` (`vision_model.*`)
  siglip_patch_embedding_rules / siglip_layer_rules   its parts (also VRVL3's SigLIP-NaViT)
  regstage_rules                          one timm RegStage (`b1.conv1.conv.weight`)
  connector_rules                         `mm_projector.*` (STC, linear, mlpNx_gelu)
  mlp_rules                               an nn.Sequential MLP (`readout.0`, `feat_linear.2`, ...)
  object_encoder_rules                    `region_encoder.*`
  qwen2_rules / lm_head_rules / causal_lm_rules   `Qwen2Model` / `Qwen2ForCausalLM` (tied: no lm_head)
  causal_lm_ignore_patterns               a tied model's redundant `lm_head.weight`
  videorefer_rules / videorefer_ignore_patterns   the whole official checkpoint
"""

from __future__ import annotations

from vrefer_jax.checkpoints.key_map import KeyRule, prefixed
from vrefer_jax.config import ConnectorConfig, ModelConfig, ObjectEncoderConfig, TextConfig, VisionConfig
from vrefer_jax.batch import projector_kind

# ----------------------------------------------------------------------------- SigLIP tower

_SIGLIP = "vision_model."


def siglip_patch_embedding_rules() -> list[KeyRule]:
    """The patch conv, relative to `vision_model.` (shared by SigLIP and VRVL3's SigLIP-NaViT)."""
    return [
        KeyRule("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"), "conv"),
        KeyRule("embeddings.patch_embedding.bias", ("embeddings", "patch_embedding", "bias"), "vector"),
    ]


def siglip_layer_rules() -> list[KeyRule]:
    """The scanned encoder layers, relative to `vision_model.` (`encoder.layers.{i}.*` <->
    `encoder/layers/...`; shared by SigLIP and VRVL3's SigLIP-NaViT)."""
    hf, fx = "encoder.layers.{i}.", ("encoder", "layers")
    rules = []
    for norm in ("layer_norm1", "layer_norm2"):
        rules += [KeyRule(f"{hf}{norm}.weight", fx + (norm, "scale"), "vector"),
                  KeyRule(f"{hf}{norm}.bias", fx + (norm, "bias"), "vector")]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += [KeyRule(f"{hf}self_attn.{proj}.weight", fx + ("self_attn", proj, "kernel"), "linear",
                          in_ndim=2 if proj == "out_proj" else 1),
                  KeyRule(f"{hf}self_attn.{proj}.bias", fx + ("self_attn", proj, "bias"), "vector")]
    for fc in ("fc1", "fc2"):
        rules += [KeyRule(f"{hf}mlp.{fc}.weight", fx + ("mlp", fc, "kernel"), "linear"),
                  KeyRule(f"{hf}mlp.{fc}.bias", fx + ("mlp", fc, "bias"), "vector")]
    return rules


def siglip_rules(cfg: VisionConfig) -> list[KeyRule]:
    """Key map for the tower, relative to a `SiglipVisionModel` checkpoint (`vision_model.*`).

    Google's SigLIP checkpoints and VideoRefer's stored tower (after its
    `model.vision_tower.vision_tower.` prefix) both use these names.
    """
    rules = [*siglip_patch_embedding_rules(),
             KeyRule("embeddings.position_embedding.weight",
                     ("embeddings", "position_embedding", "embedding"), "identity")]
    if cfg.num_layers_run:
        rules += siglip_layer_rules()
    return prefixed(rules, _SIGLIP, ())


def siglip_ignore_patterns(cfg: VisionConfig) -> list[str]:
    """Regexes (full match) for checkpoint tensors the tower does not build: encoder layers
    >= num_layers_run, `post_layernorm`, the pooling `head`, and the `position_ids` buffer that
    some older exports persisted."""
    pats = [r"vision_model\.post_layernorm\..*", r"vision_model\.head\..*",
            r"vision_model\.embeddings\.position_ids"]
    skipped = range(cfg.num_layers_run, cfg.num_hidden_layers)
    if len(skipped):
        pats.append(r"vision_model\.encoder\.layers\.(" + "|".join(map(str, skipped)) + r")\..*")
    return pats


# ----------------------------------------------------------------------------- connector


def regstage_rules(depth: int, in_chs: int, out_chs: int) -> list[KeyRule]:
    """Key map of one stage, relative to the stage (`b1.conv1.conv.weight` <-> b1/conv1/conv/kernel)."""
    rules: list[KeyRule] = []
    for i in range(1, depth + 1):
        b = f"b{i}"
        convs = ["conv1", "conv2", "conv3"] + (["downsample"] if i == 1 and in_chs != out_chs else [])
        for c in convs:
            rules += [
                KeyRule(f"{b}.{c}.conv.weight", (b, c, "conv", "kernel"), "conv"),
                KeyRule(f"{b}.{c}.bn.weight", (b, c, "bn", "scale"), "vector"),
                KeyRule(f"{b}.{c}.bn.bias", (b, c, "bn", "bias"), "vector"),
            ]
        for fc in ("fc1", "fc2"):
            rules += [
                KeyRule(f"{b}.se.{fc}.weight", (b, "se", fc, "kernel"), "conv"),
                KeyRule(f"{b}.se.{fc}.bias", (b, "se", fc, "bias"), "vector"),
            ]
    return rules


def mlp_rules(depth: int, hf_prefix: str, flax_prefix: str) -> list[KeyRule]:
    """An nn.Sequential(Linear, GELU, Linear, ...) of `depth` Linears: `{hf_prefix}{0,2,..}.{weight,bias}`
    <-> `{flax_prefix}_{0,2,..}/{kernel,bias}` (`connector.mlp`)."""
    rules = []
    for j in range(depth):
        i = 2 * j  # nn.Sequential indices: Linear at 0, 2, ...; the GELUs in between have no weights
        rules += [KeyRule(f"{hf_prefix}{i}.weight", (f"{flax_prefix}_{i}", "kernel"), "linear"),
                  KeyRule(f"{hf_prefix}{i}.bias", (f"{flax_prefix}_{i}", "bias"), "vector")]
    return rules


def connector_rules(cfg: ConnectorConfig, in_features: int, out_features: int) -> list[KeyRule]:
    """Key map relative to `mm_projector.` (e.g. `s1.b1.conv1.conv.weight`, `sampler.0.weight`,
    `readout.0.weight`; `weight` for `linear`; `0.weight` for `mlp2x_gelu`)."""
    kind, n_layers = projector_kind(cfg.projector_type)
    if kind == "linear":
        return [KeyRule("weight", ("kernel",), "linear"), KeyRule("bias", ("bias",), "vector")]
    if kind == "mlp":
        return mlp_rules(n_layers, "", "layers")
    rules = [
        *prefixed(regstage_rules(cfg.depth, in_features, out_features), "s1.", ("s1",)),
        *prefixed(regstage_rules(cfg.depth, out_features, out_features), "s2.", ("s2",)),
    ]
    if cfg.projector_type != "stp_connector":  # AvgPool3d has no parameters
        rules += [KeyRule("sampler.0.weight", ("sampler_0", "kernel"), "conv"),
                  KeyRule("sampler.0.bias", ("sampler_0", "bias"), "vector")]
    return rules + mlp_rules(cfg.mlp_depth, "readout.", "readout")


# ----------------------------------------------------------------------------- object encoder


def object_encoder_rules(cfg: ObjectEncoderConfig, vis_dim: int | None = None,
                         out_dim: int | None = None) -> list[KeyRule]:
    """Flax tree <-> official `region_encoder.*` names (relative, no prefix)."""
    del cfg, vis_dim, out_dim  # same names at every size
    return [
        KeyRule("feat_linear.0.weight", ("feat_linear_0", "kernel"), "linear"),
        KeyRule("feat_linear.0.bias", ("feat_linear_0", "bias"), "vector"),
        KeyRule("feat_linear.2.weight", ("feat_linear_2", "kernel"), "linear"),
        KeyRule("feat_linear.2.bias", ("feat_linear_2", "bias"), "vector"),
    ]


# ----------------------------------------------------------------------------- Qwen2


def qwen2_rules(cfg: TextConfig) -> list[KeyRule]:
    """Flax `Qwen2Model` tree <-> HF `Qwen2Model` names (no `model.` prefix)."""
    del cfg  # the names do not depend on the sizes
    a = "layers.{i}.self_attn."
    rules = [
        KeyRule("embed_tokens.weight", ("embed_tokens", "embedding"), "identity"),
        KeyRule("layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), "vector"),
        KeyRule("layers.{i}.post_attention_layernorm.weight",
                ("layers", "post_attention_layernorm", "scale"), "vector"),
        KeyRule(a + "o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), "linear", in_ndim=2),
        KeyRule("norm.weight", ("norm", "scale"), "vector"),
    ]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules.append(KeyRule(a + p + ".weight", ("layers", "self_attn", p, "kernel"), "linear"))
        rules.append(KeyRule(a + p + ".bias", ("layers", "self_attn", p, "bias"), "vector"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(KeyRule(f"layers.{{i}}.mlp.{p}.weight", ("layers", "mlp", p, "kernel"), "linear"))
    return rules


def lm_head_rules() -> list[KeyRule]:
    return [KeyRule("lm_head.weight", ("lm_head", "kernel"), "linear")]


def causal_lm_rules(cfg: TextConfig) -> list[KeyRule]:
    """Flax `Qwen2ForCausalLM` tree <-> HF `Qwen2ForCausalLM` names. Tied (`cfg.tie_word_embeddings`):
    no `lm_head` rule, the head is `model.embed_tokens.weight` (see `causal_lm_ignore_patterns`)."""
    rules = prefixed(qwen2_rules(cfg), "model.", ("model",))
    return rules if cfg.tie_word_embeddings else rules + lm_head_rules()


def causal_lm_ignore_patterns(cfg: TextConfig) -> list[str]:
    """Tied: a torch `state_dict()` still lists `lm_head.weight` (the embedding under a second name;
    `save_pretrained` drops it), so it is not an unexpected tensor. Untied: nothing to ignore."""
    return [r"lm_head\.weight"] if cfg.tie_word_embeddings else []


# ----------------------------------------------------------------------------- VideoRefer

STORED_TOWER = "model.vision_tower.vision_tower."  # the release's (unused) copy of the SigLIP tower


def videorefer_rules(cfg: ModelConfig) -> list[KeyRule]:
    """Flax tree <-> official `VideoReferQwen2ForCausalLM` checkpoint names."""
    c = cfg
    return [
        *prefixed(siglip_rules(c.vision), STORED_TOWER, ("vision_tower",)),
        *prefixed(connector_rules(c.connector, c.vision.hidden_size, c.text.hidden_size),
                  "model.mm_projector.", ("mm_projector",)),
        *prefixed(object_encoder_rules(c.object_encoder, c.vision.hidden_size, c.text.hidden_size),
                  "model.region_encoder.", ("region_encoder",)),
        *prefixed(qwen2_rules(c.text), "model.", ("llm",)),
        *lm_head_rules(),
    ]


def videorefer_ignore_patterns(cfg: ModelConfig) -> list[str]:
    """Checkpoint tensors we do not build (vision layers past the selected one, post-LN, head)."""
    return [STORED_TOWER.replace(".", "\\.") + p for p in siglip_ignore_patterns(cfg.vision)]
