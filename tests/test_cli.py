"""The command line: a full disk, a read-only or forbidden folder and a path through a file are one-line errors
(exit 2), not tracebacks (issue 16, lesser item); any other OSError keeps its traceback."""

import errno
import os
import tempfile

import pytest

from retina_scale.cli import main


@pytest.fixture
def photos(tmp_path):
    """An EyePACS-layout folder of one photo (prepare reads it, then writes its cache)."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "trainLabels.csv").write_text("image,level\n1_left,0\n")
    (data / "train" / "1_left.jpeg").write_bytes(b"\xff\xd8not really a photo\xff\xd9")
    return data


def _prepare(data, out):
    return main(["prepare", "--data", str(data), "--out", str(out), "--sizes", "112", "--workers", "1",
                 "--no-progress"])


def test_an_output_folder_through_a_file_is_one_line(photos, tmp_path, capsys):
    (tmp_path / "plain-file").write_text("not a folder")
    code = _prepare(photos, tmp_path / "plain-file" / "cache")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"retina-scale prepare: error: cannot access {tmp_path / 'plain-file' / 'cache'}")
    assert "(ENOTDIR: a part of the path is a file, not a folder)" in err


@pytest.mark.parametrize("code, name, hint", [
    (errno.ENOSPC, "ENOSPC", "the disk is full"),
    (errno.EROFS, "EROFS", "the file system is read-only"),
    (errno.EACCES, "EACCES", "no permission"),
])
def test_a_full_disk_or_a_read_only_folder_is_one_line(photos, tmp_path, capsys, monkeypatch, code, name, hint):
    # Simulated: every file is written through a temporary file (utils.fileio.atomic_path), which fails as the
    # kernel would fail it.
    def refuse(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), dir)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert _prepare(photos, tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("retina-scale prepare: error: cannot "), err
    assert f"{tmp_path / 'cache'}: {os.strerror(code)} ({name}: {hint}" in err


def test_any_other_os_error_keeps_its_traceback(photos, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tempfile, "mkstemp", broken)
    with pytest.raises(OSError, match="Input/output error"):
        _prepare(photos, tmp_path / "cache")
