"""The main job: synthetic data -> records -> trainer -> Bench-Q runner (+ ablation) -> HF export ->
vrefer-infer.

`test_main_job_short` (CI) runs a shortened job: fewer videos and steps, and Basic (colour)
questions only, the kind a few hundred steps learn; it checks the pipeline end to end, that the loss
drops and that Basic accuracy beats both chance and the zeroed-object-token ablation by a clear
margin. `test_main_job_pooled_takes_every_conversation` (CI): the pooled packed job skips none of
the conversations the unpacked one drops for its length cap. `test_main_job_full` (the default
job, about 8 min on 2 cores, marked slow, `make test-all`) asserts every question type at least 0.3
above chance and above the ablation (README, "The main job", has the figures on three seeds)."""

import os

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, bindings, experiment="synthetic_tiny"):
    import vrefer_jax.gin_setup  # noqa: F401  (registers `experiment`)
    import vrefer_jax.training.trainer  # noqa: F401  (registers the training configurables)
    from vrefer_jax import main_job

    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    gin.parse_config_files_and_bindings([os.path.join(ROOT, f"configs/experiments/{experiment}.gin")],
                                        ["TrainConfig.progress_bar = False", "MeshConfig.data = 1", *bindings])
    try:
        res = main_job.run(workdir)
    finally:
        gin.clear_config()
    print(res["table"])
    print("losses", [round(x, 3) for x in res["loss_curve"]])
    return res


def _assert_beats_chance(res, qtype, margin):
    acc = res["trained"]["bench_q"]["official"]["per_type"][qtype]
    zeroed = res["ablated"]["bench_q"]["official"]["per_type"][qtype]
    chance = res["chance"][qtype]
    assert acc["accuracy"] >= chance + margin and acc["accuracy"] >= zeroed["accuracy"] + margin, (
        qtype, acc, zeroed, chance)


SHORT = ["SyntheticJob.train_videos = 300", "SyntheticJob.eval_videos = 30", "SyntheticJob.bench_d_items = 4",
         "SyntheticJob.question_kinds = ('colour',)", "TrainConfig.total_steps = 250",
         "TrainConfig.checkpoint_every = 125"]


def test_main_job_short(tmp_path):
    res = _run(str(tmp_path / "job"), SHORT)
    losses = res["loss_curve"]
    assert losses[-1] < 0.5 * losses[0]
    q = res["trained"]["bench_q"]
    n = sum(v["n"] for v in q["official"]["per_type"].values())
    assert n > 0 and not q["errors"] and not q["missing"]  # every question answered and scored
    assert set(q["official"]["per_type"]) == {"Basic Questions"}
    assert set(res["ablated"]["bench_q"]["official"]["per_type"]) == set(q["official"]["per_type"])
    _assert_beats_chance(res, "Basic Questions", margin=0.25)
    kinds = res["trained"]["by_kind"]  # per-kind breakdown adds up to the per-type counts
    assert sum(k["n"] for k in kinds.values()) == n and "| question kind (type) |" in res["table"]
    assert os.path.isfile(str(tmp_path / "job" / "hf_export" / "config.json"))
    assert res["answer"]["answer"]  # vrefer-infer answered from the exported folder
    assert res["skipped_samples"] == 0  # three-turn conversations fit the default caps


# The default job's seven-turn conversations on fewer videos, a few steps (over an epoch), and
# progress logged often enough that the loader's skip count reaches the result.
TAKE_ALL = ["SyntheticJob.train_videos = 48", "SyntheticJob.eval_videos = 4", "SyntheticJob.bench_d_items = 2",
            "TrainConfig.total_steps = 24", "TrainConfig.checkpoint_every = 24", "TrainConfig.log_every = 8"]


def test_main_job_pooled_takes_every_conversation(tmp_path):
    """The unpacked job skips the conversations over its 512-token cap; the pooled packed job
    (`synthetic_tiny_pooled.gin`) takes in every one of the same conversations."""
    unpacked = _run(str(tmp_path / "unpacked"), TAKE_ALL)
    pooled = _run(str(tmp_path / "pooled"), TAKE_ALL, experiment="synthetic_tiny_pooled")
    assert unpacked["skipped_samples"] > 0
    assert pooled["skipped_samples"] == 0
    assert pooled["trained"]["bench_q"]["official"]["per_type"] and pooled["answer"]["answer"]


@pytest.mark.slow
def test_main_job_full(tmp_path):
    res = _run(str(tmp_path / "job"), [])
    for qtype in res["trained"]["bench_q"]["official"]["per_type"]:
        _assert_beats_chance(res, qtype, margin=0.3)
