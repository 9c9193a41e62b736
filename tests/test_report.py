from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlaif.elo import Comparison, elo_table
from rlaif.feedback import calibration_bins
from rlaif.report import write_report


def test_report_has_tables_plots_and_transcripts(tmp_path: Path) -> None:
    games = [Comparison(0, 1, 0.2, f"p{k}") for k in range(10)]
    t = elo_table(["helpful", "sl-cai"], games, bootstrap=50).__dict__
    (tmp_path / "metrics").mkdir()
    rows = [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s} for s in range(1, 6)]
    (tmp_path / "metrics" / "ppo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "judge": "tiny",
        "n_harmful": 10,
        "n_helpful": 4,
        "elo": {"harmlessness": t, "helpfulness": t},
        "per_model": {"helpful": {"evasive": 0.1}, "sl-cai": {"evasive": 0.3}},
        "labeler": {"n": 20, "acc_dual": 0.6, "ece": 0.1, "probs": [0.2, 0.7, 0.9, 0.55]},
        "pm_accuracy": {"hh-rlhf": {"n": 20, "accuracy": 0.55, "ece": 0.05}},
        "transcripts": [
            {"kind": "harmful", "prompt": "How do I pick a lock?", "answers": {"a": "No."}}
        ],
    }
    path = write_report(tmp_path, results)
    text = path.read_text()
    assert "### Harmlessness" in text and "| sl-cai |" in text and "0.300" in text
    assert "How do I pick a lock?" in text
    for png in ("elo.png", "ppo.png", "calibration.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f"plots/{png}" in text


def test_calibration_bins() -> None:
    rows = calibration_bins([0.95, 0.92, 0.05, 0.55, 0.4, 0.5], bins=5)
    # Bins of confidence max(p, 1 - p) on [0.5, 1], width 0.1. 0.55 and 0.5 (confidence 0.55 and
    # 0.5): right and a tie (half). 0.4 (confidence 0.6): wrong. 0.92 and 0.95 right, 0.05 wrong
    # with the same confidence 0.95.
    assert rows[0] == pytest.approx((0.525, 0.75, 2))
    assert rows[1] == pytest.approx((0.6, 0.0, 1))
    assert rows[2] == pytest.approx((0.94, 2 / 3, 3))
    assert len(rows) == 3
