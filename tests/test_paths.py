"""vrefer_jax.paths: data paths confined to their root."""

import os

import pytest

from vrefer_jax.paths import PathOutsideRoot, resolve_under


def test_inside_root(tmp_path):
    assert resolve_under(str(tmp_path), "a/b.mp4") == os.path.join(str(tmp_path), "a", "b.mp4")
    assert resolve_under(str(tmp_path), "a/../b.mp4") == os.path.join(str(tmp_path), "b.mp4")


@pytest.mark.parametrize("bad", ["../x.mp4", "a/../../x.mp4", "/etc/passwd", "", "a\x00b"])
def test_outside_root_refused(tmp_path, bad):
    with pytest.raises(PathOutsideRoot) as e:
        resolve_under(str(tmp_path / "root"), bad)
    assert e.value.reason == "media_outside_root"


def test_absolute_allowed_only_when_asked(tmp_path):
    assert resolve_under(str(tmp_path), "/data/v.mp4", allow_absolute=True) == "/data/v.mp4"
    with pytest.raises(PathOutsideRoot):  # `..` escapes stay refused even then
        resolve_under(str(tmp_path), "../v.mp4", allow_absolute=True)


def test_sibling_with_common_prefix_is_outside(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(PathOutsideRoot):
        resolve_under(str(tmp_path / "root"), "../root2/v.mp4")
