"""Stage 3, ``rlaif label``: AI-feedback preference labels (RL-CAI's harmlessness data).

1. The policy (the SL-CAI model at ``run_dir/sft`` by default) samples two answers per red-team
   prompt, seeded; answers go to ``run_dir/label_answers.jsonl`` as they are made.
2. The feedback model (``feedback_model``, by default the helpful model) labels each pair: the
   paper's multiple-choice form in both orders and under K principles (or chain of thought, or
   pointwise scoring); one record per prompt is appended to ``run_dir/labels.jsonl``.
3. ``run_dir/preferences.jsonl`` = the AI-labelled pairs (chosen = the answer the labeller
   prefers, ``p_chosen`` >= 0.5) mixed with human helpfulness comparisons.

Both JSONL files are append-only stores, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from rlaif.backends import make_lm
from rlaif.backends.base import GenerationParams
from rlaif.config import RunConfig
from rlaif.configspec import to_dict
from rlaif.data.preferences import Preference, load_preferences, make_preference, write_preferences
from rlaif.data.prompts import PromptItem, load_prompts
from rlaif.errors import UserError
from rlaif.labeler import Comparison, Labeler, draw_principles, seeded_order
from rlaif.manifest import fingerprint, hash_inputs, write_manifest
from rlaif.store import JsonlStore, atomic_write_json

log = logging.getLogger(__name__)

LABELS = "labels.jsonl"
ANSWERS = "label_answers.jsonl"
PREFERENCES = "preferences.jsonl"
MANIFEST = "manifests/label.json"
SETTINGS = "label_settings.json"


def policy_ref(cfg: RunConfig) -> str:
    """The model that samples the answers: ``label.policy`` or the SL-CAI model at run_dir/sft."""
    if cfg.label.policy:
        return cfg.label.policy
    sft = cfg.run_path / "sft"
    if not (sft / "config.json").is_file():
        raise UserError(
            f"label.policy: '' means the SL-CAI model at {sft}, which does not exist "
            "(run `rlaif sft` first, or set label.policy to a model)"
        )
    return str(sft)


def select_prompts(cfg: RunConfig) -> list[PromptItem]:
    """revise's prompt source and settings, shuffled by the run seed, then label.skip/limit."""
    lab, rev = cfg.label, cfg.revise
    items = load_prompts(
        lab.prompts or rev.prompts,
        column=rev.prompt_column,
        first_turn_only=rev.first_turn_only,
        shuffle=rev.shuffle,
        seed=cfg.seed,
    )
    if lab.skip < 0 or lab.limit < 0:
        raise UserError("label.skip and label.limit must be >= 0")
    items = items[lab.skip :]
    if lab.limit:
        items = items[: lab.limit]
    if not items:
        raise UserError(f"label.skip={lab.skip}: no prompts left in {lab.prompts or rev.prompts}")
    return items


def _settings(cfg: RunConfig, policy: str) -> dict[str, Any]:
    """What the records depend on: a rerun with other settings must not mix with old records."""
    lab = to_dict(cfg.label)
    for key in (
        "limit",
        "skip",
        "batch_pairs",
        "helpful_pairs",
        "helpful_ratio",
        "helpful_max_per_question",
    ):
        lab.pop(key)
    return {
        "label": lab,
        "seed": cfg.seed,
        "policy": policy,
        "feedback": cfg.feedback_model_ref,
        "constitution": cfg.constitution,
    }


def _check_settings(cfg: RunConfig, settings: dict[str, Any]) -> None:
    """Refuse to extend records made with other settings; remember these settings otherwise."""
    path = cfg.run_path / SETTINGS
    mark = fingerprint(settings, {})
    stored = [cfg.run_path / LABELS, cfg.run_path / ANSWERS]
    if path.exists() and any(f.exists() for f in stored):
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, json.JSONDecodeError, AttributeError):
            old = None
        if old != mark:
            raise UserError(
                f"{stored[0]}: made with other label settings (see {path}); use another "
                f"run_dir or delete {LABELS}, {ANSWERS} and {SETTINGS}"
            )
    atomic_write_json(path, {"fingerprint": mark, "settings": settings})


def sample_answers(cfg: RunConfig, items: list[PromptItem], policy: str) -> dict[str, list[str]]:
    """Two answers per prompt from the policy (two seeded passes), stored as they come.

    Chunks and their sampling seeds follow the full prompt order, not the order of what is left
    to do, so a run resumed after a kill samples the same answers as an uninterrupted one.
    """
    store = JsonlStore(cfg.run_path / ANSWERS)
    if any(it.id not in store for it in items):
        lab = cfg.label
        lm = make_lm(policy, cfg.backend)
        chunk = max(1, lab.batch_pairs)
        for start in range(0, len(items), chunk):
            part = [it for it in items[start : start + chunk] if it.id not in store]
            if not part:
                continue
            convs = [it.messages for it in part]
            runs = []
            for k in (0, 1):
                params = GenerationParams(
                    max_new_tokens=lab.max_new_tokens,
                    temperature=lab.temperature,
                    top_p=lab.top_p,
                    stop=("\nHuman:", "\nUser:"),
                    seed=cfg.seed * 1000 + 2 * start + k,
                )
                runs.append([g.text.strip() for g in lm.generate(convs, params)])
            store.append(
                {"id": it.id, "answers": [runs[0][i], runs[1][i]]} for i, it in enumerate(part)
            )
        del lm
        gc.collect()
    return {it.id: list(store.get(it.id)["answers"]) for it in items}  # type: ignore[index]


def label_pairs(
    cfg: RunConfig, items: list[PromptItem], answers: dict[str, list[str]], policy: str
) -> list[dict[str, Any]]:
    """Label every prompt's pair with the feedback model; records appended to labels.jsonl."""
    from rlaif.constitution import load_constitution
    from rlaif.progress import progress

    lab = cfg.label
    store = JsonlStore(cfg.run_path / LABELS)
    todo = [it for it in items if it.id not in store]
    if todo:
        cons = load_constitution(cfg.constitution)
        principles = [(p.id, p.feedback) for p in cons.principles]
        feedback_ref = cfg.feedback_model_ref
        lm = make_lm(feedback_ref, cfg.backend)
        labeler = Labeler.from_config(lm, lab, cfg.seed, per_pair_calls=cfg.backend.kind == "hf")
        bar = progress(total=len(todo), desc="label", unit="pair")
        done_q, t0 = 0, time.perf_counter()
        for start in range(0, len(todo), max(1, lab.batch_pairs)):
            part = todo[start : start + max(1, lab.batch_pairs)]
            comps = [
                Comparison(
                    it.messages,
                    answers[it.id][0],
                    answers[it.id][1],
                    draw_principles(principles, lab.principles, cfg.seed, it.id),
                )
                for it in part
            ]
            recs = _label_chunk(labeler, comps, part, cfg)
            done_q += sum(len(r.get("principles", [])) * len(r.get("orders", [])) for r in recs)
            done_q += sum(2 for r in recs if r["mode"] == "pointwise")
            for r in recs:
                r.update(policy=policy, feedback_model=feedback_ref, seed=cfg.seed)
            store.append(recs)
            bar.update(len(part))
            bar.set_postfix(comparisons_s=f"{done_q / (time.perf_counter() - t0):.2f}")
        bar.close()
    return [store.get(it.id) for it in items]  # type: ignore[misc]


def _label_chunk(
    labeler: Labeler, comps: list[Comparison], part: list[PromptItem], cfg: RunConfig
) -> list[dict[str, Any]]:
    lab = cfg.label
    base = [
        {
            "id": it.id,
            "prompt": it.messages,
            "answers": [c.first, c.second],
            "mode": lab.mode,
            "identical": c.first.strip() == c.second.strip(),
        }
        for it, c in zip(part, comps, strict=True)
    ]
    if lab.mode == "pointwise":
        for rec, res in zip(base, labeler.pointwise(comps), strict=True):
            rec.update(res)
        return base
    orders = [(0, 1) if lab.dual_order else (seeded_order(cfg.seed, it.id),) for it in part]
    results = labeler.compare(comps, orders, cot=lab.cot)
    for rec, res, order in zip(base, results, orders, strict=True):
        rec.update(orders=list(order), cot=lab.cot, principles=res["principles"], p=res["p"])
    return base


def mix_preferences(
    cfg: RunConfig, labels: list[dict[str, Any]]
) -> tuple[list[Preference], dict[str, int]]:
    """AI pairs (oriented so p_chosen >= 0.5; identical answers dropped) + human comparisons."""
    ai: list[Preference] = []
    for rec in labels:
        if rec.get("identical") or not rec["answers"][0].strip() or not rec["answers"][1].strip():
            continue
        p = float(rec["p"])
        a, b = rec["answers"]
        chosen, rejected, pc = (a, b, p) if p >= 0.5 else (b, a, 1.0 - p)
        ai.append(make_preference(rec["prompt"], chosen, rejected, pc, "ai:harmless"))
    human = _human_pairs(cfg, round(cfg.label.helpful_ratio * len(ai)))
    rng = random.Random(f"preferences:{cfg.seed}")
    prefs = ai + human
    rng.shuffle(prefs)
    return prefs, {"ai": len(ai), "human": len(human), "dropped": len(labels) - len(ai)}


def _human_pairs(cfg: RunConfig, want: int) -> list[Preference]:
    lab = cfg.label
    if not lab.helpful_pairs or want <= 0:
        return []
    if lab.helpful_ratio < 0:
        raise UserError(f"label.helpful_ratio must be >= 0, got {lab.helpful_ratio}")
    path = Path(lab.helpful_pairs)
    if path.name.lower().endswith((".xml", ".xml.gz", ".7z")) or path.is_dir():
        from rlaif.data.stackexchange import answer_pairs

        raw = answer_pairs(path, max_per_question=lab.helpful_max_per_question, seed=cfg.seed)
        pool = [
            make_preference(
                r["prompt"],
                r["chosen"],
                r["rejected"],
                float(r.get("p_chosen", 1.0)),
                str(r.get("source", "human:stackexchange")),
            )
            for r in raw
        ]
    else:
        pool = load_preferences(path)
    rng = random.Random(f"helpful:{cfg.seed}")
    return rng.sample(pool, min(want, len(pool)))


def run(cfg: RunConfig) -> Path:
    """Run the stage; return the path of preferences.jsonl."""
    run_dir = cfg.run_path
    policy = policy_ref(cfg)
    items = select_prompts(cfg)
    settings = _settings(cfg, policy)
    _check_settings(cfg, settings)
    answers = sample_answers(cfg, items, policy)
    labels = label_pairs(cfg, items, answers, policy)
    prefs, counts = mix_preferences(cfg, labels)
    out = run_dir / PREFERENCES
    write_preferences(out, prefs)
    ps = [float(r["p"]) for r in labels]
    inputs: dict[str, Path | str] = {
        "prompts": cfg.label.prompts or cfg.revise.prompts,
        "policy": policy,
        "feedback_model": cfg.feedback_model_ref,
    }
    if cfg.label.helpful_pairs:
        inputs["helpful_pairs"] = cfg.label.helpful_pairs
    write_manifest(
        run_dir / MANIFEST,
        stage="label",
        config={
            "label": to_dict(cfg.label),
            "seed": cfg.seed,
            "constitution": cfg.constitution,
            "feedback_model": cfg.feedback_model_ref,
            "policy": policy,
        },
        inputs=hash_inputs(inputs),
        extra={
            "counts": {"prompts": len(items), **counts},
            "mean_p_first": sum(ps) / len(ps),
            "outputs": [LABELS, PREFERENCES],
        },
    )
    log.info(
        "label: %d pairs labelled, %d AI + %d human preferences -> %s",
        len(labels),
        counts["ai"],
        counts["human"],
        out,
    )
    return out
