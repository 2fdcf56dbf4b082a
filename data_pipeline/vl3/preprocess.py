"""The one VRVL3 host preprocessing entry point: a validated sample -> a `vl3_batch.Example`.

Used by the predictor (inference prompt) and by training (labels). Per sample, in memory:

1. media: a video sampled by fps (`frames.load_video`: the official `load_video`, with the annotated
   frames read at their original resolution), or one image; the path must stay inside the media root.
2. masks: every object's masks checked against their frames (`convert.object_masks`, shared with
   VideoRefer-7B's converter) and decoded at full resolution.
3. visual tokens: each frame through the processor (`image_processing.process_image`: smart_resize
   with the per-frame budget, merge-block patch order); video frames are pruned by frame
   difference (`pruning.keep_mask`, bf16 arithmetic as the released models); each kept token lists
   its merge group's patches.
4. regions: one per (object, annotated frame) in the object's key order: crop-and-zoom around the
   mask (`regions.crop_and_zoom`), the crop through the processor at stride 1 (the inference budget
   divided by the number of masks, as `mm_infer`; training divides by 1), the mask grid's on cells
   with their bilinear blend of crop patches, `min(Q, cells)` tokens, a k-means start seeded from
   the sample id (or injected: parity mode).
5. text: ChatML without a system prompt (`text.vl3_prompt`); "Time t s:" before every frame; the
   k-th `<region>` of the text binds to object k. An object annotated on M frames gets M regions
   (the official binds one mask per `<region>`; we expand the object's placeholder to M, as if the
   user had written `<region>` M times).

Everything the device needs is decided here: exact `<image>` / `<REGION>` rows and gather indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipeline import convert as convert_lib
from data_pipeline import schema
from data_pipeline import video as video_lib
from data_pipeline.vl3 import frames as frames_lib
from data_pipeline.vl3 import image_processing as ip
from data_pipeline.vl3 import pruning, regions as regions_lib
from vrefer_jax import vl3_batch
from vrefer_jax.text import vl3_prompt
from vrefer_jax.text.tokenizer import Tokenizer
from vrefer_jax.vl3_config import VL3Config

_ROLES = {"human": "user", "gpt": "assistant"}


@dataclasses.dataclass(frozen=True)
class VL3HostConfig:
    """Host options. Defaults: the official inference scripts (`infer.py`, Bench-Q: fps 1).

    fps / max_frames: video frame sampling (§5; Bench-D, HC-STVG and the demo use fps 4).
    divide_crop_budget: divide the crop budget by the number of masks (official `mm_infer`); the
      official training does not (False for training examples).
    parity: reproduce the official region count for float masks (with warnings) instead of refusing.
    prune_dtype: arithmetic of the frame-difference test ("bfloat16" as the released models).
    """

    fps: float | None = 1
    max_frames: int = frames_lib.MAX_FRAMES
    divide_crop_budget: bool = True
    parity: bool = False
    prune_dtype: str = "bfloat16"
    allow_absolute_media: bool = False
    decode_threads: int = 1


@dataclasses.dataclass
class Prepared(vl3_batch.Example):
    """A `vl3_batch.Example` plus what the caller reports (e.g. empty-mask fallbacks)."""

    warnings: list[str] = dataclasses.field(default_factory=list)


def messages_of(sample: schema.Sample) -> list[dict]:
    """The sample's conversation as chat messages (a leading non-human turn dropped, as officially)."""
    msgs = [{"role": _ROLES[schema.ROLES[t["from"]]], "content": t["value"]} for t in sample.conversations]
    while msgs and msgs[0]["role"] != "user":
        msgs = msgs[1:]
    return msgs


def _load_media(sample: schema.Sample, path: str, frame_ids: list[int], hc: VL3HostConfig):
    """-> (frames uint8 [T, H, W, 3], timestamps, {absolute frame index: annotated frame})."""
    if sample.modality == "video":
        sv = frames_lib.load_video(path, fps=hc.fps, max_frames=hc.max_frames, frame_ids=frame_ids,
                                   threads=hc.decode_threads)
        return sv.frames, sv.timestamps, dict(zip(frame_ids, sv.annotated))
    if sample.modality == "image":
        img = video_lib.read_image(path)
        return img[None], None, ({0: img} if frame_ids else {})
    return np.zeros((0, 1, 1, 3), np.uint8), None, {}


def _visual(cfg: VL3Config, modal: str, frames: np.ndarray, hc: VL3HostConfig):
    """Frames -> (processed frames, kept-token mask per frame [T, n])."""
    if modal == "text":
        return [], np.zeros((0, 0), bool)
    d = cfg.spatial_merge_size if modal == "video" else 1
    budget = ip.budget(cfg.max_visual_tokens, cfg.spatial_merge_size, d, len(frames), cfg.vision.patch_size)
    proc = [ip.process_image(f, max_pixels=budget, downsampling=d, patch_size=cfg.vision.patch_size)
            for f in frames]
    if modal == "video" and len(proc) > 1 and cfg.use_token_compression:
        keep = pruning.keep_mask(pruning.group_frame_patches(proc), dtype=hc.prune_dtype)
    else:
        keep = np.ones((len(proc), proc[0].num_tokens), bool)
    return proc, keep


def preprocess(sample: schema.Sample, media_root: str, cfg: VL3Config, tokenizer: Tokenizer,
               hc: VL3HostConfig = VL3HostConfig(), *, training: bool = False,
               kmeans_permutations: Sequence[Sequence[int] | None] | None = None) -> Prepared:
    """One sample -> a `Prepared` VRVL3 example. Raises `schema.SampleError` naming the sample and
    field (media, masks, region counts, text). `training`: the whole conversation with labels;
    else the first user turn as the inference prompt. `kmeans_permutations`: per region, an injected
    k-means start (parity with a recorded official run); default: seeded from the sample id."""
    sid = sample.sample_id
    Q, merge = cfg.region_token_num, cfg.merge_group
    path = convert_lib.media_path(sample, media_root, hc.allow_absolute_media)
    all_frames, ann_indices = sample.region_layout()
    try:
        frames, stamps, annotated = _load_media(sample, path, list(all_frames), hc)
    except video_lib.MediaError as e:
        raise schema.SampleError(e.reason, sid, sample.modality, e.message) from None
    objects = convert_lib.object_masks(sample, {f: a.shape[:2] for f, a in annotated.items()}, ann_indices)
    modal = sample.modality if sample.modality in ("video", "image") else "text"
    try:
        proc, keep = _visual(cfg, modal, frames, hc)
    except ValueError as e:
        raise schema.SampleError("bad_media_size", sid, sample.modality, str(e)) from None

    # Pack the frames' patches; each kept merged token lists its group's patches.
    patches, coords, segs, visual = [], [], [], []
    offset = 0
    for t, p in enumerate(proc):
        patches.append(p.patches)
        coords.append(p.coords)
        segs.append(np.full(len(p.patches), t + 1, np.int32))
        groups = p.groups[keep[t]] + offset
        visual.append(np.pad(groups, ((0, 0), (0, merge - groups.shape[1])), constant_values=-1))
        offset += len(p.patches)
    tokens_per_image = keep.sum(1).astype(int).tolist()

    # Regions: one per (object, mask) in prompt order.
    n_masks = sum(len(o.frames) for o in objects)
    warnings: list[str] = []
    packed, counts, per_object = [], [], []
    budget_div = n_masks if (hc.divide_crop_budget and not training and n_masks) else 1
    crop_budget = ip.budget(cfg.max_visual_tokens, cfg.spatial_merge_size, 1, budget_div, cfg.vision.patch_size)
    r = 0
    for k, obj in enumerate(objects):
        masks = obj.decode()
        per_object.append(len(masks))
        for key, f, m in zip(sample.objects[k].keys, obj.frames, masks):
            name = f"sample {sid} object {k} frame {key}"
            field = f"annotation[{k}][{key!r}]"
            try:
                crop = regions_lib.crop_and_zoom(annotated[f], m.astype(np.uint8), name=name)
                rt = regions_lib.region_tokens(crop, Q, parity=hc.parity, name=name)
                cp = ip.process_image(crop.image, max_pixels=crop_budget, downsampling=1,
                                      patch_size=cfg.vision.patch_size)
            except regions_lib.RegionCountMismatch as e:
                raise schema.SampleError("region_count_mismatch", sid, field, str(e)) from None
            except ValueError as e:
                raise schema.SampleError("bad_region", sid, field, str(e)) from None
            warnings += list(crop.warnings) + list(rt.warnings)
            cells, weights = regions_lib.region_cells(rt.grid, cp.grid, offset)
            perm = kmeans_permutations[r] if kmeans_permutations is not None else None
            init = regions_lib.kmeans_init(len(cells), Q, regions_lib.seeded_rng(sid, r) if perm is None else None,
                                           permutation=perm)
            packed.append((cells, weights, init))
            counts.append(min(Q, len(cells)))
            patches.append(cp.patches)
            coords.append(cp.coords)
            segs.append(np.full(len(cp.patches), len(proc) + r + 1, np.int32))
            offset += len(cp.patches)
            r += 1

    msgs = messages_of(sample)
    if not msgs:
        raise schema.SampleError("bad_conversations", sid, "conversations", "no human turn")
    msgs = repeat_placeholders(msgs, per_object)
    kw = dict(modal=modal, tokens_per_image=tokens_per_image, region_token_num=Q,
              num_frames=len(proc) if modal == "video" else None, timestamps=stamps if modal == "video" else None,
              region_token_counts=counts, image_token_id=cfg.image_token_id, region_token_id=cfg.region_token_id)
    try:
        if training:
            ids, labels, vis_idx, reg_idx = vl3_prompt.training_example(tokenizer, msgs, **kw)
        else:
            # the first user turn, or a chat up to its question (`schema.prompt_turns`)
            ids, vis_idx, reg_idx = vl3_prompt.inference_prompt(tokenizer, msgs[: len(schema.prompt_turns(sample))],
                                                                **kw)
            labels = None
    except ValueError as e:
        raise schema.SampleError("bad_conversations", sid, "conversations", str(e)) from None

    D = cfg.vision.patch_dim
    rf = regions_lib.pack_regions(packed, Q)
    return Prepared(
        sample_id=sid, input_ids=ids, visual_index=vis_idx, region_index=reg_idx, labels=labels,
        patches=np.concatenate(patches) if patches else np.zeros((0, D), np.float32),
        patch_segments=np.concatenate(segs) if segs else np.zeros(0, np.int32),
        patch_coords=np.concatenate(coords).astype(np.int32) if coords else np.zeros((0, 2), np.int32),
        visual_patches=np.concatenate(visual) if visual else np.zeros((0, merge), np.int32),
        region_cells=rf["region_cells"], region_weights=rf["region_weights"],
        region_num_cells=rf["region_num_cells"], region_init=rf["region_init"],
        meta=dict(timestamps=stamps, tokens_per_image=tokens_per_image, region_tokens=counts,
                  num_frames=len(proc)),
        warnings=warnings)


def repeat_placeholders(msgs: Sequence[dict], masks_per_object: Sequence[int]) -> list[dict]:
    """The k-th `<region>` over the conversation (in turn order) -> `masks_per_object[k]` copies, so
    that each mask binds to one placeholder as the official expects. Extra placeholders are kept
    (the prompt builder then reports the count mismatch, naming both numbers)."""
    k, out = 0, []
    for m in msgs:
        parts = m["content"].split(vl3_prompt.REGION_PLACEHOLDER)
        text = parts[0]
        for part in parts[1:]:
            n = masks_per_object[k] if k < len(masks_per_object) else 1
            text += vl3_prompt.REGION_PLACEHOLDER * n + part
            k += 1
        out.append(dict(m, content=text))
    return out
