import os
import stat

import pytest

from retina_scale.utils.fileio import atomic_path


def test_atomic_path_renames_into_place_with_normal_permissions(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not target.exists()
        with open(tmp, "w") as f:
            f.write("a,b\n")
    assert target.read_text() == "a,b\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_write_bytes_and_write_csv_replace_the_file_whole(tmp_path):
    from retina_scale.utils.fileio import write_bytes, write_csv

    target = tmp_path / "data.bin"
    target.write_bytes(b"older and longer")
    write_bytes(target, b"\x00new")
    assert target.read_bytes() == b"\x00new"
    table = tmp_path / "t.csv"
    write_csv(table, ["image", "reason"], [["1_left", "a, b"], ["é", ""]])
    assert table.read_bytes() == 'image,reason\r\n1_left,"a, b"\r\né,\r\n'.encode("utf-8")
    write_csv(table, ["image"], [["x"]], lineterminator="\n")
    assert table.read_bytes() == b"image\nx\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "t.csv"]
