import pytest

from wsi_common.paths import OutsideRootError, resolve_under


def test_paths_under_the_root_resolve(tmp_path):
    assert resolve_under(tmp_path, "") == tmp_path.resolve()
    assert resolve_under(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
    assert resolve_under(tmp_path, str(tmp_path / "c")) == (tmp_path / "c").resolve()


@pytest.mark.parametrize("requested", ["..", "a/../../x", "/etc", "link/inside"])
def test_paths_that_leave_the_root_are_refused(tmp_path, requested):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(OutsideRootError, match="is outside the output root"):
        resolve_under(tmp_path / "root", requested.replace("link/inside", "link/elsewhere"))
