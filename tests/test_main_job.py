"""The main job, shortened: synthetic data -> records -> trainer -> Bench-Q runner (+ ablation) ->
HF export -> vrefer-infer. Asserts that the loss drops and that Basic questions (colour / shape of
the referred object) are answered clearly above chance."""

import os

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_short(tmp_path):
    import vrefer_jax.training.cli  # noqa: F401  (registers `experiment`)
    from vrefer_jax import main_job

    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "configs/experiments/synthetic_tiny.gin")], [
        "SyntheticJob.train_videos = 64", "SyntheticJob.eval_videos = 16", "SyntheticJob.bench_d_items = 4",
        "TrainConfig.total_steps = 220", "TrainConfig.progress_bar = False", "TrainConfig.checkpoint_every = 100",
        "MeshConfig.data = 1",
    ])
    try:
        res = main_job.run(str(tmp_path / "job"))
    finally:
        gin.clear_config()
    losses = res["loss_curve"]
    print(res["table"])
    print("losses", [round(x, 3) for x in losses])
    assert losses[-1] < 0.5 * losses[0]
    basic = res["trained"]["bench_q"]["official"]["per_type"]["Basic Questions"]
    chance = res["chance"]["Basic Questions"]
    assert basic["n"] >= 10
    assert basic["accuracy"] >= chance + 0.25, (basic, chance)
    assert os.path.isfile(str(tmp_path / "job" / "hf_export" / "config.json"))
    assert res["answer"]["answer"]  # vrefer-infer answered from the exported folder
