"""The key rules live in `checkpoints/` as data; the model modules know no file format (issue #16 item 3)."""

import ast
import pathlib

import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.config import model_config_from_gin
from vrefer_jax.models import videorefer

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODELS = ("vrefer_jax.checkpoints", "vrefer_jax.training", "vrefer_jax.inference", "data_pipeline")


def imported_modules(path: pathlib.Path) -> list[str]:
    """Every module an `import` / `from ... import` statement in `path` names (at any depth)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_models_import_no_file_formats():
    bad = [(p.name, m) for p in sorted((ROOT / "vrefer_jax" / "models").glob("*.py"))
           for m in imported_modules(p) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_MODELS)]
    assert not bad, f"vrefer_jax/models imports {bad}"
    for p in (ROOT / "vrefer_jax" / "models").glob("*.py"):
        tree = ast.parse(p.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert not {"hf_rules", "hf_ignore_patterns", "causal_lm_rules", "lm_head_rules"} & names, p.name


def test_import_rule_check_sees_nested_imports(tmp_path):
    """The checker is not blind to imports inside functions (as the lazy ones in this code base)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vrefer_jax.checkpoints.key_map import KeyRule\n    import data_pipeline.loader\n")
    assert imported_modules(f) == ["vrefer_jax.checkpoints.key_map", "vrefer_jax.checkpoints.key_map.KeyRule",
                                   "data_pipeline.loader"]


@pytest.mark.parametrize("gin", ["tiny.gin", "small.gin", "videorefer_7b.gin"])
def test_rules_cover_the_model_tree(gin):
    """The rules written as data name every parameter of the module tree exactly once."""
    cfg = model_config_from_gin([str(ROOT / "configs" / "models" / gin)])
    key_map.check_rules_cover(keys.videorefer_rules(cfg), videorefer.abstract_params(cfg))
    names = [r.hf for r in keys.videorefer_rules(cfg)]
    assert len(set(names)) == len(names)
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert "lm_head.weight" in names and "model.layers.{i}.self_attn.q_proj.weight" in names
