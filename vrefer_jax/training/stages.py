"""Stage recipes are defined once, in `configs/stages/*.gin`; tools that need a stage's facts
without running a training job (the AOT memory check, the train-step benchmark) read them here.

The gin files are parsed with gin's own parser, statement by statement (includes followed, later
bindings win), without touching the global gin configuration a caller may hold.
"""

from __future__ import annotations

import os
from typing import Any

from gin import config as gin_config
from gin import config_parser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES_DIR = os.path.join(REPO_ROOT, "configs", "stages")


def available_stages() -> list[str]:
    """Names of the stage gin files (`stage2`, `stage2_5`, `stage3`, `vl3_stage1`, `vl3_stage2`)."""
    return sorted(f[:-4] for f in os.listdir(STAGES_DIR) if f.endswith(".gin"))


def stage_file(stage: str) -> str:
    """A stage name ('stage2', 'stage2.5' / 'stage2_5', ...) or a gin file path -> the file."""
    if stage.endswith(".gin"):
        path = stage if os.path.isabs(stage) or os.path.exists(stage) else os.path.join(REPO_ROOT, stage)
    else:
        path = os.path.join(STAGES_DIR, stage.replace(".", "_") + ".gin")
    if not os.path.isfile(path):
        raise ValueError(f"unknown stage {stage!r}: no {path} (stages: {available_stages()})")
    return path


def stage_bindings(stage: str) -> dict[tuple[str, str], Any]:
    """{(selector, parameter): value} of a stage file and the files it includes."""
    out: dict[tuple[str, str], Any] = {}

    def read(path: str, seen: tuple[str, ...]) -> None:
        if path in seen:
            raise ValueError(f"gin include cycle: {' -> '.join(seen + (path,))}")
        with open(path, encoding="utf-8") as f:
            parser = config_parser.ConfigParser(f.read(), gin_config.ParserDelegate(skip_unknown=True))
            for st in parser:
                if isinstance(st, config_parser.IncludeStatement):
                    inc = st.filename if os.path.isabs(st.filename) else os.path.join(REPO_ROOT, st.filename)
                    read(inc, seen + (path,))
                elif isinstance(st, config_parser.BindingStatement) and not st.scope:
                    out[(st.selector, st.arg_name)] = st.value

    read(stage_file(stage), ())
    return out


def stage_trainable(stage: str) -> tuple[str, ...]:
    """The top-level parameter groups a stage trains: `OptimizerConfig.trainable` in its gin file,
    or the parts its per-part rates (`OptimizerConfig.llm_lr`, ...) leave unfrozen."""
    from vrefer_jax.training.optimizer import OptimizerConfig

    bound = {arg: v for (sel, arg), v in stage_bindings(stage).items() if sel == "OptimizerConfig"}
    per_part = any(bound.get(f"{p}_lr") is not None for p in ("llm", "mm_projector", "vision_encoder",
                                                               "region_encoder"))
    if not bound.get("trainable") and not per_part:
        raise ValueError(f"{stage_file(stage)} binds neither OptimizerConfig.trainable nor per-part rates "
                         "(OptimizerConfig.llm_lr, ...)")
    if "trainable" in bound:
        bound["trainable"] = tuple(bound["trainable"])
    return tuple(OptimizerConfig(**bound).trainable)


def stage_lora(stage: str):
    """The `LoraConfig` a stage binds (`TextConfig.lora = @LoraConfig()` and `LoraConfig.*`), or
    None when it trains without adapters."""
    import dataclasses

    from vrefer_jax.config import LoraConfig

    bound = stage_bindings(stage)
    if ("TextConfig", "lora") not in bound:
        return None
    kw = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
    kw.update({arg: v for (sel, arg), v in bound.items() if sel == "LoraConfig"})
    kw["targets"] = tuple(kw["targets"])
    return LoraConfig(**kw)
