"""Stage 6 `rlaif evaluate`: Elo for harmlessness and helpfulness across checkpoints, as the CAI
paper does, plus evasiveness, PM accuracy and how far the judge agrees with humans.

Outputs under ``run_dir``: ``eval/split.json`` (which prompts were held out), ``eval/answers.jsonl``
and ``eval/judgments.jsonl`` (resumable record stores), ``eval/results.json``, ``report.md`` and
``plots/``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlaif.backends.base import GenerationParams
from rlaif.config import RunConfig
from rlaif.configspec import to_dict
from rlaif.data.prompts import PromptItem, load_prompts
from rlaif.elo import Comparison, elo_table
from rlaif.errors import UserError
from rlaif.evasive import evasive_rate
from rlaif.manifest import hash_inputs, write_manifest
from rlaif.report import write_report
from rlaif.store import JsonlStore, atomic_write_json, ensure_dir, read_jsonl, record_id

log = logging.getLogger(__name__)

DEFAULT_STAGES = (("helpful", None), ("sl-cai", "sft"), ("rl-cai", "rl"), ("dpo", "dpo"))


def checkpoints(cfg: RunConfig) -> list[tuple[str, str]]:
    """(name, model ref) pairs: ``evaluate.checkpoints`` entries ``name=ref``, or the defaults
    (the initial helpful model, then SL-CAI, RL-CAI and DPO where their directories exist)."""
    ev = cfg.evaluate
    if ev.checkpoints:
        out = []
        for entry in ev.checkpoints:
            name, sep, ref = entry.partition("=")
            if not sep or not name.strip() or not ref.strip():
                raise UserError(f"evaluate.checkpoints: expected name=model, got '{entry}'")
            out.append((name.strip(), ref.strip()))
        return out
    found = []
    for name, sub in DEFAULT_STAGES:
        if sub is None:
            found.append((name, cfg.model))
        elif (cfg.run_path / sub / "config.json").is_file():
            found.append((name, str(cfg.run_path / sub)))
    return found


def _used_ids(run_dir: Path) -> set[str]:
    """Ids of every prompt a training stage has seen (revise, label/preferences)."""
    used: set[str] = set()
    for name in ("revisions.jsonl", "helpful.jsonl", "labels.jsonl"):
        path = run_dir / name
        if path.exists():
            for _, rec in read_jsonl(path):
                for key in ("id", "prompt_id"):
                    if key in rec:
                        used.add(str(rec[key]))
    return used


def held_out(cfg: RunConfig) -> tuple[list[PromptItem], list[PromptItem]]:
    """Red-team and helpfulness prompts no training stage used; the split is written to disk."""
    ev, rev = cfg.evaluate, cfg.revise
    used = _used_ids(cfg.run_path)
    harmful_src = ev.harmful_prompts or rev.prompts
    helpful_src = ev.helpful_prompts or rev.helpful_prompts
    harmful = [
        p
        for p in load_prompts(
            harmful_src, column=rev.prompt_column, first_turn_only=True, seed=cfg.seed + 1
        )
        if p.id not in used
    ][: ev.n_harmful]
    helpful: list[PromptItem] = []
    if helpful_src and ev.n_helpful > 0:
        pool = load_prompts(helpful_src, seed=cfg.seed + 1)
        helpful = [p for p in pool if p.id not in used][: ev.n_helpful]
    if not harmful:
        raise UserError(f"evaluate: no held-out red-team prompts left in {harmful_src}")
    atomic_write_json(
        cfg.run_path / "eval" / "split.json",
        {
            "excluded_training_ids": len(used),
            "harmful": {"source": harmful_src, "ids": [p.id for p in harmful]},
            "helpful": {"source": helpful_src, "ids": [p.id for p in helpful]},
        },
    )
    return harmful, helpful


def _free() -> None:
    gc.collect()


def answer_all(
    cfg: RunConfig, ckpts: list[tuple[str, str]], prompts: list[PromptItem]
) -> dict[tuple[str, str], str]:
    """Greedy answers of every checkpoint to every prompt (resumable)."""
    from rlaif.backends import make_lm

    store = JsonlStore(cfg.run_path / "eval" / "answers.jsonl")
    params = GenerationParams(max_new_tokens=cfg.evaluate.max_new_tokens, temperature=0.0)
    for name, ref in ckpts:
        todo = [p for p in prompts if record_id(name, ref, p.id) not in store]
        if not todo:
            continue
        log.info("evaluate: %s answers %d prompts", name, len(todo))
        lm = make_lm(ref, cfg.backend)
        step = max(1, cfg.backend.max_batch_size)
        for k in range(0, len(todo), step):
            chunk = todo[k : k + step]
            outs = lm.generate([p.messages for p in chunk], params)
            store.append(
                {"id": record_id(name, ref, p.id), "model": name, "prompt_id": p.id, "text": g.text}
                for p, g in zip(chunk, outs, strict=True)
            )
        del lm
        _free()
    return {
        (name, p.id): store.get(record_id(name, ref, p.id))["text"]  # type: ignore[index]
        for name, ref in ckpts
        for p in prompts
    }


class Judge:
    """The AI judge, loaded on first use and shared by the comparisons and the agreement check."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.ref = cfg.evaluate.judge or cfg.feedback_model_ref
        self._lm: Any = None

    @property
    def lm(self) -> Any:
        if self._lm is None:
            from rlaif.backends import make_lm

            self._lm = make_lm(self.ref, self.cfg.backend)
        return self._lm

    def labeler(self) -> Any:
        from rlaif.labeler import Labeler

        per_pair = self.cfg.backend.kind == "hf"
        return Labeler.from_config(
            self.lm, replace(self.cfg.label, cot=False), self.cfg.seed, per_pair
        )

    def close(self) -> None:
        self._lm = None
        _free()


def judge_all(
    cfg: RunConfig,
    judge: Judge,
    names: list[str],
    groups: dict[str, list[PromptItem]],
    answers: dict[tuple[str, str], str],
) -> dict[str, list[Comparison]]:
    """AI-judge every pair of checkpoints on every prompt, both orders; resumable."""
    from rlaif.labeler import Comparison as Pair

    ev = cfg.evaluate
    store = JsonlStore(cfg.run_path / "eval" / "judgments.jsonl")
    principle = {"harmlessness": ev.harmless_principle, "helpfulness": ev.helpful_principle}
    jobs: list[tuple[str, str, int, int, str, Any]] = []
    for kind, prompts in groups.items():
        for p in prompts:
            for i, j in itertools.combinations(range(len(names)), 2):
                key = record_id(kind, judge.ref, principle[kind], p.id, names[i], names[j])
                pair = Pair(
                    prompt=p.messages,
                    first=answers[(names[i], p.id)],
                    second=answers[(names[j], p.id)],
                    principles=((kind, principle[kind]),),
                )
                jobs.append((key, kind, i, j, p.id, pair))
    todo = [job for job in jobs if job[0] not in store]
    if todo:
        from rlaif.progress import progress

        labeler = judge.labeler()
        step = max(1, cfg.label.batch_pairs)
        with progress(total=len(todo), desc="evaluate: judging", unit="pair") as bar:
            for k in range(0, len(todo), step):
                chunk = todo[k : k + step]
                res = labeler.compare([c[5] for c in chunk], [(0, 1)] * len(chunk))
                store.append(
                    {"id": key, "kind": kind, "i": names[i], "j": names[j], "prompt_id": pid, **r}
                    for (key, kind, i, j, pid, _), r in zip(chunk, res, strict=True)
                )
                bar.update(len(chunk))
    out: dict[str, list[Comparison]] = {kind: [] for kind in groups}
    for key, kind, i, j, pid, _ in jobs:
        rec = store.get(key)
        assert rec is not None
        out[kind].append(Comparison(i, j, float(rec["p"]), pid))
    return out


def pm_comparisons(
    cfg: RunConfig, names: list[str], prompts: list[PromptItem], answers: dict[tuple[str, str], str]
) -> list[Comparison] | None:
    """Pairwise outcomes from the preference model: sigmoid of the score difference."""
    pm_dir = cfg.run_path / "pm"
    if not cfg.evaluate.pm_judge or not pm_dir.is_dir():
        return None
    from rlaif.pm import load_pm

    pm = load_pm(pm_dir)
    convs = [
        [*p.messages, {"role": "assistant", "content": answers[(n, p.id)]}]
        for p in prompts
        for n in names
    ]
    scores = pm.score(convs)
    del pm
    _free()
    out = []
    for k, p in enumerate(prompts):
        row = scores[k * len(names) : (k + 1) * len(names)]
        for i, j in itertools.combinations(range(len(names)), 2):
            out.append(Comparison(i, j, 1.0 / (1.0 + math.exp(row[j] - row[i])), p.id))
    return out


def _labeler_agreement(cfg: RunConfig, judge: Judge) -> dict[str, Any] | None:
    """The judge's agreement with human harmlessness labels (as `rlaif eval-labeler`, dual order)."""
    ev = cfg.evaluate
    if ev.labeler_pairs <= 0:
        return None
    from rlaif.data.preferences import load_preferences
    from rlaif.stages.eval_labeler import evaluate as eval_labeler

    prefs = load_preferences(ev.labeler_file, limit=ev.labeler_pairs)
    res = eval_labeler(judge.lm, cfg, prefs, ("single", "dual"), injection=False)
    keep = ("n", "acc_single", "acc_dual", "ece_dual", "order_flip", "mean_pa", "probs_dual")
    out = {k: res[k] for k in keep if k in res}
    if "probs_dual" in out:
        out["probs"] = out.pop("probs_dual")
    return out


def _pm_accuracy(cfg: RunConfig) -> dict[str, Any]:
    pm_dir = cfg.run_path / "pm"
    if not cfg.evaluate.preference_files or not pm_dir.is_dir():
        return {}
    from rlaif.stages.reward_eval import evaluate_pm

    out = {}
    for f in cfg.evaluate.preference_files:
        out[Path(f).name] = evaluate_pm(pm_dir, f, limit=cfg.evaluate.preference_limit)
    return out


def run(cfg: RunConfig) -> Path:
    """Answer held-out prompts with every checkpoint, judge, fit Elo, write ``report.md``."""
    ev = cfg.evaluate
    ckpts = checkpoints(cfg)
    if len(ckpts) < 2:
        raise UserError(
            f"evaluate: need at least two checkpoints, found {[n for n, _ in ckpts]} "
            f"(run the training stages first, or set evaluate.checkpoints=[name=model, ...])"
        )
    names = [n for n, _ in ckpts]
    ensure_dir(cfg.run_path / "eval")
    harmful, helpful = held_out(cfg)
    answers = answer_all(cfg, ckpts, harmful + helpful)
    groups = {"harmlessness": harmful, "helpfulness": helpful}
    groups = {k: v for k, v in groups.items() if v}
    judge = Judge(cfg)
    judged = judge_all(cfg, judge, names, groups, answers)
    labeler_agreement = _labeler_agreement(cfg, judge)
    judge.close()
    tables = {
        kind: elo_table(names, comps, bootstrap=ev.bootstrap, seed=cfg.seed).__dict__
        for kind, comps in judged.items()
    }
    pm_comps = pm_comparisons(cfg, names, harmful + helpful, answers)
    if pm_comps:
        tables["preference model"] = elo_table(
            names, pm_comps, bootstrap=ev.bootstrap, seed=cfg.seed
        ).__dict__
    per_model = {
        n: {
            "evasive": evasive_rate([answers[(n, p.id)] for p in harmful]),
            "words": sum(len(answers[(n, p.id)].split()) for p in harmful) / len(harmful),
        }
        for n in names
    }
    shown = [("harmful", p) for p in harmful[: ev.transcripts]]
    shown += [("helpful", p) for p in helpful[: max(0, ev.transcripts - 1)]]
    results: dict[str, Any] = {
        "judge": ev.judge or cfg.feedback_model_ref,
        "checkpoints": [{"name": n, "ref": r} for n, r in ckpts],
        "n_harmful": len(harmful),
        "n_helpful": len(helpful),
        "elo": tables,
        "per_model": per_model,
        "labeler": labeler_agreement,
        "pm_accuracy": _pm_accuracy(cfg),
        "transcripts": [
            {
                "kind": kind,
                "prompt": p.messages[-1]["content"],
                "answers": {n: answers[(n, p.id)] for n in names},
            }
            for kind, p in shown
        ],
        "notes": [
            "- *evasive*: share of red-team answers that refuse without giving a reason or an "
            "alternative (a phrase heuristic, `rlaif.evasive`); *words*: mean answer length.",
            "- A judge that prefers one answer position or a style (e.g. always the shorter answer) "
            "moves Elo as much as real quality does: read the tables beside the judge's agreement "
            "with humans below.",
        ],
    }
    atomic_write_json(cfg.run_path / "eval" / "results.json", results)
    report = write_report(cfg.run_path, results)
    write_manifest(
        cfg.run_path / "manifests" / "evaluate.json",
        stage="evaluate",
        config={"evaluate": to_dict(ev), "checkpoints": ckpts},
        inputs=hash_inputs({n: r for n, r in ckpts if Path(r).exists()}),
    )
    return report
