"""`rlaif reward eval PM_DIR FILE`: pairwise accuracy and calibration of a preference model.

FILE is a preference file in either format :func:`rlaif.data.preferences.load_preferences` reads
(hh-rlhf ``chosen``/``rejected`` transcripts, or ``prompt``/``chosen``/``rejected``/``p_chosen``).
Accuracy counts a pair right when the PM scores the preferred answer higher (pairs with
``p_chosen = 0.5`` are left out); ECE compares ``sigmoid(r_chosen - r_rejected)`` with the label in
10 confidence bins (see :func:`rlaif.rl.pm_losses.expected_calibration_error`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.errors import UserError

if TYPE_CHECKING:
    from rlaif.config import RunConfig
    from rlaif.pm import PreferenceModel


def score_pairs(
    pm: PreferenceModel, pairs: Sequence[dict[str, Any]], batch_size: int = 16
) -> dict[str, Any]:
    """Score both answers of every pair with ``pm``; return n, accuracy, ece, margin, agreement."""
    import torch

    from rlaif.rl.pm_losses import expected_calibration_error, mean_margin, pair_accuracy

    if not pairs:
        raise UserError("reward eval: no pairs to score")
    convs = []
    for p in pairs:
        convs.append([*p["prompt"], {"role": "assistant", "content": p["chosen"]}])
        convs.append([*p["prompt"], {"role": "assistant", "content": p["rejected"]}])
    scores = pm.score(convs, batch_size=batch_size, progress=True)
    rc = torch.tensor(scores[0::2], dtype=torch.float64)
    rr = torch.tensor(scores[1::2], dtype=torch.float64)
    target = torch.tensor([float(x.get("p_chosen", 1.0)) for x in pairs], dtype=torch.float64)
    q = torch.sigmoid(rc - rr)
    return {
        "n": len(pairs),
        "accuracy": pair_accuracy(rc, rr, target),
        "ece": expected_calibration_error(q.tolist(), target.tolist()),
        "mean_margin": mean_margin(rc, rr),
        "mean_q": float(q.mean()),
    }


def evaluate_pm(
    pm_dir: str | Path,
    path: str | Path,
    *,
    limit: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Accuracy and calibration of the PM in ``pm_dir`` on the preference file ``path``."""
    from rlaif.data.preferences import load_preferences
    from rlaif.pm import load_pm

    pairs = [p.to_json() for p in load_preferences(path, limit=limit)]
    pm = load_pm(pm_dir, device=device)
    return score_pairs(pm, pairs, batch_size=batch_size)


def evaluate_pairs(pm_dir: Path, pairs: Sequence[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Held-out evaluation inside `rlaif reward` (device and batch size from the run config)."""
    from rlaif.backends.dtype import resolve_device
    from rlaif.pm import load_pm

    pm = load_pm(pm_dir, device=resolve_device(cfg.backend.device))
    return score_pairs(pm, pairs, batch_size=cfg.reward.eval_batch_size)


def result_line(res: dict[str, Any]) -> str:
    def fmt(x: float) -> str:
        return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4f}"

    return f"RESULT reward-eval n={res['n']} accuracy={fmt(res['accuracy'])} ece={fmt(res['ece'])}"


def main(argv: Sequence[str]) -> int:
    """``rlaif reward eval PM_DIR FILE [--limit N] [--batch-size N] [--device D]``."""
    from rlaif.backends.dtype import resolve_device

    args = list(argv)
    opts = {"--limit": "0", "--batch-size": "16", "--device": "auto"}
    pos: list[str] = []
    while args:
        a = args.pop(0)
        key, eq, val = a.partition("=")
        if key in opts:
            if not eq:
                if not args:
                    raise UserError(f"rlaif reward eval: {key} needs a value")
                val = args.pop(0)
            opts[key] = val
        elif a.startswith("-"):
            raise UserError(f"rlaif reward eval: unknown option '{a}'")
        else:
            pos.append(a)
    if len(pos) != 2:
        raise UserError("usage: rlaif reward eval PM_DIR FILE [--limit N] [--batch-size N]")
    try:
        limit, batch = int(opts["--limit"]), int(opts["--batch-size"])
    except ValueError:
        raise UserError("rlaif reward eval: --limit and --batch-size take integers") from None
    res = evaluate_pm(
        pos[0], pos[1], limit=limit, batch_size=batch, device=resolve_device(opts["--device"])
    )
    print(f"pm: {pos[0]}")
    print(f"file: {pos[1]}")
    print(f"pairs: {res['n']}")
    print(f"accuracy: {res['accuracy']:.4f}")
    print(f"ece: {res['ece']:.4f}")
    print(f"mean margin (chosen - rejected): {res['mean_margin']:.4f}")
    print(result_line(res))
    return 0
