"""Fixtures of the data tests: small data sets in the EyePACS layout."""

from __future__ import annotations

import pytest

from fundus_fixtures import draw_fundus, write_csv, write_jpeg


@pytest.fixture
def eyepacs_dir(tmp_path):
    """10 patients, both eyes, grades spread over 0-4; 320x240 JPEGs."""
    root = tmp_path / "eyepacs"
    root.mkdir()
    rows = []
    for p in range(10):
        for eye in ("left", "right"):
            grade = (p + (eye == "right")) % 5
            name = f"{100 + p}_{eye}"
            write_jpeg(root / f"{name}.jpeg", draw_fundus(seed=p * 2 + (eye == "right"), cx=150 + p, cy=118))
            rows.append([name, grade])
    write_csv(root / "trainLabels.csv", ["image", "level"], rows)
    return root
