"""The main job on VRVL3 (`configs/experiments/synthetic_tiny_vl3.gin`): synthetic JSON + media ->
the VRVL3 Grain loader -> trainer -> Bench-Q runner with the VRVL3 protocol (+ zeroed-region
ablation) -> official-layout export -> vrefer-infer.

`test_main_job_vl3_short` (CI, about a minute) runs a shortened job: few videos and steps, Basic
(colour) questions only; it checks the pipeline end to end (every question answered and scored,
the table printed, the export answered) and that the loss drops. `test_main_job_vl3_full` (the
default job, about 16 min on 2 cores, marked slow) asserts every question type at least 0.3 above
chance and above the ablation (README, "The main job on VideoRefer-VideoLLaMA3", has the figures on
three seeds)."""

import os

import gin
import pytest

from test_main_job import ROOT, _assert_beats_chance

EXPERIMENT = "configs/experiments/synthetic_tiny_vl3.gin"


def _run(workdir, bindings):
    import vrefer_jax.gin_setup  # noqa: F401  (registers `experiment`)
    import vrefer_jax.training.trainer  # noqa: F401  (registers the training configurables)
    from vrefer_jax import main_job

    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    gin.parse_config_files_and_bindings([os.path.join(ROOT, EXPERIMENT)],
                                        ["TrainConfig.progress_bar = False", "MeshConfig.data = 1", *bindings])
    try:
        res = main_job.run(workdir)
    finally:
        gin.clear_config()
    print(res["table"])
    print("losses", [round(x, 3) for x in res["loss_curve"]])
    return res


SHORT = ["SyntheticJob.train_videos = 24", "SyntheticJob.eval_videos = 4", "SyntheticJob.bench_d_items = 1",
         "SyntheticJob.question_kinds = ('colour',)", "SyntheticJob.turns_per_sample = 3",
         "TrainConfig.total_steps = 20", "TrainConfig.log_every = 5", "TrainConfig.checkpoint_every = 10",
         "LoaderConfig.length_group_window = 2"]


def test_main_job_vl3_short(tmp_path):
    res = _run(str(tmp_path / "job"), SHORT)
    losses = res["loss_curve"]
    assert losses[-1] < 0.7 * losses[0]
    q = res["trained"]["bench_q"]
    n = sum(v["n"] for v in q["official"]["per_type"].values())
    assert n > 0 and not q["errors"] and not q["missing"]  # every question answered and scored
    assert set(q["official"]["per_type"]) == {"Basic Questions"}
    assert set(res["ablated"]["bench_q"]["official"]["per_type"]) == set(q["official"]["per_type"])
    assert "| question kind (type) |" in res["table"]
    assert os.path.isfile(str(tmp_path / "job" / "hf_export" / "config.json"))
    assert res["answer"]["answer"]  # vrefer-infer answered from the exported folder
    assert not os.path.exists(str(tmp_path / "job" / "records"))  # trained from the JSON, no records


@pytest.mark.slow
def test_main_job_vl3_full(tmp_path):
    res = _run(str(tmp_path / "job"), [])
    for qtype in res["trained"]["bench_q"]["official"]["per_type"]:
        _assert_beats_chance(res, qtype, margin=0.3)
