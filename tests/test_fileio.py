"""hippo.fileio: atomic writes of files and folders."""

from __future__ import annotations

import stat

from hippo.fileio import replace_dir, write_bytes_atomic


def test_replace_dir_swaps_in_the_new_folder_and_leaves_nothing_behind(tmp_path):
    dst = tmp_path / "clean"
    for content in ("first", "second"):
        src = tmp_path / f".build-{content}"
        src.mkdir()
        (src / "a.txt").write_text(content)
        assert replace_dir(src, dst) == dst
        assert (dst / "a.txt").read_text() == content and not src.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]  # the old folder is gone too


def test_write_bytes_atomic_with_a_private_mode(tmp_path):
    path = write_bytes_atomic(tmp_path / "secret.json", b"{}", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["secret.json"]
