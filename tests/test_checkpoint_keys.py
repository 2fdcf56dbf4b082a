"""The key rules live in `checkpoints/` as data; the model modules know no file format."""

import ast
import pathlib

import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.config import model_config_from_gin
from vrefer_jax.models import videorefer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_models_define_no_key_rules():
    """The HF names are data in checkpoints/ (the import rules themselves: tests/test_layering.py)."""
    for p in (ROOT / "vrefer_jax" / "models").glob("*.py"):
        names = {n.name for n in ast.parse(p.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert not {"hf_rules", "hf_ignore_patterns", "causal_lm_rules", "lm_head_rules"} & names, p.name


@pytest.mark.parametrize("gin", ["tiny.gin", "small.gin", "videorefer_7b.gin"])
def test_rules_cover_the_model_tree(gin):
    """The rules written as data name every parameter of the module tree exactly once."""
    cfg = model_config_from_gin([str(ROOT / "configs" / "models" / gin)])
    key_map.check_rules_cover(keys.videorefer_rules(cfg), videorefer.abstract_params(cfg))
    names = [r.hf for r in keys.videorefer_rules(cfg)]
    assert len(set(names)) == len(names)
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert "lm_head.weight" in names and "model.layers.{i}.self_attn.q_proj.weight" in names
