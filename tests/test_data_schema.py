"""data_pipeline.schema and bench_formats: typed samples, and every error naming sample, field, reason."""

import copy

import numpy as np
import pytest

from data_pipeline import bench_formats, masks, schema


def _rle(h=4, w=5):
    m = np.zeros((h, w), np.uint8)
    m[1:3, 2:4] = 1
    return {"size": [h, w], "counts": masks.encode_mask(m).decode()}


def _base():
    return {
        "id": "vid-7",
        "video": "clips/a.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat do <region> and <region> do?"},
            {"from": "gpt", "value": "They talk."},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "They leave."},
        ],
        "annotation": [
            {"42": {"segmentation": _rle()}, "7": {"segmentation": None}},
            {"7": {"segmentation": [[0, 0, 3, 0, 3, 2]]}, "19": {"segmentation": {"size": [4, 5], "counts": [5, 15]}}},
        ],
    }


def test_valid_sample_and_region_layout():
    s = schema.parse_sample(_base(), 3)
    assert s.sample_id == "vid-7" and s.index == 3 and s.modality == "video" and s.media == "clips/a.mp4"
    assert [o.frames for o in s.objects] == [(42, 7), (7, 19)]
    assert [o.keys for o in s.objects] == [("42", "7"), ("7", "19")]
    assert [[g.kind for g in o.segmentations] for o in s.objects] == [["rle", "null"], ["polygon", "uncompressed_rle"]]
    all_frames, ann = s.region_layout()
    assert all_frames == [7, 19, 42]
    assert ann == [[2, 0], [0, 1]]  # each object's frames in its JSON key order, as indices into all_frames
    assert len(s.conversations) == 4


def test_leading_gpt_turn_image_and_text_samples():
    raw = _base()
    raw["conversations"].insert(0, {"from": "gpt", "value": "dropped <region> turn"})
    assert schema.parse_sample(raw, 0).sample_id == "vid-7"  # its <region> is not counted
    img = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\n<region>?"},
                                               {"from": "gpt", "value": "a cat"}],
           "annotation": [{"3": {"segmentation": _rle()}}]}
    s = schema.parse_sample(img, 5)
    assert s.sample_id == "#5" and s.modality == "image" and s.objects[0].frames == (0,)
    assert s.region_layout() == ([0], [[0]])
    text = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert schema.parse_sample(text, 0, allow_text_only=True).modality == "text"
    with pytest.raises(schema.SampleError) as e:
        schema.parse_sample(text, 0)
    assert e.value.reason == "bad_media"


def _mutations():
    def m(fn):
        raw = _base()
        fn(raw)
        return raw

    def setitem(path, value):
        def fn(raw):
            obj = raw
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value
        return fn

    def delete(path):
        def fn(raw):
            obj = raw
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]
        return fn

    return [
        ("bad_media", "video/image", m(setitem(["image"], "x.jpg"))),
        ("bad_media", "video", m(setitem(["video"], ""))),
        ("bad_conversations", "conversations", m(setitem(["conversations"], []))),
        ("bad_conversations", "conversations[1].from", m(setitem(["conversations", 1, "from"], "human"))),
        ("bad_conversations", "conversations[2].from", m(setitem(["conversations", 2, "from"], "robot"))),
        ("bad_conversations", "conversations[3].value", m(setitem(["conversations", 3, "value"], None))),
        ("bad_conversations", "conversations", m(delete(["conversations", 3]))),
        ("modal_token_mismatch", "conversations", m(setitem(["conversations", 0, "value"], "<region> <region>"))),
        ("modal_token_mismatch", "conversations[2].value", m(setitem(["conversations", 2, "value"], "<image>"))),
        ("region_mask_mismatch", "conversations/annotation",
         m(setitem(["conversations", 0, "value"], "<video> <region>"))),
        ("bad_annotation", "annotation", m(setitem(["annotation"], {"0": {}}))),
        ("bad_annotation", "annotation[1]", m(setitem(["annotation", 1], {}))),
        ("bad_frame_index", "annotation[0]['x1']", m(setitem(["annotation", 0, "x1"], {"segmentation": None}))),
        ("bad_frame_index", "annotation[0]['-3']", m(setitem(["annotation", 0, "-3"], {"segmentation": None}))),
        ("bad_frame_index", "annotation[0]['042']", m(setitem(["annotation", 0, "042"], {"segmentation": None}))),
        ("missing_segmentation", "annotation[1]['19'].segmentation", m(setitem(["annotation", 1, "19"], {"mask": 1}))),
        ("empty_rle", "annotation[0]['42'].segmentation.counts",
         m(setitem(["annotation", 0, "42", "segmentation", "counts"], ""))),
        ("bad_segmentation", "annotation[1]['19'].segmentation.counts",
         m(setitem(["annotation", 1, "19", "segmentation", "counts"], [5, 14]))),
        ("bad_segmentation", "annotation[1]['7'].segmentation[0]",
         m(setitem(["annotation", 1, "7", "segmentation"], [[0, 0, 3, 3]]))),
        ("bad_size", "height/width", m(setitem(["height"], 480))),
        ("bad_size", "height/width", m(lambda r: r.update(height=0, width=640))),
    ]


@pytest.mark.parametrize("reason,field,raw", _mutations(), ids=lambda x: x if isinstance(x, str) else "")
def test_each_reason_names_sample_and_field(reason, field, raw):
    with pytest.raises(schema.SampleError) as e:
        schema.parse_sample(raw, 11)
    err = e.value
    assert (err.reason, err.sample_id, err.field) == (reason, "vid-7", field), str(err)
    assert reason in str(err) and "vid-7" in str(err) and field in str(err)
    assert err.to_dict() == {"id": "vid-7", "reason": reason, "field": field, "message": err.message}


def test_sample_level_errors_and_image_rules():
    with pytest.raises(schema.SampleError) as e:
        schema.parse_sample(["not", "a", "dict"], 4)
    assert (e.value.reason, e.value.sample_id) == ("bad_sample", "#4")
    img = {"id": 9, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image> <region>"},
                                                        {"from": "gpt", "value": "x"}],
           "annotation": [{"0": {"segmentation": None}, "1": {"segmentation": None}}]}
    with pytest.raises(schema.SampleError) as e:
        schema.parse_sample(img, 0)
    assert (e.value.reason, e.value.sample_id, e.value.field) == ("image_multi_frame", "9", "annotation[0]")
    with pytest.raises(KeyError):
        schema.SampleError("no_such_reason", "a", "b", "c")
    assert set(schema.REASONS) >= {"region_mask_mismatch", "empty_rle", "missing_segmentation", "bad_frame_index",
                                   "mask_size_mismatch", "frame_index_out_of_range", "unreadable_media"}


# ----------------------------------------------------------------------------- benchmarks


def _bench_q():
    return {"video": "DAVIS/JPEGImages/480p/bear",
            "Question": "What is <object3><region> doing near <object5><region>?",
            "type": "Basic Questions", "options": ["(A) Eating", "(B) Walking"], "Answer": "(B) Walking",
            "frame_idx": 12,
            "annotation": [{"4": {"segmentation": _rle()}, "12": {"segmentation": _rle()}},
                           {"12": {"segmentation": _rle()}, "20": {"segmentation": None}}]}


def test_bench_q_single_and_multi():
    s = bench_formats.parse_bench_q(_bench_q(), 2, mode="single")
    assert [o.frames for o in s.objects] == [(12,), (12,)] and s.region_layout() == ([12], [[0], [0]])
    human = s.conversations[0]["value"]
    assert human == ("<video>\nWhat is <object3>[<region>] doing near <object5>[<region>]? (A) Eating (B) Walking. "
                     "Answer with the option's letter from the given choices directly.")
    assert s.conversations[1] == {"from": "gpt", "value": "(B) Walking"}
    assert s.extra["type"] == "Basic Questions" and s.extra["frame_idx"] == 12 and s.extra["mode"] == "single"
    m = bench_formats.parse_bench_q(_bench_q(), 2, mode="multi")
    assert [o.frames for o in m.objects] == [(4, 12), (12, 20)] and m.region_layout()[0] == [4, 12, 20]


def test_bench_errors():
    raw = _bench_q()
    del raw["annotation"][1]["12"]
    with pytest.raises(schema.SampleError) as e:
        bench_formats.parse_bench_q(raw, 6, mode="single")
    assert (e.value.reason, e.value.sample_id, e.value.field) == ("missing_segmentation", "#6", "annotation[1]['12']")
    assert bench_formats.parse_bench_q(raw, 6, mode="multi").objects[1].frames == (20,)
    raw = _bench_q()
    raw["options"] = "A or B"
    with pytest.raises(schema.SampleError) as e:
        bench_formats.parse_bench_q(raw, 1)
    assert (e.value.reason, e.value.field) == ("bad_benchmark_entry", "options")
    d = {"video": "panda/x.mp4", "caption": "A dog runs.", "frame_idx": "3",
         "annotation": [{"3": {"segmentation": _rle()}}, {"3": {"segmentation": _rle()}}]}
    with pytest.raises(schema.SampleError) as e:  # the fixed Bench-D prompt has one [<region>]
        bench_formats.parse_bench_d(d, 0)
    assert e.value.reason == "region_mask_mismatch"
    d2 = copy.deepcopy(d)
    d2["annotation"] = d2["annotation"][:1]
    s = bench_formats.parse_bench_d(d2, 0)
    assert s.conversations[0]["value"] == "<video>\n" + bench_formats.BENCH_D_PROMPT
    assert s.conversations[1]["value"] == "A dog runs." and s.extra["caption"] == "A dog runs."


def test_duplicate_ids_and_the_checked_parse():
    """Ids are `sample_id`: the `id` field as a string (so 7 and "7" collide), else `#<index>`."""
    base = _base()
    entries = [dict(base, id="x"), dict(base, id=7), dict(base, id="7"), dict(base, id=None), dict(base, id="x"),
               dict(base, id="#3"), schema.BadLine(7, "f.jsonl:7: invalid JSON", "{")]
    assert [schema.sample_id(e, i) for i, e in enumerate(entries[:6])] == ["x", "7", "7", "#3", "x", "#3"]
    assert schema.duplicate_ids(entries) == {2: ("7", 1), 4: ("x", 0), 5: ("#3", 3)}
    parse = schema.CheckedParse.over(schema.parse_sample, entries)
    assert parse(entries[0], 0).sample_id == "x"
    with pytest.raises(schema.SampleError) as e:
        parse(entries[4], 4)
    assert (e.value.reason, e.value.sample_id, e.value.field) == ("duplicate_id", "x", "id")
    assert "sample #0" in e.value.message
    with pytest.raises(schema.SampleError) as e:
        parse(entries[6], 6)
    assert (e.value.reason, e.value.sample_id, e.value.field) == ("bad_json_line", "#6", "line 7")
    assert schema.REASONS["media_outside_root"] and schema.REASONS["duplicate_id"]
