"""VRVL3 host side for the predictor: `data_pipeline.vl3.preprocess` per sample, then buckets.

Every length is exact on the host, so a batch only needs padding: each size of the contract (text
L, patches N, visual tokens V, regions R, cells per region C) is rounded up to a power of two above
a floor, so a benchmark compiles a handful of programs and any mix of images, videos and text-only
rows shares one batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from data_pipeline import schema
from data_pipeline.vl3 import preprocess as pre
from vrefer_jax import vl3_batch
from vrefer_jax.inference.videorefer_host import next_pow2
from vrefer_jax.text.tokenizer import Tokenizer
from vrefer_jax.vl3_config import VL3Config

BUCKET_FLOORS = {"L": 64, "N": 256, "V": 64, "R": 1, "C": 16}


class VL3Host:
    """fps / max_frames / parity / divide_crop_budget: `preprocess.VL3HostConfig`."""

    def __init__(self, cfg: VL3Config, tokenizer: Tokenizer, *, bucket_floors: Mapping[str, int] | None = None,
                 allow_absolute_media: bool = False, **options):
        self.cfg, self.tokenizer = cfg, tokenizer
        unknown = set(bucket_floors or {}) - set(BUCKET_FLOORS)
        if unknown:
            raise ValueError(f"unknown bucket_floors keys {sorted(unknown)}; expected {sorted(BUCKET_FLOORS)}")
        self.bucket_floors = {**BUCKET_FLOORS, **(bucket_floors or {})}
        self.options = pre.VL3HostConfig(allow_absolute_media=allow_absolute_media, **options)
        for name, want in (("<image>", cfg.image_token_id), ("<REGION>", cfg.region_token_id)):
            got = tokenizer.token_to_id(name)
            if got != want:
                raise ValueError(f"tokenizer's {name} id {got} != the model's {want}")

    @property
    def num_frames(self) -> int:  # the predictor reports it; VRVL3 samples by fps
        return self.options.max_frames

    def prepare(self, sample: schema.Sample, media_root: str, allow_absolute: bool = False) -> pre.Prepared:
        hc = dataclasses.replace(self.options, allow_absolute_media=True) if allow_absolute else self.options
        return pre.preprocess(sample, media_root, self.cfg, self.tokenizer, hc)

    def make_batch(self, rows: Sequence[pre.Prepared]) -> tuple[dict, int]:
        fl = self.bucket_floors
        chunk = self.cfg.vision_attention_chunk
        if chunk:  # block attention: no image / frame / crop may cross a block of `chunk` patches
            rows = [vl3_batch.chunk_example(r, chunk) for r in rows]
        dims = {k: next_pow2(max(r.sizes()[k] for r in rows), fl[k]) for k in vl3_batch.SIZE_KEYS}
        if chunk:
            dims["N"] = -(-dims["N"] // chunk) * chunk
        batch = vl3_batch.stack([vl3_batch.pad_example(r, **dims, Q=self.cfg.region_token_num,
                                                       pad_token_id=self.cfg.pad_token_id, with_labels=False)
                                 for r in rows])
        del batch["sample_ids"]
        return batch, dims["L"]

    def group_key(self, p: pre.Prepared) -> int:
        return 0  # any rows mix: every size is padded

    def configure(self, **options) -> None:
        self.options = dataclasses.replace(self.options, **options)
