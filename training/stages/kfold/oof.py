"""Every ensemble decision made on out-of-fold evidence: TTA views, vote, members and weights, post-processing.

1. One Ray task per fold scores every (TTA candidate, vote, subset of configs) as confusion
   matrices (evaluation/selection.SubsetScorer): picks the TTA views, the vote and the
   equal-weight subset.
2. One Ray task per fold stores the configs' probabilities under that TTA (uint8, score size);
   on them greedy selection with replacement proposes weights, compared with the equal-weight
   subset, and the post-processing is searched per class.
User flags constrain a choice (--tta views, --vote, --weights, --postprocess); when OOF
prefers something a flag forbade, the decision record says so. Every candidate scored is
recorded (summary.json "decisions").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from training.engine import checkpoint
from training.errors import SegtuneError
from training.evaluation.metrics import SegScores
from training.evaluation.postprocess import PostProcess
from training.evaluation.selection import (OOFFold, SubsetScorer, final_labels, greedy_select, greedy_weights, search_postprocess,
                                           subset_members, tta_candidates)
from training.evaluation.tta import TTA
from training.evaluation.vote import VOTES
from training.infra.fs import atomic_file, fingerprint
from training.infra.progress import progress
from training.infra.ray import error_line
from training.stages.kfold.context import KFoldRun
from training.stages.kfold.plan import AUTO
from training.stages.kfold.tasks import oof_fold_task, oof_proba_task

OOF_DIR = "oof"


@dataclass
class Decisions:
    tta: TTA
    vote: str
    weights: list[int]  # per candidate config; 0 = left out
    postprocess: PostProcess
    scores: SegScores  # the final ensemble's OOF scores
    matrix: np.ndarray
    scorer: SubsetScorer
    record: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # forced choices OOF rejects

    @property
    def members(self) -> list[int]:
        return [i for i, w in enumerate(self.weights) if w > 0]


def fold_checkpoints(run: KFoldRun, k: int) -> list[Path]:
    return [run.kfold_dir / c.key / f"fold{k}" / checkpoint.BEST for c in run.candidates]


def _gather(run: KFoldRun, pending: dict, what: str) -> dict:
    results, errors = {}, []
    for ref in progress(list(pending), what, unit="fold", log=run.log):
        k = pending[ref]
        try:
            results[k] = ray.get(ref)
        except Exception as err:
            errors.append(f"fold {k}: {error_line(err)}")
    if errors:
        raise SegtuneError(f"{what} failed: {'; '.join(errors[:3])}")
    return results


def score_subsets(run: KFoldRun) -> SubsetScorer:
    """Pass 1: the confusion matrices of every (TTA candidate, vote, subset), cached per fold by checkpoints and views."""
    from training.data.dataset import fold_split

    oof_dir = run.kfold_dir / OOF_DIR
    oof_dir.mkdir(parents=True, exist_ok=True)
    modes = [t.name for t in tta_candidates(run.tta)]
    pending, results, keys = {}, {}, {}
    for k in range(run.n_folds):
        keys[k] = fingerprint(fold_checkpoints(run, k), tta=modes, keys=[c.key for c in run.candidates])
        results[k] = read_matrices(oof_dir / f"fold{k}.npz", keys[k])
        if results[k] is None:
            ref = oof_fold_task.options(**run.resources([c.cfg for c in run.candidates])).remote(
                [str(p) for p in fold_checkpoints(run, k)], run.put(run.data), k, run.tta)
            pending[ref] = k
    if pending:
        run.log(f"k-fold: scoring out-of-fold predictions of {len(pending)} fold(s): {len(modes)} TTA candidates within {run.tta.name} "
                f"x {len(VOTES)} votes x {2 ** len(run.candidates) - 1} subsets of configs")
    for k, out in _gather(run, pending, "scoring out-of-fold folds").items():
        with atomic_file(oof_dir / f"fold{k}.npz", "wb") as f:
            np.savez(f, key=np.array(keys[k]), image_ids=np.array(out["image_ids"], dtype=np.int64), matrices=out["matrices"])
        results[k] = out
    scorer = SubsetScorer(len(run.candidates), len(run.data.classes), run.cfg0.loss.ignore_index, modes)
    oof_ids: list[int] = []
    for k in range(run.n_folds):
        scorer.merge(results[k]["matrices"])
        oof_ids += list(results[k]["image_ids"])
        one = SubsetScorer(len(run.candidates), len(run.data.classes), run.cfg0.loss.ignore_index, modes)
        one.merge(results[k]["matrices"])
        for job in (j for j in run.jobs if j.fold == k):
            job.result["fold_oof"] = {m: one.scores(m, "soft", 1 << job.cand.index).miou for m in modes}
    expected = sorted(i for k in range(run.n_folds) for i in fold_split(run.data, k, run.cfg0.data.subset)[1])
    if sorted(oof_ids) != expected or len(set(oof_ids)) != len(oof_ids):
        raise SegtuneError(f"out-of-fold predictions cover {len(set(oof_ids))} images ({len(oof_ids)} predictions) of {len(expected)}")
    run.oof_images = len(oof_ids)
    return scorer


def read_matrices(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    with np.load(path) as npz:
        return {"image_ids": npz["image_ids"].tolist(), "matrices": npz["matrices"]} if str(npz["key"]) == key else None


def store_probabilities(run: KFoldRun, tta: TTA) -> list[OOFFold]:
    """Pass 2: every config's OOF probabilities under the chosen TTA, cached per fold."""
    oof_dir = run.kfold_dir / OOF_DIR
    pending, stems = {}, {}
    for k in range(run.n_folds):
        key = fingerprint(fold_checkpoints(run, k), tta=tta.name, keys=[c.key for c in run.candidates])
        stems[k] = oof_dir / f"fold{k}_{key[:12]}"
        if not Path(f"{stems[k]}_ids.npy").is_file():
            ref = oof_proba_task.options(**run.resources([c.cfg for c in run.candidates])).remote(
                [str(p) for p in fold_checkpoints(run, k)], run.put(run.data), k, tta, str(stems[k]))
            pending[ref] = k
    if pending:
        run.log(f"k-fold: storing out-of-fold probabilities under TTA {tta.name} for weights and post-processing")
    _gather(run, pending, "storing out-of-fold probabilities")
    for stale in oof_dir.glob("fold*_*_*.npy"):  # probabilities of other TTA choices or checkpoints
        if not any(stale.name.startswith(stem.name + "_") for stem in stems.values()):
            stale.unlink(missing_ok=True)
    return [OOFFold.load(stems[k]) for k in range(run.n_folds)]


def _best(table: dict, allowed) -> tuple[Any, float]:
    scored = [(v, key) for key, v in table.items() if key in allowed]
    score, key = max(scored, key=lambda s: s[0])  # max keeps the first of equals: the simpler choice, listed first
    return key, score


def decide(run: KFoldRun) -> Decisions:
    """All choices, each the best allowed by OOF mIoU, with every candidate and runner-up recorded."""
    scorer = score_subsets(run)
    notes: list[str] = []
    tta, vote, mask, record = choose_tta_and_vote(run, scorer, notes)
    folds = store_probabilities(run, tta)
    weights, before = choose_weights(run, scorer, folds, tta.name, vote, mask, record, notes)
    postprocess = choose_postprocess(run, folds, weights, vote, record, notes)
    scores, matrix = write_oof_masks(run, folds, weights, vote, postprocess)
    record["postprocess"].update(oof_miou_before=before, oof_miou_after=scores.miou)
    record["notes"] = notes
    for note in notes:
        run.log(f"k-fold: note: {note}")
    return Decisions(tta, vote, weights, postprocess, scores, matrix, scorer, record, notes)


def choose_tta_and_vote(run: KFoldRun, scorer: SubsetScorer, notes: list[str]) -> tuple[TTA, str, int, dict[str, Any]]:
    """Each (TTA candidate, vote) with its best equal-weight subset of configs (greedy forward selection); the best allowed."""
    options, n, modes = run.options, len(run.candidates), scorer.modes
    keys = [c.key for c in run.candidates]
    table, subsets = {}, {}
    for mode in modes:
        for vote in VOTES:
            mask, steps = greedy_select({s: scorer.scores(mode, vote, s).miou for s in range(1, 2**n)}, n)
            table[(mode, vote)], subsets[(mode, vote)] = steps[-1]["miou"], (mask, steps)
    allowed = [(m, v) for m in modes for v in VOTES if (not options.fixed_tta or m == run.tta.name) and options.vote in (AUTO, v)]
    (mode, vote), score = _best(table, allowed)
    (best_mode, best_vote), best_score = _best(table, table)
    if best_score > score:
        forced = " and ".join(f for f, on in ((f"--fixed-tta (TTA {run.tta.name})", options.fixed_tta), (f"--vote {options.vote}", options.vote != AUTO)) if on)
        notes.append(f"{forced} is kept as asked, but OOF prefers TTA {best_mode} with {best_vote} vote ({best_score:.4f} > {score:.4f})")
    mask, steps = subsets[(mode, vote)]
    per_tta = {m: max(table[(m, v)] for v in VOTES if options.vote in (AUTO, v)) for m in modes}
    record: dict[str, Any] = {
        "tta": {"chosen": mode, "oof_miou": score, "runner_up": _runner_up(sorted(per_tta.items(), key=lambda kv: -kv[1]), mode),
                "candidates": per_tta, "allowed": run.tta.name, "fixed": options.fixed_tta},
        "vote": {"chosen": vote, "candidates": {v: table[(mode, v)] for v in VOTES}, "forced": options.vote != AUTO},
        "tta_vote_table": [{"tta": m, "vote": v, "oof_miou": s, "subset": [keys[i] for i in subset_members(subsets[(m, v)][0])]}
                           for (m, v), s in table.items()],
        "subset_steps": [dict(s, subset=[keys[i] for i in s["subset"]], add=keys[s["add"]]) for s in steps],
    }
    return next(t for t in tta_candidates(run.tta) if t.name == mode), vote, mask, record


def choose_weights(run: KFoldRun, scorer: SubsetScorer, folds: list[OOFFold], mode: str, vote: str, mask: int,
                   record: dict[str, Any], notes: list[str]) -> tuple[list[int], float]:
    """The best equal-weight subset, greedy selection with replacement and (across searches) each search's own
    ensemble, all scored on the stored probabilities; returns (weights, their OOF mIoU)."""
    options, n = run.options, len(run.candidates)
    num_classes, ignore, keys = len(run.data.classes), run.cfg0.loss.ignore_index, [c.key for c in run.candidates]
    candidates = {"equal": [1 if mask >> i & 1 else 0 for i in range(n)]}
    candidates["greedy"], _, greedy_steps = greedy_weights(folds, vote, num_classes, ignore)
    searches = {}
    if len(run.sources) > 1:
        for _, best in run.sources:
            mine = [c.index for c in run.candidates if c.experiment == best.experiment]
            own = max((s for s in range(1, 2**n) if all(i in mine for i in subset_members(s))), key=lambda s: table_score(scorer, mode, vote, s))
            searches[best.experiment] = candidates[f"search:{best.experiment}"] = [1 if own >> i & 1 else 0 for i in range(n)]
    scores = {name: _miou(folds, w, vote, num_classes, ignore) for name, w in candidates.items()}
    method, _ = _best(scores, list(candidates) if options.weights == AUTO else [options.weights])
    best_method, _ = _best(scores, scores)
    if scores[best_method] > scores[method]:
        notes.append(f"--weights {options.weights} is kept as asked, but OOF prefers {best_method} weights "
                     f"({scores[best_method]:.4f} > {scores[method]:.4f})")
    record["weights"] = {"chosen": method, "candidates": scores, **{name: dict(zip(keys, w)) for name, w in candidates.items()},
                         "greedy_steps": [dict(s, add=keys[s["add"]], weights=dict(zip(keys, s["weights"]))) for s in greedy_steps],
                         "per_search": {e: {"oof_miou": scores[f"search:{e}"], "configs": [keys[i] for i, x in enumerate(w) if x]}
                                        for e, w in searches.items()},
                         "forced": options.weights != AUTO}
    return candidates[method], scores[method]


def choose_postprocess(run: KFoldRun, folds: list[OOFFold], weights: list[int], vote: str, record: dict[str, Any], notes: list[str]) -> PostProcess:
    """Per class, the smallest component kept, where OOF improves (searched even with --postprocess none, to report it)."""
    classes = run.data.classes
    found, tried = search_postprocess(folds, weights, vote, len(classes), run.cfg0.loss.ignore_index)
    use = found if run.options.postprocess != "none" else PostProcess()
    if run.options.postprocess == "none" and found.enabled:
        notes.append(f"--postprocess none is kept as asked, but OOF prefers removing small components {found.to_names(classes)}")
    if run.options.postprocess == "min_area" and not found.enabled:
        notes.append("--postprocess min_area: no component size raises the OOF mIoU; nothing is removed")
    record["postprocess"] = {"chosen": use.to_names(classes), "mode": run.options.postprocess,
                             "candidates": [dict(c, class_name=classes[c["class_id"]]) for c in tried]}
    return use


def write_oof_masks(run: KFoldRun, folds: list[OOFFold], weights: list[int], vote: str, postprocess: PostProcess) -> tuple[SegScores, np.ndarray]:
    """The final ensemble's OOF masks (oof_masks/<id>.png), its scores and confusion matrix."""
    import torch

    from training.evaluation.metrics import ConfusionMatrix
    from training.evaluation.submission import save_mask_png

    num_classes = len(run.data.classes)
    cm = ConfusionMatrix(num_classes, run.cfg0.loss.ignore_index)
    for image_id, mask, target in final_labels(folds, weights, vote, postprocess):
        cm.update(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(target.astype(np.int64)))
        save_mask_png(run.kfold_dir / "oof_masks" / f"{image_id}.png", mask)
    matrix = cm.matrix.numpy().astype(np.int64)
    return SegScores.from_matrix(matrix, run.data.classes), matrix


def table_score(scorer: SubsetScorer, mode: str, vote: str, mask: int) -> float:
    return scorer.scores(mode, vote, mask).miou


def _runner_up(ranked: list[tuple[str, float]], chosen: str) -> dict | None:
    others = [(m, s) for m, s in ranked if m != chosen]
    return {"choice": others[0][0], "oof_miou": others[0][1]} if others else None


def _miou(folds, weights, vote, num_classes, ignore) -> float:
    from training.evaluation.selection import ensemble_matrix

    return SegScores.from_matrix(ensemble_matrix(folds, weights, vote, num_classes, ignore)).miou
