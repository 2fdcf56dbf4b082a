"""`vrefer-convert`: official Hugging Face checkpoints <-> our Orbax parameter folders, any model family.

    vrefer-convert import SRC OUT [--param-dtype float32] [--vision-tower DIR | --use-stored-vision-tower]
    vrefer-convert from-parts OUT --qwen2 DIR --siglip DIR [--projector FILE] [--region-encoder FILE]
    vrefer-convert export SRC OUT [--dtype DTYPE] [--max-shard-size 5GB] [--tokenizer DIR]
                                  [--mm-vision-tower NAME | --vision-encoder PATH]
    vrefer-convert export-adapter SRC OUT [--base-model NAME]

`export` of a LoRA run's folder (a `final/` whose model config has `TextConfig.lora`) folds the
adapters into the kernels first: the official layout, merged. `export-adapter` writes the adapter
alone in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, `peft_export`).

(`python -m vrefer_jax.checkpoints.cli ...` without the console script.)

`import` picks the model family from SRC's config.json `model_type` (`families.for_model_type`:
`videorefer_qwen2` -> VideoRefer-7B, `videollama3_qwen2` -> VideoRefer-VideoLLaMA3); `export` from the
family stored in SRC's `model_config.json`. `--vision-tower`, `--use-stored-vision-tower` and
`--mm-vision-tower` are VideoRefer-7B's (its SigLIP tower lives in a separate folder),
`--vision-encoder` VRVL3's; a family refuses the other's options. `from-parts` builds VideoRefer-7B.

An imported folder OUT holds `params/` (Orbax `StandardCheckpointer`), `model_config.json` (the
model config and its family) and `hf/` (the source `config.json`, tokenizer files and
`generation_config.json`, and for VideoRefer-7B `hf/siglip_vision_tower/`, a copy of the SigLIP
folder read), all reused by `export`: the exported folder keeps the checkpoint's generation config.
Reading and writing that layout is a library, `vrefer_jax.checkpoints.store`; the conversions are
`hf_import` / `hf_export` (VideoRefer-7B) and `vl3_hf` (VRVL3); this module is only the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vrefer_jax.checkpoints.store import save_imported


def _set(a, *names) -> dict:
    """The family-specific options the user gave (unset ones are left to the family's defaults)."""
    return {n: getattr(a, n) for n in names if getattr(a, n) not in (None, False)}


def cmd_import(a) -> None:
    from vrefer_jax import families
    from vrefer_jax.checkpoints import hf_config

    family = families.for_model_type(hf_config.find_config(a.src).get("model_type"))
    family.import_checkpoint(a.src, a.out, param_dtype=a.param_dtype,
                             **_set(a, "vision_tower", "use_stored_vision_tower"))


def cmd_from_parts(a) -> None:
    from vrefer_jax.checkpoints import hf_config
    from vrefer_jax.checkpoints.parts import init_from_parts
    from vrefer_jax.config import model_config_from_gin

    base = None
    if a.gin:
        base = model_config_from_gin(a.gin)
    cfg, params = init_from_parts(a.qwen2, a.siglip, a.projector, a.region_encoder, tokenizer=a.tokenizer,
                                  rng=a.seed, base_cfg=base, dtype=a.param_dtype)
    hf_cfg = hf_config.model_config_to_hf(cfg, mm_vision_tower=os.path.abspath(a.siglip), torch_dtype="bfloat16")
    # generation_config.json: the LLM's, whatever the tokenizer's source
    save_imported(a.out, cfg, params, hf_cfg, a.tokenizer or a.qwen2, a.siglip, generation_src=a.qwen2)


def cmd_export(a) -> None:
    from vrefer_jax import families
    from vrefer_jax.checkpoints.store import read_model_config

    family = families.for_config(read_model_config(a.src))
    kw = _set(a, "dtype", "mm_vision_tower", "vision_encoder")
    family.export_checkpoint(a.src, a.out, max_shard_size=a.max_shard_size, tokenizer=a.tokenizer,
                             overwrite=a.overwrite, **kw)


def cmd_export_adapter(a) -> None:
    from vrefer_jax.checkpoints.peft_export import save_adapter
    from vrefer_jax.checkpoints.store import load_imported

    cfg, params = load_imported(a.src)
    names = save_adapter(cfg, params, a.out, base_model=a.base_model)
    print(f"export-adapter: {len(names)} tensors (rank {cfg.text.lora.rank}, alpha {cfg.text.lora.alpha})",
          file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrefer-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("import", help="an official HF folder (VideoRefer-7B or VRVL3) -> an Orbax params folder")
    i.add_argument("src", help="checkpoint folder (config.json + safetensors); its model_type picks the family")
    i.add_argument("out", help="output folder")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--vision-tower", help="VideoRefer-7B: SigLIP folder (default: config's mm_vision_tower if local)")
    g.add_argument("--use-stored-vision-tower", action="store_true",
                   help="VideoRefer-7B: use the checkpoint's own copy of the tower (the official loader ignores it)")
    i.add_argument("--param-dtype", default=None, help="parameter dtype (default: float32)")
    i.set_defaults(fn=cmd_import)

    f = sub.add_parser("from-parts", help="Qwen2 + SigLIP (+ projector, region encoder) -> Orbax params")
    f.add_argument("out")
    f.add_argument("--qwen2", required=True, help="Qwen2 / Qwen2.5 causal-LM folder")
    f.add_argument("--siglip", required=True, help="SigLIP folder")
    f.add_argument("--projector", help="mm_projector.bin / .safetensors (default: fresh init)")
    f.add_argument("--region-encoder", help="region_encoder.bin / .safetensors (default: fresh init)")
    f.add_argument("--tokenizer", help="tokenizer folder/file (default: the Qwen2 folder)")
    f.add_argument("--gin", action="append", default=[], help="gin file for the non-size settings")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--param-dtype", default=None)
    f.set_defaults(fn=cmd_from_parts)

    e = sub.add_parser(
        "export", help="an Orbax params folder (from import/from-parts) -> an official HF folder of its family",
        description="Writes the official layout of the folder's model family. generation_config.json: the one "
                    "saved at import, unchanged (Qwen2-Instruct's sampling defaults only when there is none, "
                    "with a warning). VideoRefer-7B: image_aspect_ratio as imported; the complete SigLIP tower "
                    "goes into OUT/siglip_vision_tower/ (layers the model runs from the parameters, the rest "
                    "from the SigLIP folder saved at import) and mm_vision_tower names it by absolute path. "
                    "VRVL3: the encoder also goes into OUT/vision_encoder/ (config, preprocessor config, "
                    "weights), which config.json's vision_encoder names by relative path.")
    e.add_argument("src")
    e.add_argument("out")
    e.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="file dtype (default: the family's release dtype, float16 for VideoRefer-7B, "
                        "bfloat16 for VRVL3)")
    e.add_argument("--max-shard-size", default="5GB")
    e.add_argument("--tokenizer", help="tokenizer folder (default: the one saved at import)")
    e.add_argument("--mm-vision-tower",
                   help="VideoRefer-7B: SigLIP name/path for config.json (default: OUT/siglip_vision_tower, absolute)")
    e.add_argument("--vision-encoder",
                   help="VRVL3: config.json's vision_encoder (default: the relative sub-folder vision_encoder)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=cmd_export)

    ad = sub.add_parser("export-adapter", help="a LoRA run's folder -> the adapter alone in PEFT format",
                        description="Writes OUT/adapter_config.json and OUT/adapter_model.safetensors with the "
                                    "official checkpoint's module names; peft.PeftModel.from_pretrained loads it "
                                    "onto the transformers model of the same base. Parts trained in full beside "
                                    "the adapters are not in it (use `export` for the merged model).")
    ad.add_argument("src", help="imported folder holding LoRA adapters (a LoRA run's final/)")
    ad.add_argument("out")
    ad.add_argument("--base-model", default=None, help="adapter_config.json's base_model_name_or_path")
    ad.set_defaults(fn=cmd_export_adapter)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs a command; a user error (bad or missing files, a path outside the checkpoint folder,
    mismatched tensors, a model_type no family reads) is one line on stderr and exit status 2."""
    from vrefer_jax.checkpoints.key_map import KeyMappingError
    from vrefer_jax.families.base import UnknownFamily

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        args.fn(args)
    except (ValueError, OSError, KeyMappingError, UnknownFamily) as e:
        msg = e.args[0] if isinstance(e, (KeyMappingError, UnknownFamily)) and e.args else e
        print(f"vrefer-convert {args.command}: {msg}", file=sys.stderr)
        return 2
    print(f"{args.command}: done in {time.perf_counter() - t0:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
