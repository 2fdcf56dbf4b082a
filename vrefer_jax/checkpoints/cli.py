"""`vrefer-convert`: Hugging Face VideoRefer checkpoints <-> our Orbax parameter folders.

    vrefer-convert import SRC OUT [--vision-tower DIR | --use-stored-vision-tower] [--param-dtype float32]
    vrefer-convert from-parts OUT --qwen2 DIR --siglip DIR [--projector FILE] [--region-encoder FILE]
    vrefer-convert export SRC OUT [--dtype float16] [--max-shard-size 5GB] [--tokenizer DIR]

(`python -m vrefer_jax.checkpoints.cli ...` without the console script.)

An imported folder OUT holds `params/` (Orbax `StandardCheckpointer`), `model_config.json` (our
`ModelConfig`) and `hf/` (the source `config.json`, tokenizer files and `generation_config.json`,
and `hf/siglip_vision_tower/`, a copy of the SigLIP folder read, all reused by `export`: the
exported folder keeps the checkpoint's generation config and holds the complete vision tower).
Reading and writing that layout is a library, `vrefer_jax.checkpoints.store`; this module is only
the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vrefer_jax.checkpoints.store import HF, VISION_DIR, load_imported, save_imported


def cmd_import(a) -> None:
    from vrefer_jax.checkpoints import hf_config
    from vrefer_jax.checkpoints.hf_import import import_videorefer, siglip_folder_of

    hf = hf_config.find_config(a.src)
    cfg, params = import_videorefer(a.src, vision_tower_folder=a.vision_tower,
                                    use_stored_vision_tower=a.use_stored_vision_tower, dtype=a.param_dtype)
    siglip = None if a.use_stored_vision_tower else siglip_folder_of(hf, a.vision_tower, a.src)
    save_imported(a.out, cfg, params, hf, a.src, siglip)


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
    from vrefer_jax.checkpoints import hf_config
    from vrefer_jax.checkpoints.hf_export import export_videorefer

    cfg, params = load_imported(a.src)
    hf_dir = os.path.join(a.src, HF)
    base_path = os.path.join(hf_dir, "config.json")
    base = hf_config.read_json(base_path) if os.path.isfile(base_path) else None
    tok = a.tokenizer
    if tok is None and any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "vocab.json",
                                                                              "tokenizer.model")):
        tok = hf_dir
    gen = os.path.join(hf_dir, "generation_config.json")
    vision = os.path.join(hf_dir, VISION_DIR)
    export_videorefer(params, cfg, a.out, tokenizer_folder=tok, dtype=a.dtype, max_shard_size=a.max_shard_size,
                      mm_vision_tower=a.mm_vision_tower, base_config=base, overwrite=a.overwrite,
                      generation_config=gen if os.path.isfile(gen) else None,
                      vision_tower_source=vision if os.path.isdir(vision) else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrefer-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("import", help="a VideoRefer HF folder -> an Orbax params folder")
    i.add_argument("src", help="VideoRefer checkpoint folder (config.json + safetensors)")
    i.add_argument("out", help="output folder")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--vision-tower", help="SigLIP folder (default: config's mm_vision_tower if local)")
    g.add_argument("--use-stored-vision-tower", action="store_true",
                   help="use the checkpoint's own copy of the tower (the official loader ignores it)")
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
        "export", help="an Orbax params folder (from import/from-parts) -> a VideoRefer HF folder",
        description="Writes the official layout. generation_config.json: the one saved at import, unchanged "
                    "(Qwen2-Instruct's sampling defaults only when there is none, with a warning). "
                    "image_aspect_ratio: the model config's (as imported). The complete SigLIP tower goes "
                    "into OUT/siglip_vision_tower/ (layers the model runs from the parameters, the rest "
                    "from the SigLIP folder saved at import) and mm_vision_tower names it by absolute path.")
    e.add_argument("src")
    e.add_argument("out")
    e.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    e.add_argument("--max-shard-size", default="5GB")
    e.add_argument("--tokenizer", help="tokenizer folder (default: the one saved at import)")
    e.add_argument("--mm-vision-tower",
                   help="SigLIP name/path for config.json (default: OUT/siglip_vision_tower, absolute)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs a command; a user error (bad or missing files, a path outside the checkpoint folder,
    mismatched tensors) is one line on stderr and exit status 2."""
    from vrefer_jax.checkpoints.key_map import KeyMappingError

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        args.fn(args)
    except (ValueError, OSError, KeyMappingError) as e:
        msg = e.args[0] if isinstance(e, KeyMappingError) and e.args else e
        print(f"vrefer-convert {args.command}: {msg}", file=sys.stderr)
        return 2
    print(f"{args.command}: done in {time.perf_counter() - t0:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
