"""Does preference-model pre-training (PMP) help? Held-out hh-rlhf accuracy with and without it.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/pmp_effect.py

Both PMs start from the same base model (SmolLM2-135M-Instruct by default) and are fine-tuned by
`rlaif reward` on the same human comparisons: the first ``--train`` pairs of
../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz (hard labels, no AI labels, no holdout). One of
them first runs PMP on ``--pmp-limit`` answer pairs from the Stack Exchange coffee dump. Both are
then scored on the LAST ``--eval`` pairs of the same file (never trained on). The difference is
given with a paired bootstrap 95 % interval (same pairs under both PMs).

Prints ``RESULT pmp-effect n=... acc_pmp=... acc_no_pmp=... diff=... diff_lo=... diff_hi=...``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, SHARED_DATA, report

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
COFFEE = SHARED_DATA / "stackexchange" / "coffee.Posts.xml"


def _train(run: Path, args: argparse.Namespace, pmp: bool) -> float:
    cmd = [
        sys.executable, "-m", "rlaif", "reward",
        f"run_dir={run}", f"model={args.model}", f"seed={args.seed}",
        "reward.preferences=none", f"reward.human_preferences=[{HH}]",
        f"reward.human_limit={args.train}", "reward.holdout=0",
        f"reward.pmp={str(pmp).lower()}", f"reward.pmp_dumps=[{COFFEE}]",
        f"reward.pmp_limit={args.pmp_limit}", f"reward.max_length={args.max_length}",
        f"reward.epochs={args.epochs}", f"reward.pmp_epochs={args.epochs}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def _eval_pairs(n: int, skip_first: int) -> list[dict[str, Any]]:
    from rlaif.data.preferences import parse_preference

    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    start = len(lines) - n
    if start < skip_first:
        raise SystemExit(f"--eval {n} overlaps the {skip_first} training pairs")
    return [
        parse_preference(json.loads(line), f"{HH}:{start + i + 1}").to_json()
        for i, line in enumerate(lines[start:])
    ]


def _margins(pm_dir: Path, pairs: list[dict[str, Any]]) -> list[float]:
    from rlaif.pm import load_pm

    pm = load_pm(pm_dir)
    convs = []
    for p in pairs:
        convs.append([*p["prompt"], {"role": "assistant", "content": p["chosen"]}])
        convs.append([*p["prompt"], {"role": "assistant", "content": p["rejected"]}])
    s = pm.score(convs, batch_size=16, progress=True)
    return [a - b for a, b in zip(s[0::2], s[1::2], strict=True)]


def paired_bootstrap(a: list[bool], b: list[bool], reps: int, seed: int) -> tuple[float, float]:
    """95 % interval of mean(a) - mean(b), resampling the pairs (same index in both)."""
    rng = random.Random(seed)
    n = len(a)
    diffs = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(a[i] - b[i] for i in idx) / n)
    diffs.sort()
    return diffs[int(0.025 * reps)], diffs[int(0.975 * reps) - 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=128, help="hh-rlhf pairs to fine-tune on")
    ap.add_argument("--eval", type=int, default=200, help="held-out pairs (the file's last)")
    ap.add_argument("--pmp-limit", type=int, default=128, help="Stack Exchange PMP pairs")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    pairs = _eval_pairs(args.eval, args.train)
    acc: dict[str, list[bool]] = {}
    details: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="pmp-effect-") as tmp:
        for name, pmp in (("pmp", True), ("no_pmp", False)):
            run = Path(tmp) / name
            secs = _train(run, args, pmp)
            margins = _margins(run / "pm", pairs)
            acc[name] = [m > 0 for m in margins]
            details[name] = {"train_s": round(secs, 1), "mean_margin": sum(margins) / len(margins)}
            print(f"{name}: accuracy {sum(acc[name]) / len(pairs):.3f} ({secs:.0f} s)", flush=True)
    lo, hi = paired_bootstrap(acc["pmp"], acc["no_pmp"], 2000, args.seed)
    n = len(pairs)
    figures = {
        "n": n,
        "acc_pmp": round(sum(acc["pmp"]) / n, 4),
        "acc_no_pmp": round(sum(acc["no_pmp"]) / n, 4),
        "diff": round((sum(acc["pmp"]) - sum(acc["no_pmp"])) / n, 4),
        "diff_lo": round(lo, 4),
        "diff_hi": round(hi, 4),
    }
    report("pmp-effect", figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
