"""The family protocol: one small record of callables, shaped by the two families we have."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


def lazy(target: str) -> Callable[..., Any]:
    """"package.module:function" -> a function that imports it on first call, so the registry can name
    a family's checkpoint, data and inference code without importing it (those layers import the
    registry; `tests/test_layering.py` reads these strings as imports)."""
    module, _, name = target.partition(":")

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`{target}` (imported on first call)."
    return call


class UnknownFamily(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family plugs in. Callables take the family's config first.

    name:            registry key, also the gin / CLI name (`--family`)
    model_types:     Hugging Face `config.json` `model_type` values its checkpoints carry
    config_class:    its gin-configurable model config (a frozen dataclass)
    module:          cfg -> the Flax module (`embed_inputs(batch, out_len)`, `decode`, `logits`,
                     `embed_tokens`, `__call__(batch, out_len, return_hidden)`)
    batch_keys:      the batch contract's fields (`labels` among them); generation reads the rest
    optional_batch_keys: fields only some training batches hold (VideoRefer-7B's pooled packed
                     batches: `video_index`); the train / eval steps pass them through when present
    dummy_batch:     (cfg, batch_size=1, abstract=False) -> a batch for init / eval_shape
    validate:        (cfg, batch, out_len, sample_ids) -> None; raises `BatchError` naming the sample
    output_embedding: params -> [E, V] matrix of the LM head (the 2B VRVL3 ties it to the embedding)
    param_groups:    freezing groups in optimizer order -> top-level parameter names
    key_rules:       cfg -> `key_map.KeyRule` list for its official checkpoint (lazy import)
    ignore_patterns: cfg -> checkpoint tensors it does not build
    host:            (cfg, tokenizer, **options) -> the predictor's host side (`prepare(sample,
                     media_root, allow_absolute)`, `make_batch(rows) -> (batch, out_len)`,
                     `group_key(prepared)`, `configure(**options)`, `num_frames`)
    host_option_names: the frame options its host takes (`vrefer-eval` / `vrefer-infer` flags)
    bench_protocol:  prompt protocol of its benchmark scripts (`bench_formats.PROTOCOLS`)
    benchmark_options: benchmark -> host options of its official evaluation scripts
    import_checkpoint: (src, out, *, param_dtype=None, **options) -> cfg: an official Hugging Face
                     folder -> an imported folder (`checkpoints.store` layout); options a family
                     does not take are refused by name (`vrefer-convert import`)
    load_hf:         (folder, **options) -> (cfg, params): an official folder imported in memory
                     (the predictor's on-the-fly load); options a family does not take are refused
    export_checkpoint: (src, out, *, dtype, max_shard_size, tokenizer=None, overwrite=False,
                     **options) -> the config.json dict: an imported folder -> an official folder
                     (`vrefer-convert export`)
    train_loader:    (cfg, sources, tokenizer, weights=None, **loader_fields) -> the training /
                     eval loader (`data_pipeline.loader.LoaderIterator`): `LoaderConfig` built from
                     `loader_fields` and the gin bindings in force (the trainer enters the `train/`
                     or `eval/` scope), with what the model fixes filled in
    check_tokenizer: (cfg, tokenizer) -> None; raises ValueError when the model's special ids and
                     the tokenizer's disagree (the trainer refuses to start)
    hf_config:       cfg -> the Hugging Face `config.json` dict written with a run's `final/`
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    module: Callable[[Any], Any]
    batch_keys: tuple[str, ...]
    dummy_batch: Callable[..., dict]
    validate: Callable[..., None]
    output_embedding: Callable[[Mapping], Any]
    param_groups: Mapping[str, tuple[str, ...]]
    key_rules: Callable[[Any], list]
    ignore_patterns: Callable[[Any], list]
    host: Callable[..., Any]
    host_option_names: tuple[str, ...] = ()
    optional_batch_keys: tuple[str, ...] = ()
    bench_protocol: str = "videorefer"
    benchmark_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    import_checkpoint: Callable[..., Any] | None = None
    export_checkpoint: Callable[..., Any] | None = None
    load_hf: Callable[..., Any] | None = None
    # path -> tokenizer (None: `text.tokenizer.load_tokenizer`); VRVL3's adds `<image>` / `<REGION>`
    tokenizer_loader: Callable[[str], Any] | None = None
    train_loader: Callable[..., Any] | None = None
    check_tokenizer: Callable[..., None] | None = None
    hf_config: Callable[[Any], dict] | None = None

    def load_tokenizer(self, path: str):
        """The family's tokenizer from a folder or file."""
        if self.tokenizer_loader is not None:
            return self.tokenizer_loader(path)
        from vrefer_jax.text.tokenizer import load_tokenizer

        return load_tokenizer(path)

    def host_options(self, protocol: str, **given) -> dict[str, Any]:
        """The host options of an official protocol (`benchmark_options[protocol]`: a benchmark, or
        "infer" for `vrefer-infer`), overridden by the given ones that are not None. An option this
        family's host does not take raises `ValueError` naming it and the ones it does take."""
        opts = dict(self.benchmark_options.get(protocol, {}))
        for k, v in given.items():
            if v is None:
                continue
            if k not in self.host_option_names:
                raise ValueError(f"{k} does not apply to {self.name} models (their host options: "
                                 f"{', '.join(self.host_option_names)})")
            opts[k] = v
        return opts

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The fields generation needs (the contract without `labels`)."""
        return tuple(k for k in self.batch_keys if k != "labels")

    def abstract_params(self, cfg, boxed: bool = False):
        """Parameter shapes (no allocation) via `jax.eval_shape` of `init` on a dummy batch."""
        import flax.linen as nn
        import jax

        batch = self.dummy_batch(cfg, abstract=True)
        shapes = jax.eval_shape(lambda b: self.module(cfg).init(jax.random.key(0), b, out_len=_out_len(b)), batch)
        return shapes["params"] if boxed else nn.meta.unbox(shapes["params"])

    def init_params(self, cfg, rng):
        """Random parameters in the config's param dtype, unboxed."""
        import flax.linen as nn

        batch = self.dummy_batch(cfg)
        return nn.meta.unbox(self.module(cfg).init(rng, batch, out_len=_out_len(batch))["params"])


def _out_len(batch) -> int:
    """The dummy batches are built so that their expanded length is their text length + slack."""
    return int(batch["input_ids"].shape[1])
