"""The README's fine-tuning guide, every command at tiny size: your JSON -> `vrefer-data validate` ->
convert (TFRecord and TFDS) -> `vrefer-convert import` -> LoRA `vrefer-train` -> `vrefer-eval` ->
`vrefer-convert export` (merged) and `export-adapter` (PEFT).

The commands run in this process through their `main(argv)` (the console scripts call the same).
"Your data" is the synthetic set (`vrefer-data synthetic`: the official JSON + RLE format), and the
"official checkpoint" a tiny random VideoRefer written in the official layout with its tokenizer."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """(data folder, an official-layout tiny checkpoint) for the guide to start from."""
    from data_pipeline import cli as data_cli
    from vrefer_jax import families
    from vrefer_jax.checkpoints import hf_config, store
    from vrefer_jax.config import model_config_from_gin
    from vrefer_jax.text.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("guide")
    data = str(d / "my_data")
    assert data_cli.main(["synthetic", "--out", data, "--seed", "2", "--train-videos", "6", "--eval-videos", "2",
                          "--num-frames", "8", "--size", "32", "--mask-frames", "1", "--eval-mask-frames", "1",
                          "--vocab-size", "512"]) == 0
    tok = load_tokenizer(os.path.join(data, "tokenizer.json"))
    cfg = model_config_from_gin([os.path.join(ROOT, "configs/models/tiny.gin")]).replace(
        region_token_id=tok.region_id, pad_token_id=tok.token_to_id("<|endoftext|>"))
    fam = families.for_config(cfg)
    src = str(d / "random_tiny")
    store.save_imported(src, cfg, fam.init_params(cfg, jax.random.PRNGKey(0)), hf_config.model_config_to_hf(cfg),
                        data)
    official = str(d / "VideoRefer-tiny")
    from vrefer_jax.checkpoints import cli as convert_cli

    assert convert_cli.main(["export", src, official, "--dtype", "float32"]) == 0
    ids = (f"ModelConfig.region_token_id = {cfg.region_token_id}", f"ModelConfig.pad_token_id = {cfg.pad_token_id}")
    return str(d), data, official, ids


def _guide(tmp, data, official, ids, *, evaluate: bool):
    from data_pipeline import cli as data_cli
    from vrefer_jax.checkpoints import cli as convert_cli, peft_export, store
    from vrefer_jax.training import cli as train_cli

    j = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    train_json, media = os.path.join(data, "train.json"), data
    # 1. validate your JSON
    assert data_cli.main(["validate", "--json", train_json, "--media-root", media]) == 0
    # 2. convert: TFRecord shards, or a TFDS dataset (both shown; training reads the TFDS one)
    frames = ["--num-frames", "4", "--image-size", "30"]
    assert data_cli.main(["convert", "--json", train_json, "--media-root", media, "--out", j("rec"),
                          "--num-shards", "2", "--workers", "0", "--no-progress", *frames]) == 0
    assert data_cli.main(["tfds", "--json", train_json, "--media-root", media, "--data-dir", j("tfds"),
                          "--name", "videorefer_train", "--split", "train", *frames]) == 0
    # 3. the base checkpoint
    assert convert_cli.main(["import", official, j("base")]) == 0
    # 4. LoRA fine-tune from it
    rc = train_cli.main([
        f"--gin_file={ROOT}/configs/experiments/lora_tiny.gin",
        f"--gin_bindings=DataConfig.train = ('tfds:{j('tfds')}/videorefer_train:train',)",
        f"--gin_bindings=DataConfig.tokenizer = '{j('base', 'hf')}'",
        f"--gin_bindings=TrainConfig.init_from = '{j('base')}'",
        *(f"--gin_bindings={b}" for b in ids),  # the tiny tokenizer's ids (videorefer_7b.gin has the official ones)
        f"--workdir={j('run')}"])
    assert rc == 0
    final = j("run", "final")
    # 5. evaluate on held-out questions
    if evaluate:
        assert __import__("vrefer_jax.evaluation.cli", fromlist=["main"]).main([
            "bench-q", "--checkpoint", final, "--data", os.path.join(data, "bench_q.json"), "--media_root", media,
            "--out", j("preds.jsonl"), "--num_frames", "4", "--max_new_tokens", "4", "--limit", "3"]) == 0
        assert len(open(j("preds.jsonl")).read().splitlines()) == 3
    # 6. export: merged (official layout) and the adapter alone (PEFT)
    assert convert_cli.main(["export", final, j("merged"), "--dtype", "float32"]) == 0
    assert convert_cli.main(["export-adapter", final, j("adapter"), "--base-model", "VideoRefer-tiny"]) == 0
    assert json.load(open(j("adapter", peft_export.CONFIG_NAME)))["r"] == 4

    # what the run changed: adapters, projector and region encoder; the LLM's base is the imported
    # one (stored int8 by the stage), the LM head and the tower untouched
    _, base = store.load_imported(j("base"))
    cfg, tuned = store.load_imported(final)
    from vrefer_jax.training import adapters

    start = traverse_util.flatten_dict(adapters.attach(cfg, base, jax.tree.map(lambda x: x.sharding, tuned)))
    for path, v in traverse_util.flatten_dict(tuned).items():
        changed = not np.array_equal(np.asarray(v), np.asarray(start[path]))
        if path[-1] == "lora_b" or path[0] in ("mm_projector", "region_encoder"):
            continue  # trained (whether a leaf moved in 4 steps is not the point here)
        if path[-1] != "lora_a":
            assert not changed, "/".join(path)
    assert any(not np.array_equal(np.asarray(v), np.asarray(start[p]))
               for p, v in traverse_util.flatten_dict(tuned).items() if p[-1] == "lora_b")


def test_guide_commands(official_tiny):
    """Every command of the README's guide, the evaluation included (CI runs it)."""
    tmp, data, official, ids = official_tiny
    _guide(os.path.join(tmp, "guide"), data, official, ids, evaluate=True)
