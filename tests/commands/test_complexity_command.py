"""Tests of `retina-scale complexity`: the table, JSON and the plot, and its one-line errors."""

import json

from retina_scale.cli import main


def test_cli_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "fig4.png"
    assert main(["complexity", "--stages", "tiny,224", "--width", "0.5", "--json", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["stage"] for d in data] == ["tiny", "small"] and [d["input_size"] for d in data] == [112, 224]
    assert all(isinstance(d[k], int) for d in data for k in ("weights", "macs", "activations"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["fig4.png"]


def test_cli_table_shows_paper_ratio(capsys):
    assert main(["complexity", "--stages", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "1.557 M" in out and "1.550 M" in out and "1.004" in out


def test_cli_bad_stage_is_one_line_error(capsys):
    assert main(["complexity", "--stages", "tiny,huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown stage 'huge'" in err and "accepted:" in err
