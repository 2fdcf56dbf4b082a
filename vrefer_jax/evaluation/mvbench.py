"""MVBench in the official VideoRefer style (`inference_video_mcqa_mvbench.py`, `mvbench_dump`,
`eval_video_mcqa_mvbench.py`).

Answer parsing (reference §5.3): delete "answer"/"Answer"; the first match of
`[(, ]*[<first>-<last letter>][), ]*`, stripped of spaces then of `(`/`)`, must be one of the
letters (else index 2); with no match, the first option whose text occurs in the output
(case-insensitive), else index 2. Scored as the official script: accuracy over all questions and
per task. Clip bounds (seconds) are in `extra["bound"]`, which `convert.decode_sample` (and so the
predictor) samples within, at the video's fps or 3 fps for the frame folders of Episodic Reasoning.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

from data_pipeline import schema
from vrefer_jax.evaluation import mcqa, runner

# task -> (question file, video sub-folder, media kind, has start/end bounds), as the official
# MVBench scripts lay the data out.
TASKS: dict[str, tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480/", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480/", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video/", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test/", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation/", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480/", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos/", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation/", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video/", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video/", "video", False),
    "Action Count": ("action_count.json", "perception/videos/", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation/", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation/", "video", False),
    "State Change": ("state_change.json", "perception/videos/", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd/", "video", False),
    "Character Order": ("character_order.json", "perception/videos/", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa/", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation/", "video", False),
}


def prompt(question: str, candidates: Sequence[str]) -> str:
    opts = "".join(f"({mcqa.letter(i)}) {c}\n" for i, c in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{opts}{mcqa.MCQA_SUFFIX}"


def load(question_dir: str, tasks: Mapping[str, tuple[str, str, str, bool]] | None = None) -> list[runner.Item]:
    """Every task file of `question_dir` (official layout); media paths are relative to the video
    root (the task's sub-folder + the entry's `video`). Ids: `<task>/<position in its file>`."""
    tasks = TASKS if tasks is None else tasks
    items: list[runner.Item] = []
    for task, (fname, prefix, kind, bounded) in tasks.items():
        with open(os.path.join(question_dir, fname), encoding="utf-8") as f:
            entries = json.load(f)
        for k, d in enumerate(entries):
            sid, idx = f"{task}/{k}", len(items)
            try:
                cands = [str(c) for c in d["candidates"]]
                answer_idx = -1
                for i, c in enumerate(cands):
                    if c == d["answer"]:
                        answer_idx = i  # the official loop keeps the last equal candidate
                extra = {"benchmark": "mvbench", "task_type": task, "options": cands,
                         "letters": [mcqa.letter(i) for i in range(len(cands))], "answer_idx": answer_idx,
                         "data_type": kind, "bound": [d["start"], d["end"]] if bounded else None}
                items.append(mcqa.make_sample(sid, idx, prefix + d["video"], prompt(d["question"], cands),
                                     mcqa.letter(answer_idx) if answer_idx >= 0 else "", extra))
            except KeyError as e:
                items.append(schema.SampleError("bad_benchmark_entry", sid, str(e), "missing field"))
            except schema.SampleError as e:
                items.append(e)
    return items


def pred_idx(output: str, letters: Sequence[str], options: Sequence[str]) -> tuple[int, bool]:
    """(option index, parsed) by the official MVBench rules; parsed=False where the official script
    falls back to index 2."""
    out = output.replace("answer", "").replace("Answer", "")
    found = re.findall(rf"[\(,\ ]*[{letters[0]}-{letters[-1]}][\),\ ]*", out)
    if not found:
        for i, opt in enumerate(options):
            if opt.lower() in out.lower():
                return i, True
        return 2, False
    a = found[0].strip().strip("()")
    return (letters.index(a), True) if a in letters else (2, False)


GROUPS = ("task_type",)  # per-task accuracy, as the official scorer


def judge(pred: str, e: Mapping) -> tuple[bool | None, bool]:
    """(correct, parsed) of one prediction row / sample extra."""
    i, ok = pred_idx(pred, e["letters"], e["options"])
    return i == e["answer_idx"], ok
