"""Diversity-aware top-k: which of the search's configs the k-fold gets.

Ranking trials one by one hands the k-fold near-copies of one config; an ensemble gains from
members that err differently. Every completed trial keeps its best epoch's validation-fold
probabilities (uint8 at the score size, training/engine/checkpoint.VAL_STEM), so at the end
of the search two top-k lists are scored as soft-vote ensembles on that fold:

- individual: the k completed trials with the best search.metric, as before;
- diverse: greedy forward selection of k trials without replacement, each step adding the
  trial that raises the ensemble's fold mIoU most (evaluation/selection.greedy_weights, the
  k-fold's own greedy selection).

search.top_k_method (`--top-k-method`) picks one; `auto` (default) takes whichever ensemble
scores higher on the fold (individual on a tie). Trials that did not complete (ASHA-stopped,
errored, out of time) lose their probabilities here: they are no candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from training.config import SearchSpace
from training.engine.checkpoint import VAL_STEM
from training.handoff import TopKEnsemble, TopKSelection
from tune.results import COMPLETED, TrialRecord

SELECTION_JSON = "topk_selection.json"
VAL_FILES = ("proba", "ids", "target")
Log = Callable[[str], None]


@dataclass
class Selection:
    doc: TopKSelection  # what best_configs.yaml records
    chosen: list[TrialRecord]  # the hand-off, in rank order

    def metrics(self) -> dict[str, float]:
        return {f"topk_{name}_fold_miou": e.fold_miou for name, e in (("individual", self.doc.individual), ("diverse", self.doc.diverse)) if e}

    def table(self) -> str:
        doc = self.doc
        if doc.individual is None:
            return "\n".join(doc.notes)
        lines = [f"top-{len(doc.individual.trials)} for the k-fold, scored as soft-vote ensembles on fold {doc.fold} "
                 f"(validation probabilities of {len(doc.candidates)} completed trials):"]
        both = (("individual", doc.individual, "best val score each"), ("diverse", doc.diverse, "greedy forward selection"))
        width = max(len(" ".join(entry.trials)) for _, entry, _ in both)
        for name, entry, how in both:
            mark = f"  <- handed off: {doc.chosen_by}" if name == doc.method else ""
            lines.append(f"  {name:<10}  {entry.fold_miou:.4f}  {' '.join(entry.trials):<{width}}  {how}{mark}")
        return "\n".join(lines + doc.notes)


def val_stem(record: TrialRecord) -> Path | None:
    """Where a trial's validation probabilities are (next to its best.pt), if it has a local checkpoint."""
    if not record.checkpoint or "://" in record.checkpoint:
        return None
    return Path(record.checkpoint).parent / VAL_STEM


def drop_unused_probabilities(records: list[TrialRecord]) -> int:
    """Delete the validation probabilities that can be no candidate: every checkpoint's of a finished trial that did
    not complete (ASHA-stopped, errored, out of time), the older checkpoints' of one that did. Returns bytes freed."""
    freed = 0
    for r in records:
        stem = val_stem(r)
        if stem is None or not r.finished:
            continue
        keep = stem.parent if r.status == COMPLETED else None
        for name in VAL_FILES:
            for path in stem.parent.parent.glob(f"checkpoint_*/{VAL_STEM}_{name}.npy"):
                if path.parent != keep:
                    freed += path.stat().st_size
                    path.unlink()
    return freed


def load_candidates(records: list[TrialRecord], log: Log) -> tuple[list[TrialRecord], list[Any]]:
    """Completed trials (in rank order) with readable validation probabilities of the same images, and those."""
    from training.evaluation.selection import OOFFold

    candidates, runs = [], []
    for r in records:
        stem = val_stem(r)
        if r.status != COMPLETED or stem is None or not Path(f"{stem}_proba.npy").is_file():
            continue
        try:
            run = OOFFold.load(stem)
        except (OSError, ValueError) as err:
            log(f"top-k: trial {r.trial_id}: unreadable validation probabilities {stem}_proba.npy ({err}); not a candidate")
            continue
        if runs and (run.image_ids != runs[0].image_ids or run.proba.shape != runs[0].proba.shape):
            log(f"top-k: trial {r.trial_id}: its validation probabilities are of other images than trial {candidates[0].trial_id}'s; not a candidate")
            continue
        candidates.append(r)
        runs.append(run)
    return candidates, runs


def score_both(candidates: list[TrialRecord], runs: list[Any], k: int, ignore_index: int | None) -> tuple[TopKEnsemble, TopKEnsemble]:
    """(individual, diverse) top-k ensembles of the candidates with their fold mIoU (soft vote)."""
    from training.evaluation.metrics import SegScores
    from training.evaluation.selection import OOFFold, ensemble_matrix, greedy_weights

    fold, take = OOFFold.stack(runs), min(k, len(candidates))
    num_classes = fold.proba.shape[2]
    plain = ensemble_matrix([fold], [int(i < take) for i in range(len(runs))], "soft", num_classes, ignore_index)
    individual = TopKEnsemble(trials=[r.trial_id for r in candidates[:take]], fold_miou=float(SegScores.from_matrix(plain).miou))
    _, _, steps = greedy_weights([fold], "soft", num_classes, ignore_index, max_steps=take, replacement=False)
    diverse = TopKEnsemble(trials=[candidates[s["add"]].trial_id for s in steps], fold_miou=steps[-1]["miou"],
                           steps=[{"add": candidates[s["add"]].trial_id, "fold_miou": s["miou"]} for s in steps])
    return individual, diverse


def choose(asked: str, individual: TopKEnsemble, diverse: TopKEnsemble, n_candidates: int, k: int, fold: int) -> tuple[str, str, list[str]]:
    """(method, why, notes): the one asked for, or under `auto` the higher fold ensemble mIoU (individual on a tie)."""
    if n_candidates <= k:
        method = "individual" if asked == "auto" else asked
        return method, f"only {n_candidates} candidate(s) for top_k {k}: nothing to choose", []
    scores = {"individual": individual.fold_miou, "diverse": diverse.fold_miou}
    better = "diverse" if scores["diverse"] > scores["individual"] else "individual"
    if asked == "auto":
        return better, "auto, higher on the fold" if better == "diverse" else "auto, diverse is not higher on the fold", []
    notes = []
    if better != asked:
        notes.append(f"--top-k-method {asked}: {better} scores {scores[better]:.4f} vs {scores[asked]:.4f} on fold {fold}; keeping {asked} as asked")
    return asked, "as asked (search.top_k_method)", notes


def select_top_k(records: list[TrialRecord], space: SearchSpace, log: Log) -> Selection | None:
    """The configs to hand the k-fold (None: no usable trial), both top-k lists scored; probabilities no
    candidate needs are deleted first."""
    cfg = space.defaults
    k, asked, fold = cfg.search.top_k, cfg.search.top_k_method, cfg.search.fold
    usable = [r for r in records if r.usable]
    if not usable:
        return None
    freed = drop_unused_probabilities(records)
    if freed:
        log(f"removed the validation probabilities of trials that did not complete: {freed / 1e6:.1f} MB freed")
    candidates, runs = load_candidates(records, log)
    if not candidates:
        note = f"top-k: no completed trial has validation probabilities; handing off the top {k} by {cfg.search.metric}"
        return Selection(TopKSelection(method="individual", asked=asked, chosen_by="no candidates", fold=fold, notes=[note]), usable[:k])
    individual, diverse = score_both(candidates, runs, k, cfg.loss.ignore_index)
    method, chosen_by, notes = choose(asked, individual, diverse, len(candidates), k, fold)
    by_id = {r.trial_id: r for r in candidates}
    chosen = [by_id[t] for t in (diverse if method == "diverse" else individual).trials]
    if len(chosen) < k:
        more = [r for r in usable if r.trial_id not in by_id][: k - len(chosen)]
        notes.append(f"top-k: only {len(candidates)} completed trial(s) for search.top_k {k}"
                     + (f"; then {len(more)} more by {cfg.search.metric} (stopped early, outside the fold ensembles)" if more else ""))
        chosen += more
    doc = TopKSelection(method=method, asked=asked, chosen_by=chosen_by, fold=fold, candidates=[r.trial_id for r in candidates],
                        individual=individual, diverse=diverse, notes=notes)
    return Selection(doc, chosen)


def log_selection(tracker: Any, parent: str, selection: Selection) -> None:
    """Both fold ensemble mIoUs as parent-run metrics, the whole selection as a JSON artifact."""
    if selection.metrics():
        tracker.log_metrics(parent, selection.metrics())
    tracker.set_tags(parent, {"segtune.top_k_method": selection.doc.method})
    tracker.log_text(parent, json.dumps(selection.doc.model_dump(mode="json"), indent=1), SELECTION_JSON)
