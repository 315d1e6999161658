"""maml_ext.experiments.reporting (run log, tables) and the atomic writes under it."""

import csv
import json
import stat

import pytest

from maml_ext.checkpoint import write_text_atomic
from maml_ext.experiments.reporting import LOG_COLUMNS, RunLog, accuracy_table, mean_ci95


def _row(iteration, phase="train", accuracy=0.5):
    return {"iteration": iteration, "phase": phase, "loss": 1.0 / iteration, "accuracy": accuracy}


def test_run_log_writes_jsonl_and_csv_row_by_row(tmp_path):
    log = RunLog(tmp_path, keep_until=-1)
    log.append(_row(1))
    log.append({**_row(2, "val", 0.75), "accuracy_ci95": 0.1, "ignored": "x"})
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [list(row) for row in rows] == [list(LOG_COLUMNS)] * 2
    assert rows[1]["accuracy_ci95"] == 0.1 and rows[0]["accuracy_ci95"] is None
    with open(tmp_path / "log.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["iteration"] for row in table] == ["1", "2"]
    assert table[0]["accuracy_ci95"] == "" and float(table[1]["accuracy"]) == 0.75
    assert log.rows_of("val") == [rows[1]]


def test_resumed_run_log_keeps_only_what_the_checkpoint_covers(tmp_path):
    log = RunLog(tmp_path, keep_until=-1)
    for iteration in range(1, 6):
        log.append(_row(iteration))
    with open(tmp_path / "log.jsonl", "a") as handle:
        handle.write('{"iteration": 6, "pha')  # a run killed in the middle of a line
    resumed = RunLog(tmp_path, keep_until=3)
    assert [row["iteration"] for row in resumed.rows] == [1, 2, 3]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fresh_run_log_drops_an_earlier_runs_rows(tmp_path):
    log = RunLog(tmp_path, keep_until=-1)
    log.append(_row(1))
    assert RunLog(tmp_path, keep_until=-1).rows == []
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_write_text_atomic_gives_the_mode_open_would(tmp_path):
    # Not the private 0600 of the temporary file it starts as (where the umask allows more).
    path = write_text_atomic(tmp_path / "sub" / "report.json", "{}\n")
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(
        (tmp_path / "plain.txt").stat().st_mode
    )


def test_accuracy_table_marks_the_papers_row_and_leaves_missing_cells_empty():
    results = {
        "maml": {"0": {"accuracy": 0.2, "ci95": 0.01}, "1": {"accuracy": 0.9, "ci95": 0.02}},
        "baseline": {"0": {"accuracy": 0.2, "ci95": 0.0}},
    }
    lines = accuracy_table(results, mark_steps=1).splitlines()
    assert lines[0].split() == ["steps", "maml", "baseline"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["0", "20.00", "±", "1.00", "%", "20.00", "±", "0.00", "%"]
    assert lines[3].split() == ["1", "(paper)", "90.00", "±", "2.00", "%"]


def test_mean_ci95_rejects_no_values():
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci95([])
