"""C-MAPSS loading: the real files parse, and every kind of bad input names file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from turbofed.config import resolve_data_dir
from turbofed.data.cmapss import load_subset, read_table, split_runs
from turbofed.errors import DataError

ROW = "1 {c} -0.0007 -0.0004 100.0 " + " ".join(["518.67"] * 21)


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fd001_loads_with_official_test(cmapss_dir: Path) -> None:
    subset = load_subset("FD001", cmapss_dir)
    assert len(subset.train) == 100 and len(subset.test) == 100
    assert sum(len(r) for r in subset.train) == 20631
    assert sum(len(r) for r in subset.test) == 13096
    assert subset.train[0].rul()[-1] == 0 and subset.train[0].rul()[0] == len(subset.train[0]) - 1
    assert subset.test[0].rul_at_end == 112  # first line of RUL_FD001.txt


def test_fd003_has_train_only(cmapss_dir: Path) -> None:
    subset = load_subset("FD003", cmapss_dir)
    assert len(subset.train) == 100 and subset.test is None
    with pytest.raises(DataError, match="test_FD003.txt: file not found; run `turbofed data fetch`"):
        load_subset("FD003", cmapss_dir, require_test=True)


def test_trailing_spaces_and_blank_lines_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "t.txt", [ROW.format(c=1) + "  ", "", ROW.format(c=2) + " "])
    assert read_table(path).shape == (2, 26)


def test_missing_file_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train_FD002.txt: file not found; run `turbofed data fetch`"):
        load_subset("FD002", tmp_path)


def test_wrong_column_count_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "t.txt", [ROW.format(c=1), ROW.format(c=2) + " 7"])
    with pytest.raises(DataError, match=r"t.txt:2: expected 26 numbers, found 27"):
        read_table(path)


def test_non_number_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "t.txt", [ROW.format(c=1), "", ROW.format(c=2).replace("100.0", "abc")])
    with pytest.raises(DataError, match=r"t.txt:3: column 5 is not a finite number: 'abc'"):
        read_table(path)


def test_cycles_must_increase(tmp_path: Path) -> None:
    path = write(tmp_path, "t.txt", [ROW.format(c=1), ROW.format(c=2), ROW.format(c=2)])
    with pytest.raises(DataError, match=r"t.txt:3: cycles of engine 1 do not increase \(2 then 2\)"):
        split_runs(read_table(path), path)


def test_rul_file_length_must_match_test_engines(tmp_path: Path) -> None:
    rows = [ROW.format(c=c) for c in (1, 2)] + [ROW.replace("1 {c}", "2 {c}").format(c=1)]
    write(tmp_path, "train_FD009.txt", rows)
    write(tmp_path, "test_FD009.txt", rows)
    write(tmp_path, "RUL_FD009.txt", ["10", "20", "30"])
    with pytest.raises(DataError, match=r"RUL_FD009.txt: holds 3 RUL values but .*test_FD009.txt has 2 engines"):
        load_subset("FD009", tmp_path)


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOFED_DATA_DIR", "/from/env")
    assert resolve_data_dir("/from/flag") == Path("/from/flag")
    assert resolve_data_dir(None) == Path("/from/env")
    monkeypatch.delenv("TURBOFED_DATA_DIR")
    assert resolve_data_dir(None) == Path("data/cmapss")


def test_cut_gives_remaining_life(cmapss_dir: Path) -> None:
    run = load_subset("FD001", cmapss_dir).train[0]
    test = run.cut(50)
    assert len(test) == 50 and test.rul_at_end == len(run) - 50
    np.testing.assert_array_equal(test.rows(), run.rows()[:50])
