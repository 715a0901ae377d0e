"""Tests of `retina-scale study` and its script wrapper, scripts/resolution_study.py: the options, and
bad arguments refused in one line before any work. The study itself runs in tests/evidence/test_study.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from retina_scale.cli import main

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "resolution_study.py"


def test_help_lists_the_study_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: retina-scale study")
    for option in ("--out", "--full", "--config", "--data", "--no-scratch", "--no-throughput",
                   "--throughput-steps", "--quiet", "KEY=VALUE"):
        assert option in out, option


@pytest.mark.parametrize("args, message", [
    (["stages.0.epochs=0"], "stages.0.epochs must be >= 1"),
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--throughput-steps", "0"], "--throughput-steps must be >= 1; got 0"),
    (["--config", "nonsense-preset"], "nonsense-preset"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retina-scale study: error: ") and message in err[0], err
    assert not out.exists()


def test_the_script_is_the_study_command(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "stages.0.epochs=0"],
                          capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("retina-scale study: error: stages.0.epochs must be >= 1")
    assert not (tmp_path / "runs").exists()
