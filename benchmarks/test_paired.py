"""benchmarks.paired runs its block pairs and prints a verdict for each target it selects."""

import pathlib
import subprocess
import sys

import pytest

from benchmarks.paired import main


def paired(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.paired", *args], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])


def test_rows_for_the_selected_targets():
    done = paired("-k", "pointwise 1x1 384->64", "--blocks", "2", "--calls", "1", "--copies", "1")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| mobilenetv2")]
    assert [row.split(" | ")[3] for row in rows] == ["≥ 3× fp32 NCHW", "≥ 1× torch.ao int8 x86 NCHW"]
    for row in rows:
        ratio = float(row.split(" | ")[4].rstrip("×"))
        assert 0 < ratio < 100
        assert row.endswith(("met |", "**MISS** |", "within noise |"))
    assert "Warning" not in done.stderr


@pytest.mark.parametrize("flag", ["--blocks", "--calls", "--copies"])
def test_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused before anything is set up or timed
        main(["-k", "none", flag, "0"])
    assert exit_info.value.code == 2
    assert "expected positive counts" in capsys.readouterr().err
