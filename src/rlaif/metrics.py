"""Per-step training metrics, appended to ``run_dir/metrics/<stage>.jsonl`` (flushed each line)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rlaif.store import atomic_write_text, ensure_dir


class MetricsLog:
    """Append-only metrics file; a resumed run drops rows past the step it resumes from.

    ``active=False`` (the non-main processes of a data-parallel run) touches no file.
    """

    def __init__(self, path: Path, resume_step: int | None = None, active: bool = True) -> None:
        self.path = Path(path)
        self.active = active
        if not active:
            return
        ensure_dir(self.path.parent)
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            # atomic: a kill while trimming leaves the old file, never a truncated one
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, step: int, **values: Any) -> None:
        if not self.active:
            return
        row: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        for k, v in values.items():
            val = float(v) if hasattr(v, "__float__") and not isinstance(v, bool | str) else v
            row[k] = None if isinstance(val, float) and not math.isfinite(val) else val
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
