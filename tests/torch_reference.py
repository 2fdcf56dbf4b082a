"""PyTorch references of VideoRefer, for the parity tests and `benchmarks/train_step.py`.

Built from independent code only: transformers' `SiglipVisionModel` and `Qwen2ForCausalLM`, timm's
`RegStage` (the STC connector, as VideoLLaMA2 builds it), and the region encoder written here from
the documented algorithm (bilinear `F.interpolate`, mask pooling, the looped token merge,
Linear-GELU-Linear). Nothing here imports vrefer_jax, so a reference cannot inherit a bug of the port.

Layouts are PyTorch's (NCHW frames, `[out, in]` weights) and parameter names are the official
checkpoint's (`VideoReferQwen2ForCausalLM`: `model.mm_projector.*`, `model.region_encoder.*`,
`model.layers.*`, `lm_head.*`, the stored tower under `model.vision_tower.vision_tower.*`), so a state
dict in the official layout loads with `VideoReferReference.load_official`.

timm and transformers are imported when first needed: the region-encoder pieces need torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from timm_compat import import_timm

# The official constants (videorefer/constants.py)
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
VIDEO_TOKEN_INDEX = -201

# The Qwen2Config fields of an official config.json (the decoder's part of it).
QWEN2_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings", "attention_dropout", "use_sliding_window", "max_window_layers")

# Official checkpoint prefixes of each part (VideoReferQwen2ForCausalLM.state_dict()).
TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
REGION_PREFIX = "model.region_encoder."


# ----------------------------------------------------------------------------- STC connector


def regstage(depth: int, in_chs: int, out_chs: int) -> torch.nn.Module:
    """timm `RegStage` as the STC connector builds it (SiLU, LayerNorm2d, stride 1)."""
    if not import_timm():
        raise ImportError("timm is not installed (the RegStage reference)")
    from timm import layers
    from timm.models import regnet

    return regnet.RegStage(depth=depth, in_chs=in_chs, out_chs=out_chs, stride=1, dilation=1,
                           act_layer=torch.nn.SiLU, norm_layer=layers.LayerNorm2d)


def mlp(depth: int, in_chs: int, out_chs: int) -> torch.nn.Sequential:
    """Linear, then (GELU, Linear) x (depth - 1): the connector readout / `mlpNx_gelu`."""
    mods = [torch.nn.Linear(in_chs, out_chs)]
    for _ in range(1, depth):
        mods += [torch.nn.GELU(), torch.nn.Linear(out_chs, out_chs)]
    return torch.nn.Sequential(*mods)


class STC(torch.nn.Module):
    """Same structure as the official STC family: s1 per frame, 3-D sampler, s2, (t h w) readout.

    forward: frame features [b, t, l, d] (l = g * g) -> video tokens [b, t' h' w', c]."""

    def __init__(self, kind: str, c_vis: int, c: int, depth: int, mlp_depth: int, downsample: Sequence[int]):
        super().__init__()
        downsample = tuple(downsample)
        self.s1 = regstage(depth, c_vis, c)
        if kind == "stp_connector":
            self.sampler = torch.nn.Sequential(torch.nn.AvgPool3d(downsample), torch.nn.SiLU())
        else:
            pad = 1 if kind == "stc_connector" else 0
            self.sampler = torch.nn.Sequential(
                torch.nn.Conv3d(c, c, kernel_size=downsample, stride=downsample, padding=pad, bias=True),
                torch.nn.SiLU())
        self.s2 = regstage(depth, c, c)
        self.readout = mlp(mlp_depth, c, c)

    def forward(self, x):
        b, t, l, d = x.shape
        g = math.isqrt(l)
        x = x.reshape(b, t, g, g, d).permute(0, 1, 4, 2, 3).reshape(b * t, d, g, g)
        x = self.s1(x)
        c = x.shape[1]
        x = x.reshape(b, t, c, g, g).permute(0, 2, 1, 3, 4)  # b c t h w
        x = self.sampler(x)
        _, _, t2, h2, w2 = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t2, c, h2, w2)
        x = self.s2(x)
        x = x.reshape(b, t2, c, h2, w2).permute(0, 1, 3, 4, 2).reshape(b, t2 * h2 * w2, c)
        return self.readout(x)


class MeanProjector(torch.nn.Module):
    """`temporal_aggregator` for linear / mlp2x_gelu: projector(frames.mean(1))."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x.mean(1))


def connector(kind: str, c_vis: int, c: int, depth: int = 4, mlp_depth: int = 2,
              downsample: Sequence[int] = (2, 2, 2)) -> torch.nn.Module:
    """The official projector of `mm_projector_type` kind (state-dict names as the checkpoint's)."""
    if kind in ("stc_connector_v35", "stc_connector", "stp_connector"):
        return STC(kind, c_vis, c, depth, mlp_depth, downsample)
    if kind == "linear":
        return torch.nn.Linear(c_vis, c)
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        return mlp(int(kind[3:-6]), c_vis, c)
    raise ValueError(f"no reference for projector_type {kind!r}")


# ----------------------------------------------------------------------------- region encoder


def token_merge(x, r):
    """x [1, n, d]; remove r tokens by merging runs of adjacent pairs whose cosine >= the r-th
    largest cosine (plain loop over the pairs, the way the official code walks them)."""
    a = F.normalize(x[:, :-1], p=2, dim=-1, eps=1e-12)
    b = F.normalize(x[:, 1:], p=2, dim=-1, eps=1e-12)
    sim = (a * b).sum(-1)  # [1, n-1]
    kth = torch.topk(sim.flatten(), r).values[-1]
    out, group = [], []
    for i in range(sim.shape[1]):
        group.append(x[:, i])
        if sim[0, i] < kth:  # pair (i, i+1) not merged: close the group
            out.append(torch.stack(group, 1).mean(1))
            group = []
    group.append(x[:, -1])
    out.append(torch.stack(group, 1).mean(1))
    return torch.stack(out, 1)


def mask_pool(feat, mask):
    """feat [M, C, g, g] fp32, mask [1, M, h, w] float -> [M, C]."""
    if feat.shape[-2:] != mask.shape[-2:]:
        mask = F.interpolate(mask, size=feat.shape[-2:], mode="bilinear", align_corners=False)
    mask = (mask > 0).to(mask.dtype).permute(1, 0, 2, 3)
    denorm = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return (feat * mask / denorm).sum(-1).sum(-1)


class RegionEncoder(torch.nn.Module):
    def __init__(self, vis_dim, out_dim, region_token_num):
        super().__init__()
        self.feat_linear = torch.nn.Sequential(
            torch.nn.Linear(vis_dim, out_dim), torch.nn.GELU(), torch.nn.Linear(out_dim, out_dim))
        self.region_token_num = region_token_num

    def forward(self, feats, masks, objects):
        """feats: per sample [F_b, P, C]; masks: per sample [M_b, h, w] (object-major);
        objects: per sample, per object, its frame indices. -> ([sum n, E], [n per object]).
        Pooling and merging run in fp32 (the official casts the features to the mask's dtype)."""
        tokens, nums = [], []
        for f, m, objs in zip(feats, masks, objects):
            idx = [i for o in objs for i in o]
            g = math.isqrt(f.shape[1])
            raw_dtype = f.dtype
            f = f[idx].reshape(len(idx), g, g, -1).permute(0, 3, 1, 2).float()
            pooled = mask_pool(f, m[None].float())
            start = 0
            for o in objs:
                v = pooled[start:start + len(o)][None]
                start += len(o)
                if v.shape[1] > self.region_token_num:
                    v = token_merge(v, v.shape[1] - self.region_token_num)
                nums.append(v.shape[1])
                tokens.append(v[0].to(raw_dtype))
        return self.feat_linear(torch.cat(tokens)), nums


# ----------------------------------------------------------------------------- the composite


class VideoReferReference(torch.nn.Module):
    """The official `VideoReferQwen2ForCausalLM` train-time forward, from the references above.

    vision: `SiglipVisionConfig` fields; text: `Qwen2Config` fields; projector: `connector` kwargs
    (kind, depth, mlp_depth, downsample). The tower is frozen and runs under `no_grad` (the official
    `SiglipVisionTower.forward`), every layer of it, taking `hidden_states[select_layer]`; the video
    and the annotated frames go through it in two calls, as the official
    `prepare_inputs_labels_for_multimodal`.
    """

    def __init__(self, vision: Mapping, text: Mapping, projector: Mapping, region_token_num: int,
                 region_token_id: int, select_layer: int = -2, attn_implementation: str = "sdpa"):
        super().__init__()
        import transformers

        self.vision_tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            **vision, attn_implementation=attn_implementation))
        self.vision_tower.requires_grad_(False).eval()
        c_vis, c = vision["hidden_size"], text["hidden_size"]
        kw = dict(projector)
        self.mm_projector = connector(kw.pop("kind"), c_vis, c, **kw)
        self.region_encoder = RegionEncoder(c_vis, c, region_token_num)
        self.lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **text, attn_implementation=attn_implementation))
        self.select_layer = select_layer
        self.region_token_id = region_token_id

    @classmethod
    def from_official_config(cls, config: Mapping, **kw) -> "VideoReferReference":
        """From an official `config.json` dict (Qwen2 fields at the top level, the tower's
        `SiglipVisionConfig` under `mm_vision_config`, the projector's depth fields)."""
        text = {k: config[k] for k in QWEN2_FIELDS if k in config}
        vision = {k: v for k, v in config["mm_vision_config"].items() if k != "model_type"}
        projector = dict(kind=config["mm_projector_type"], depth=config.get("mm_projector_depth", 4),
                         mlp_depth=config.get("mm_projector_mlp_depth", 2),
                         downsample=tuple(config.get("mm_projector_downsample", (2, 2, 2))))
        return cls(vision, text, projector, region_token_num=config.get("region_token_num", 4),
                   region_token_id=config["region_token_id"],
                   select_layer=config.get("mm_vision_select_layer", -2), **kw)

    # ------------------------------------------------------------------ weights

    def load_official(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> list[str]:
        """Load a state dict under the official names. Every projector, region-encoder and decoder
        tensor must be there; tower tensors the checkpoint lacks (the layers past the selected one,
        `post_layernorm`, `head`: never used) keep their init. Returns those missing tower names."""
        parts = {"tower": {}, "proj": {}, "region": {}, "lm": {}}
        for k, v in state.items():
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
            if k.startswith(TOWER_PREFIX):
                name = k[len(TOWER_PREFIX):]
                # transformers 5 flattens SiglipVisionModel (no `vision_model.` level)
                if name.startswith("vision_model.") and not hasattr(self.vision_tower, "vision_model"):
                    name = name[len("vision_model."):]
                parts["tower"][name] = t
            elif k.startswith(PROJECTOR_PREFIX):
                parts["proj"][k[len(PROJECTOR_PREFIX):]] = t
            elif k.startswith(REGION_PREFIX):
                parts["region"][k[len(REGION_PREFIX):]] = t
            elif k.startswith(("model.", "lm_head.")):
                parts["lm"][k] = t
            else:
                raise KeyError(f"unexpected tensor {k!r} in the state dict")
        self.mm_projector.load_state_dict(parts["proj"], strict=True)
        self.region_encoder.load_state_dict(parts["region"], strict=True)
        self.lm.load_state_dict(parts["lm"], strict=True)
        missing, unexpected = self.vision_tower.load_state_dict(parts["tower"], strict=False)
        if unexpected:
            raise KeyError(f"tower tensors the SigLIP reference does not have: {unexpected[:5]}")
        return list(missing)

    def trainable_parameters(self, groups: Iterable[str]) -> list[torch.nn.Parameter]:
        """Parameters of the named groups (the Flax tree's top-level names, which mirror the
        official modules: vision_tower, mm_projector, region_encoder, llm, lm_head); the others get
        requires_grad False."""
        groups = set(groups)
        modules = {"vision_tower": [self.vision_tower], "mm_projector": [self.mm_projector],
                   "region_encoder": [self.region_encoder], "llm": [self.lm.model], "lm_head": [self.lm.lm_head]}
        if unknown := groups - set(modules):
            raise ValueError(f"unknown groups {sorted(unknown)}")
        out = []
        for name, mods in modules.items():
            for m in mods:
                m.requires_grad_(name in groups)
                if name in groups:
                    out += list(m.parameters())
        return out

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> selected hidden state [N, P, C_vis] (the whole tower runs, as the official)."""
        out = self.vision_tower(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[self.select_layer]

    def forward(self, inputs: Mapping) -> torch.Tensor:
        """inputs: `official_inputs(batch)`. Returns the mean next-token CE over supervised tokens."""
        images = inputs["images"]  # [B, T, 3, S, S]
        B, T = images.shape[:2]
        feats = self.encode_frames(images.flatten(0, 1))
        video = self.mm_projector(feats.reshape((B, T) + feats.shape[1:]))  # [B, Nv, E]
        region_feats = self.encode_frames(torch.cat(inputs["region_frames"]))
        sizes = [f.shape[0] for f in inputs["region_frames"]]
        per_sample = list(torch.split(region_feats, sizes))
        obj_tokens, nums = self.region_encoder(per_sample, inputs["masks"], inputs["ann_indices"])
        embeds, labels = self.splice(inputs["input_ids"], inputs["labels"], video, obj_tokens, nums)
        return self.lm(inputs_embeds=embeds["embeds"], attention_mask=embeds["mask"], labels=labels).loss

    def splice(self, input_ids, labels, video, obj_tokens, nums):
        """The official placeholder replacement, one sample at a time: `<video>`/`<image>` -> the
        video tokens, each `<region>` -> its object's tokens (labels IGNORE), then right padding."""
        embed = self.lm.get_input_embeddings()
        rows, labs, k, start = [], [], 0, 0
        for b, (ids, lab) in enumerate(zip(input_ids, labels)):
            pieces, plabs, last = [], [], 0
            for i in range(len(ids)):
                tok = int(ids[i])
                if tok in (IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, self.region_token_id):
                    pieces.append(embed(ids[last:i]))
                    plabs.append(lab[last:i])
                    if tok == self.region_token_id:
                        add = obj_tokens[start:start + nums[k]].to(pieces[-1].dtype)
                        start += nums[k]
                        k += 1
                    else:
                        add = video[b]
                    pieces.append(add)
                    plabs.append(torch.full((add.shape[0],), IGNORE_INDEX, dtype=lab.dtype))
                    last = i + 1
            pieces.append(embed(ids[last:]))
            plabs.append(lab[last:])
            rows.append(torch.cat(pieces))
            labs.append(torch.cat(plabs))
        if k != len(nums):
            raise ValueError(f"{k} <region> tokens in the text but {len(nums)} objects")
        n = max(r.shape[0] for r in rows)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for b, r in enumerate(rows):
            mask[b, :r.shape[0]] = 1
        emb = torch.stack([F.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
        lab = torch.stack([F.pad(x, (0, n - x.shape[0]), value=IGNORE_INDEX) for x in labs])
        return dict(embeds=emb, mask=mask), lab


def official_inputs(batch: Mapping[str, np.ndarray]) -> dict:
    """The batch contract's padded numpy arrays -> what the official collate hands the model: per
    sample the unpadded ids and labels, the frames NCHW, the annotated frames each sample's
    objects use, their masks (object-major) and per object its indices into those frames."""
    out = dict(input_ids=[], labels=[], region_frames=[], masks=[], ann_indices=[])
    out["images"] = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["frames"], np.float32)
                                                          .transpose(0, 1, 4, 2, 3)))
    for b in range(batch["input_ids"].shape[0]):
        keep = np.asarray(batch["segment_ids"][b]) > 0
        out["input_ids"].append(torch.from_numpy(np.asarray(batch["input_ids"][b])[keep].astype(np.int64)))
        out["labels"].append(torch.from_numpy(np.asarray(batch["labels"][b])[keep].astype(np.int64)))
        frames, masks, objs = [], [], []
        for k in np.flatnonzero(batch["object_valid"][b]):
            idx = [int(i) for i in batch["object_frames"][b, k] if i >= 0]
            objs.append(list(range(len(frames), len(frames) + len(idx))))
            frames += idx
            masks.append(np.asarray(batch["object_masks"][b, k, :len(idx)], np.float32))
        rf = np.asarray(batch["region_frames"][b], np.float32)[frames].transpose(0, 3, 1, 2)
        out["region_frames"].append(torch.from_numpy(np.ascontiguousarray(rf)))
        out["masks"].append(torch.from_numpy(np.concatenate(masks)) if masks else torch.zeros((0, 1, 1)))
        out["ann_indices"].append(objs)
    return out


class ReferenceTrainStep:
    """One official training step (HF Trainer): forward, mean CE, backward, `clip_grad_norm_`,
    `torch.optim.AdamW` over `params`. bf16: `torch.autocast("cpu", bfloat16)` with fp32 master
    weights. Call -> (loss, grad norm before clipping), as Python floats."""

    def __init__(self, model: VideoReferReference, params: list, *, lr: float = 1e-5, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 1.0, bf16: bool = False):
        self.model, self.params, self.max_grad_norm, self.bf16 = model, params, max_grad_norm, bf16
        self.opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def loss(self, inputs) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(inputs)

    def __call__(self, inputs) -> tuple[float, float]:
        self.model.train()
        self.model.vision_tower.eval()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(inputs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        return float(loss.detach()), float(norm)
