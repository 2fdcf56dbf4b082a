"""Starting a LoRA run from a plain checkpoint: add fresh adapters to imported parameters.

An imported checkpoint (`vrefer-convert import`, a full fine-tune's `final/`) holds the plain tree;
a model config with `TextConfig.lora` enabled wants adapters beside every targeted kernel and the
base kernels in `LoraConfig.base_dtype`. `attach` builds that tree on the devices, in the state's
shardings: adapters from the model's own init (A kaiming-uniform, B zero: the model's output is
unchanged), base kernels quantised to int8 or cast, everything else carried over as it is.
"""

from __future__ import annotations

import jax
from flax import traverse_util

from vrefer_jax import families
from vrefer_jax.models import lora as lora_lib


def attach(cfg, params, param_shardings, seed: int = 0):
    """params of the plain model -> the tree of `cfg` (with adapters), placed in `param_shardings`
    (a tree of shardings like `cfg`'s parameters). Returned unchanged when the tree already is the
    model's (e.g. a LoRA run's own `final/`) or `cfg` has no adapters. A base parameter the model
    needs and `params` lacks raises ValueError naming it."""
    lora = cfg.text.lora
    family = families.for_config(cfg)
    want = traverse_util.flatten_dict(family.abstract_params(cfg))
    have = traverse_util.flatten_dict(params)
    if not lora.enabled or set(want) == set(have):
        return params
    base_paths = {p for p in want if p[-1] not in (*lora_lib.ADAPTER_LEAVES, lora_lib.SCALE_LEAF)}
    if missing := sorted("/".join(p) for p in base_paths - set(have)):
        raise ValueError(f"the checkpoint lacks parameters the LoRA model needs: {missing[:5]}")
    have = {p: v for p, v in have.items() if p in base_paths}

    def build(rng, base):
        fresh = traverse_util.flatten_dict(family.init_params(cfg, rng))
        out = {}
        for path, leaf in fresh.items():
            if path[-1] in lora_lib.ADAPTER_LEAVES:
                out[path] = leaf  # the model's init: B = 0
            elif path[-1] != lora_lib.SCALE_LEAF:
                out[path] = base[path].astype(leaf.dtype)
        for path in fresh:  # int8 storage: (kernel, kernel_scale) from the full-precision kernel
            if path[-1] == lora_lib.SCALE_LEAF:
                node = path[:-1]
                lead, n_in, _ = lora_lib.layout({k: fresh[node + (k,)] for k in ("kernel", "lora_a", "lora_b")})
                out[node + ("kernel",)], out[path] = lora_lib.quantize_int8(base[node + ("kernel",)], n_in, lead)
        return traverse_util.unflatten_dict(out)

    # Unused parts of the fresh init (its base weights) are dead code: only the adapters are drawn.
    return jax.jit(build, out_shardings=param_shardings)(jax.random.PRNGKey(seed), have)
