"""The model families and their one registry.

A family is what differs between VideoRefer-7B and VideoRefer-VideoLLaMA3: its config class, Flax
module, batch contract, host checks, output embedding, parameter groups, checkpoint key rules and
host preprocessing (`base.Family`). Everything else (loader, trainer, predictor, runner, CLIs) asks
this registry for the family of a config (`for_config`), of a checkpoint's `model_type`
(`for_model_type`) or of a name given in gin / on the command line (`get`).

A new family: a folder under `vrefer_jax/models/<family>/` (tensors only), its key rules under
`vrefer_jax/checkpoints/`, its host preprocessing under `data_pipeline/<family>/`, one module here
that builds its `Family`, and one `register(...)` line below.
"""

from __future__ import annotations

from vrefer_jax.families.base import Family, UnknownFamily

REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in REGISTRY:
        raise ValueError(f"model family {family.name!r} registered twice")
    REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in REGISTRY:
        raise UnknownFamily(f"unknown model family {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def for_config(cfg) -> Family:
    """The family whose config class `cfg` is an instance of."""
    for fam in REGISTRY.values():
        if isinstance(cfg, fam.config_class):
            return fam
    raise UnknownFamily(f"no model family takes a {type(cfg).__name__}")


def for_model_type(model_type: str) -> Family:
    """The family that reads a Hugging Face checkpoint whose `config.json` says `model_type`."""
    for fam in REGISTRY.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in REGISTRY.values() for t in f.model_types)
    raise UnknownFamily(f"no model family reads model_type {model_type!r}; known: {', '.join(known)}")


def config_from_gin(files=(), bindings=(), family: str | None = None):
    """Parse gin files / bindings and build the model config of `family`, or, without one, of the
    one family whose config class the gin binds (e.g. `VL3Config.text = @TextConfig()`). Bindings
    are cleared afterwards, so later bare `TextConfig()` calls get the defaults again.

    Raises `UnknownFamily` when no family or several families' config classes are bound."""
    import gin

    gin.clear_config()
    gin.parse_config_files_and_bindings(list(files), list(bindings))
    try:
        if family is None:
            bound = [f for f in REGISTRY.values() if _binds(f.config_class)]
            if len(bound) != 1:
                names = ", ".join(f"{f.name} ({f.config_class.__name__})" for f in REGISTRY.values())
                raise UnknownFamily(f"{list(files)} bind {'no' if not bound else 'several'} model config classes "
                                    f"of {names}: pass the family")
            family = bound[0].name
        return get(family).config_class()
    finally:
        gin.clear_config()


def _binds(cls) -> bool:
    """Whether the parsed gin config binds a field of the config class `cls`."""
    import dataclasses

    import gin

    for f in dataclasses.fields(cls):
        try:
            gin.query_parameter(f"{cls.__name__}.{f.name}")
            return True
        except ValueError:
            continue
    return False


from vrefer_jax.families import videorefer as _videorefer, vl3 as _vl3  # noqa: E402

register(_videorefer.FAMILY)
register(_vl3.FAMILY)

__all__ = ["Family", "UnknownFamily", "REGISTRY", "register", "get", "for_config", "for_model_type",
           "config_from_gin"]
