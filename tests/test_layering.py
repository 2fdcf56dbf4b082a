"""The layering rules, read from the source with `ast`: the model knows tensors, not files; the data
pipeline knows files, not the model; checkpoints and inference do not reach into training; the
neutral modules (batch contract, numerics, paths, JSON, shard ranges) sit below all of them."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = ("vrefer_jax.models", "vrefer_jax.checkpoints", "vrefer_jax.training", "vrefer_jax.inference",
         "vrefer_jax.evaluation", "vrefer_jax.families", "vrefer_jax.serving", "data_pipeline")
NEUTRAL = ("vrefer_jax/batch.py", "vrefer_jax/numerics.py", "vrefer_jax/paths.py", "vrefer_jax/json_files.py",
           "vrefer_jax/shard_ranges.py", "vrefer_jax/sharding.py", "vrefer_jax/config.py",
           "vrefer_jax/vl3_batch.py", "vrefer_jax/vl3_config.py")

# files (globs, recursive) -> module prefixes they must not import
RULES = {
    "vrefer_jax/models/**/*.py": ("vrefer_jax.checkpoints", "vrefer_jax.training", "vrefer_jax.inference",
                                  "vrefer_jax.evaluation", "vrefer_jax.families", "data_pipeline"),
    "data_pipeline/**/*.py": ("vrefer_jax.models", "vrefer_jax.training", "vrefer_jax.families"),
    # the registry binds the parts; it reaches into checkpoints / inference / data only lazily, and
    # never into training (which asks it for the family of a config)
    "vrefer_jax/families/**/*.py": ("vrefer_jax.training", "vrefer_jax.evaluation"),
    "vrefer_jax/checkpoints/**/*.py": ("vrefer_jax.training",),
    "vrefer_jax/inference/**/*.py": ("vrefer_jax.training", "vrefer_jax.serving"),
    # the server sits on the predictor: no training, no evaluation, no model internals
    "vrefer_jax/serving/**/*.py": ("vrefer_jax.training", "vrefer_jax.evaluation", "vrefer_jax.models"),
    **{f: PARTS for f in NEUTRAL},
}


def imported_modules(path: pathlib.Path, pkg: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, lazy ones inside functions too; relative
    imports resolved against the file's package `pkg`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value.partition(":")[0]))  # families.base.lazy("mod:fn")
    return out


def violations(pattern: str, banned: tuple[str, ...], root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.glob(pattern)):
        pkg = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
        for line, mod in imported_modules(path, pkg):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(root)}:{line} imports {mod}")
    return sorted(set(bad))


@pytest.mark.parametrize("pattern", sorted(RULES))
def test_import_rules(pattern):
    assert list(ROOT.glob(pattern)), pattern
    assert violations(pattern, RULES[pattern]) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """A rule that cannot fail is no rule: planted violations inside a function are found."""
    pkg = tmp_path / "vrefer_jax" / "models" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("import numpy\n\ndef f():\n    from vrefer_jax.checkpoints import key_map\n"
                                "    from ...inference import generate\n")
    assert violations("vrefer_jax/models/**/*.py", RULES["vrefer_jax/models/**/*.py"], tmp_path) == [
        "vrefer_jax/models/sub/bad.py:4 imports vrefer_jax.checkpoints",
        "vrefer_jax/models/sub/bad.py:4 imports vrefer_jax.checkpoints.key_map",
        "vrefer_jax/models/sub/bad.py:5 imports vrefer_jax.inference",
        "vrefer_jax/models/sub/bad.py:5 imports vrefer_jax.inference.generate"]


def test_the_checker_reads_lazy_registry_targets(tmp_path):
    """The registry names checkpoint / data / inference code as `lazy("module:function")` strings;
    the checker counts them as imports (a family pointing into training would be caught)."""
    pkg = tmp_path / "vrefer_jax" / "families"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text('from vrefer_jax.families.base import lazy\n'
                                'X = lazy("vrefer_jax.training.trainer:train")\n')
    assert violations("vrefer_jax/families/**/*.py", RULES["vrefer_jax/families/**/*.py"], tmp_path) == [
        "vrefer_jax/families/bad.py:2 imports vrefer_jax.training.trainer"]
