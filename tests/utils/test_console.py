"""Tests of retina_scale.utils.console: TensorFlow's C++ log lines are filtered out of standard error."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retina_scale.utils.console import NATIVE_LOG

REPO = Path(__file__).resolve().parents[2]

NATIVE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796129396.901822   27364 port.cc:153] oneDNN custom operations are on.",
    b"E0000 00:00:1796129400.416396   27364 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    b"E0000 00:00:1796129423.206766   27364 meta_optimizer.cc:967] remapper failed: INVALID_ARGUMENT",
    b"W1201 12:04:21.000001    812 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
]
OURS = [b"Stage 1 tiny: 8 epochs", b"Error: something a person must read", b"I am a line of ours", b"E"]


def test_the_pattern_matches_tensorflows_lines_and_not_ours():
    assert all(NATIVE_LOG.match(line) for line in NATIVE)
    assert not any(NATIVE_LOG.match(line) for line in OURS)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, cwd=REPO, timeout=120)


def test_the_filter_drops_native_lines_and_keeps_ours_progress_bars_and_a_traceback_at_exit():
    result = _run(f"""
        import os, sys
        from retina_scale.utils.console import NativeLogFilter
        NativeLogFilter().start()
        native, ours = {NATIVE!r}, {OURS!r}
        for a, b in zip(native, ours):
            os.write(2, a + b"\\n")          # as TensorFlow's C++ writes: straight to descriptor 2
            os.write(2, b + b"\\n")
        os.write(2, native[-1][:20])        # a native line arriving in two pieces, with its second line
        os.write(2, native[-1][20:] + b"\\nTo enable the following instructions: AVX2 FMA, rebuild\\n")
        sys.stderr.write("\\rsynth:  10%")    # a progress bar, never ended by a newline
        sys.stderr.write("\\rsynth: 100%\\n")
        print("done", file=sys.stderr)
        1 / 0
    """)
    err = result.stderr
    assert result.returncode == 1
    assert not any(line in err for line in NATIVE) and b"To enable" not in err, err
    for line in OURS[:3]:
        assert line + b"\n" in err
    assert b"\rsynth:  10%\rsynth: 100%\n" in err
    assert b"done\n" in err and b"ZeroDivisionError" in err  # the traceback printed at exit got through


@pytest.mark.slow  # two processes that import TensorFlow
def test_retina_scale_hides_tensorflows_log_unless_verbose():
    code = "import sys; from retina_scale.cli import main; sys.exit(main({argv}))"
    quiet = _run(code.format(argv='["complexity", "--stages", "tiny", "--width", "0.25"], console=True'))
    verbose = _run(code.format(argv='["complexity", "--stages", "tiny", "--width", "0.25", "--verbose"], '
                                    'console=True'))
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert quiet.stdout == verbose.stdout and b"tiny" in quiet.stdout
    native = [line for line in verbose.stderr.splitlines() if NATIVE_LOG.match(line)]
    assert native, "TensorFlow printed nothing of its own: this test no longer shows the filter working"
    assert not [line for line in quiet.stderr.splitlines() if NATIVE_LOG.match(line)], quiet.stderr
    assert b"To enable the following instructions" not in quiet.stderr
