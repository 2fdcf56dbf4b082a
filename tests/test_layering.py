"""The layering rules, read from the source with `ast`: the model knows tensors, not files; the data
pipeline knows files, not the model; checkpoints and inference do not reach into training."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# package folder -> module prefixes it must not import
RULES = {
    "vrefer_jax/models": ("vrefer_jax.checkpoints", "vrefer_jax.training", "vrefer_jax.inference",
                          "vrefer_jax.evaluation", "data_pipeline"),
    "data_pipeline": ("vrefer_jax.models", "vrefer_jax.training"),
    "vrefer_jax/checkpoints": ("vrefer_jax.training",),
    "vrefer_jax/inference": ("vrefer_jax.training",),
}


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(folder: str, banned: tuple[str, ...], root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / folder).rglob("*.py")):
        for line, mod in imported_modules(path):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(root)}:{line} imports {mod}")
    return sorted(set(bad))


@pytest.mark.parametrize("folder", sorted(RULES))
def test_import_rules(folder):
    assert (ROOT / folder).is_dir()
    assert violations(folder, RULES[folder]) == []


def test_the_checker_sees_function_level_imports(tmp_path):
    """A rule that cannot fail is no rule: a planted violation inside a function is found."""
    pkg = tmp_path / "vrefer_jax" / "models"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("def f():\n    from vrefer_jax.checkpoints import key_map\n")
    assert violations("vrefer_jax/models", RULES["vrefer_jax/models"], tmp_path) == [
        "vrefer_jax/models/bad.py:2 imports vrefer_jax.checkpoints",
        "vrefer_jax/models/bad.py:2 imports vrefer_jax.checkpoints.key_map"]
