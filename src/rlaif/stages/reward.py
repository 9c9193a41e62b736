"""Stage 4 `rlaif reward`: preference-model pre-training (PMP) on Stack Exchange, then fine-tuning.

Phase 1 (PMP) trains a fresh PM (base model + scalar head) on Stack Exchange answer pairs with the
ranking loss; phase 2 fine-tunes it on the mixed comparisons (AI harmlessness labels from
``rlaif label`` plus human comparison files) with the soft-label loss. Each phase checkpoints
atomically under ``run_dir/checkpoints/reward-{pmp,pm}/`` and resumes from the newest checkpoint.

Outputs: ``pmp_pairs.jsonl``, ``pmp/`` and ``pm/`` (PM directories, see :mod:`rlaif.pm`),
``metrics/reward.jsonl`` (one row per logged step of either phase), ``manifests/reward.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif import runlock
from rlaif.config import RewardConfig, RunConfig
from rlaif.errors import UserError

if TYPE_CHECKING:
    from rlaif.distributed import Dist

log = logging.getLogger(__name__)

Pair = dict[str, Any]


# ---------------------------------------------------------------------------- data


def split_holdout(pairs: Sequence[Pair], frac: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): a pair is held out when a seeded hash of its prompt falls below ``frac``.

    Splitting by prompt keeps every pair of one question (or dialogue) on the same side.
    """
    if not 0.0 <= frac < 1.0:
        raise UserError(f"reward.holdout: must be in [0, 1), got {frac}")
    train: list[Pair] = []
    held: list[Pair] = []
    for pair in pairs:
        key = json.dumps([seed, pair["prompt"]], sort_keys=True).encode("utf-8")
        u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (held if u < frac else train).append(pair)
    return train, held


def finetune_pairs(cfg: RunConfig) -> tuple[list[Pair], dict[str, str]]:
    """The fine-tuning comparisons (AI labels + human files) and the input files they came from."""
    from rlaif.data.preferences import load_preferences

    rc = cfg.reward
    files: dict[str, str] = {}
    pairs: list[Pair] = []
    ai = rc.preferences or str(cfg.run_path / "preferences.jsonl")
    if rc.preferences != "none":
        if Path(ai).is_file():
            pairs += [p.to_json() for p in load_preferences(ai)]
            files["preferences"] = ai
        elif rc.preferences:
            raise UserError(f"reward.preferences: {ai} not found")
        else:
            log.warning(
                "reward: %s not found (run `rlaif label` first); using human files only", ai
            )
    for i, path in enumerate(rc.human_preferences):
        if not Path(path).is_file():
            raise UserError(f"reward.human_preferences[{i}]: {path} not found")
        pairs += [p.to_json() for p in load_preferences(path, limit=rc.human_limit)]
        files[f"human_preferences[{i}]"] = path
    if not pairs:
        raise UserError(
            f"reward: no comparisons to fine-tune on ({ai} is missing and "
            "reward.human_preferences is empty)"
        )
    return unique_pairs(pairs), files


def unique_pairs(pairs: list[Pair]) -> list[Pair]:
    """``pairs`` with each comparison (the same prompt, chosen and rejected answers and label)
    once, the first kept. Two labels of the same texts (an AI label and a human one) both stay.

    ``rlaif label`` already mixes human comparisons into preferences.jsonl
    (``label.helpful_pairs``); naming the same file again in ``reward.human_preferences`` would
    otherwise train on each of them twice.
    """
    from rlaif.store import record_id

    seen: set[str] = set()
    out: list[Pair] = []
    for pair in pairs:
        key = record_id(pair["prompt"], pair["chosen"], pair["rejected"], pair["p_chosen"])
        if key not in seen:
            seen.add(key)
            out.append(pair)
    if len(out) < len(pairs):
        log.warning(
            "reward: %d of %d comparisons appear more than once across reward.preferences and "
            "reward.human_preferences (label.helpful_pairs already mixes human comparisons into "
            "preferences.jsonl); each is used once",
            len(pairs) - len(out),
            len(pairs),
        )
    return out


def write_pmp_pairs(
    dumps: Sequence[str], out: Path, *, max_per_question: int, seed: int
) -> dict[str, int]:
    """Stream PMP pairs from ``dumps`` into ``out`` (JSONL, written atomically); return counts."""
    from rlaif.data.stackexchange import iter_answer_pairs
    from rlaif.store import ensure_dir

    if not dumps:
        raise UserError("reward.pmp_dumps: no Stack Exchange dump given")
    stats: dict[str, int] = {}
    ensure_dir(out.parent)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for pair in iter_answer_pairs(
                dumps, max_per_question=max_per_question, seed=seed, stats=stats
            ):
                fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
            fh.flush()
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def _pmp_data(cfg: RunConfig, dist: Dist) -> tuple[list[Pair], dict[str, int]]:
    from rlaif.manifest import hash_inputs
    from rlaif.store import atomic_write_json, read_jsonl

    rc = cfg.reward
    out = cfg.run_path / "pmp_pairs.jsonl"
    key_file = cfg.run_path / ".pmp_pairs.key.json"
    key = {
        "dumps": hash_inputs({str(i): d for i, d in enumerate(rc.pmp_dumps)}),
        "max_per_question": rc.pmp_max_per_question,
        "seed": cfg.seed,
    }

    def fresh() -> dict[str, int]:
        if out.is_file() and key_file.is_file():
            known = json.loads(key_file.read_text())
            if known.get("key") == key:
                return dict(known["stats"])
        stats = write_pmp_pairs(
            rc.pmp_dumps, out, max_per_question=rc.pmp_max_per_question, seed=cfg.seed
        )
        atomic_write_json(key_file, {"key": key, "stats": stats})
        return stats

    stats = dist.on_main(fresh)
    pairs = [obj for _, obj in read_jsonl(out)]
    if rc.pmp_limit and len(pairs) > rc.pmp_limit:
        random.Random(cfg.seed).shuffle(pairs)
        pairs = pairs[: rc.pmp_limit]
    if not pairs:
        raise UserError(f"{out}: the Stack Exchange dumps gave no answer pairs")
    return pairs, stats


# ---------------------------------------------------------------------------- phases


def _phase(
    cfg: RunConfig,
    *,
    name: str,
    init: Path,
    pairs: list[Pair],
    tcfg: RewardConfig,
    loss_kind: str,
    out_dir: Path,
    step_offset: int,
    dist: Dist,
    device: str,
) -> dict[str, Any]:
    """Train one phase (resuming from its newest checkpoint) and export the PM to ``out_dir``.

    A phase whose exported PM carries the same fingerprint is not trained again.
    """
    from rlaif.checkpoint import atomic_dir
    from rlaif.stages.reward_train import phase_fingerprint, train_pm

    fp = phase_fingerprint(init, pairs, tcfg, loss_kind, dist.layout())
    meta = _done_meta(out_dir)
    if meta.get("fingerprint") == fp:
        log.info("reward: %s is up to date", out_dir)
        # What a kill during the cleanup after the export left.
        shutil.rmtree(cfg.run_path / "checkpoints" / f"reward-{name}", ignore_errors=True)
        return {"steps": int(meta.get("steps", 0)), "fingerprint": fp, "reused": True}
    ckpt_root = cfg.run_path / "checkpoints" / f"reward-{name}"
    pm, stats = train_pm(
        init,
        pairs,
        tcfg,
        loss_kind=loss_kind,
        phase=name,
        ckpt_root=ckpt_root,
        metrics_path=cfg.run_path / "metrics" / "reward.jsonl",
        step_offset=step_offset,
        seed=cfg.seed,
        device=device,
        trust_remote_code=cfg.backend.trust_remote_code,
        allow_pickle=cfg.backend.allow_pickle,
        dist=dist,
    )
    pm.extra_meta = {"phase": name, "steps": stats["steps"], "fingerprint": stats["fingerprint"]}

    def export() -> None:
        atomic_dir(out_dir, lambda tmp: pm.save_pretrained(tmp, with_trainable=False))
        shutil.rmtree(ckpt_root, ignore_errors=True)

    dist.on_main(export)
    return stats


def _done_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "pm.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run(cfg: RunConfig) -> Path:
    """PMP (unless ``reward.pmp`` is false) then fine-tuning; returns ``run_dir/pm``.

    Under ``accelerate launch`` both phases train data-parallel; the main process writes the
    files and runs the held-out evaluations.
    """
    from rlaif.distributed import setup
    from rlaif.manifest import fingerprint, hash_inputs, scrub, write_manifest
    from rlaif.models import resolve_model
    from rlaif.stages.reward_eval import evaluate_pairs

    rc = cfg.reward
    run_dir = cfg.run_path
    base = resolve_model(rc.base_model or cfg.model)
    ft_pairs, ft_files = finetune_pairs(cfg)
    ft_train, ft_held = split_holdout(ft_pairs, rc.holdout, cfg.seed)
    if not ft_train:
        raise UserError("reward.holdout: no fine-tuning pairs left for training")
    inputs = hash_inputs({**ft_files, **{f"pmp_dumps[{i}]": d for i, d in enumerate(rc.pmp_dumps)}})
    dist, device = setup(cfg.backend.device, "reward")
    stage_cfg = scrub({"model": str(base), "seed": cfg.seed, **dataclasses.asdict(rc)})
    stage_cfg |= dist.layout()  # processes (the global batch) and sharding shape the result
    manifest_path = run_dir / "manifests" / "reward.json"
    from rlaif.manifest import read_manifest

    old = read_manifest(manifest_path)
    if (
        old
        and old.get("fingerprint") == fingerprint(stage_cfg, inputs)
        and (run_dir / "pm").is_dir()
    ):
        print(f"rlaif reward: {run_dir / 'pm'} is up to date", file=sys.stderr)
        return run_dir / "pm"

    t0 = time.time()
    report: dict[str, Any] = {"base_model": str(base)}
    init, offset = base, 0
    if rc.pmp:
        pmp_pairs, se_stats = _pmp_data(cfg, dist)
        pmp_train, pmp_held = split_holdout(pmp_pairs, rc.holdout, cfg.seed)
        pmp_cfg = dataclasses.replace(rc, lr=rc.pmp_lr, epochs=rc.pmp_epochs)
        pmp_stats = _phase(
            cfg, name="pmp", init=base, pairs=pmp_train, tcfg=pmp_cfg,
            loss_kind="ranking", out_dir=run_dir / "pmp", step_offset=0, dist=dist, device=device,
        )  # fmt: skip
        report["pmp"] = {
            "stackexchange": se_stats,
            "train_pairs": len(pmp_train),
            "heldout_pairs": len(pmp_held),
            **pmp_stats,
        }
        if pmp_held and dist.main:
            report["pmp"]["heldout"] = evaluate_pairs(run_dir / "pmp", pmp_held, cfg)
        init, offset = run_dir / "pmp", int(pmp_stats["steps"])
    ft_stats = _phase(
        cfg, name="pm", init=init, pairs=ft_train, tcfg=rc, loss_kind="soft",
        out_dir=run_dir / "pm", step_offset=offset, dist=dist, device=device,
    )  # fmt: skip
    report["finetune"] = {"train_pairs": len(ft_train), "heldout_pairs": len(ft_held), **ft_stats}
    if not dist.main:
        dist.wait()  # for the main process's evaluations and manifest
        return run_dir / "pm"
    if ft_held:
        report["finetune"]["heldout"] = evaluate_pairs(run_dir / "pm", ft_held, cfg)
        h = report["finetune"]["heldout"]
        print(
            f"rlaif reward: held-out n={h['n']} accuracy={h['accuracy']:.4f} ece={h['ece']:.4f}",
            file=sys.stderr,
        )
    report["seconds"] = round(time.time() - t0, 1)
    write_manifest(manifest_path, stage="reward", config=stage_cfg, inputs=inputs, extra=report)
    dist.wait()
    return run_dir / "pm"


# ---------------------------------------------------------------------------- CLI


SUMMARY = "stage 4: preference model: Stack Exchange pre-training, then soft-label fine-tuning"


def _help() -> str:
    from rlaif.cli import Command, stage_help

    text = stage_help(Command("reward", SUMMARY, "rlaif.stages.reward:run", section="reward"))
    return (
        "usage: rlaif reward [CONFIG.yaml] [key=value ...]      PMP + fine-tuning -> run_dir/pm\n"
        "       rlaif reward pmp-data DUMP... [key=value ...]   write run_dir/pmp_pairs.jsonl\n"
        "       rlaif reward eval PM_DIR FILE [--limit N]       accuracy + calibration\n\n" + text
    )


def pmp_data_main(argv: list[str]) -> int:
    from rlaif.config import load_config

    dumps = [a for a in argv if "=" not in a and not a.endswith((".yaml", ".yml"))]
    configs = [a for a in argv if a.endswith((".yaml", ".yml")) and "=" not in a]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if not dumps or any(a.startswith("-") for a in dumps) or len(configs) > 1:
        raise UserError("usage: rlaif reward pmp-data DUMP... [CONFIG.yaml] [key=value ...]")
    cfg = load_config(configs[0] if configs else None, overrides)
    out = cfg.run_path / "pmp_pairs.jsonl"
    with runlock.hold(cfg.run_path, "rlaif reward pmp-data"):
        stats = write_pmp_pairs(
            dumps, out, max_per_question=cfg.reward.pmp_max_per_question, seed=cfg.seed
        )
    for key, value in stats.items():
        print(f"{key}: {value}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str]) -> int:
    """`rlaif reward` dispatcher: sub-verbs `pmp-data` and `eval`, else CONFIG + overrides -> run."""
    from rlaif.cli import split_stage_args
    from rlaif.config import load_config

    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0
    if argv and argv[0] == "pmp-data":
        return pmp_data_main(argv[1:])
    if argv and argv[0] == "eval":
        from rlaif.stages.reward_eval import main as eval_main

        return eval_main(argv[1:])
    config, overrides = split_stage_args("reward", argv)
    cfg = load_config(config, overrides)
    with runlock.hold(cfg.run_path, "rlaif reward"):
        out = run(cfg)
    print(f"rlaif reward: done -> {out}")
    return 0
