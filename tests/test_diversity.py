"""The diversity-aware top-k (tune/diversity.py) on real CamVid trainings at 64 px, laid out as a
search's trial directories: what is kept, what is scored, what the k-fold is handed.

The space searches the trainer's seed too. Two seeds of one config train 3 epochs each
(seconds on one core), a third trial is a copy of the best (the near-copy the plain top-k
hands on twice), a fourth was stopped by ASHA after one epoch. The search's own outputs (real
Ray and MLflow) are checked in tests/test_search.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, write_camvid_subset
from training.config import load_space
from training.data.dataset import prepare_data
from training.engine import checkpoint
from training.engine.trainer import Trainer, train
from training.evaluation.metrics import ConfusionMatrix
from training.handoff import BEST_CONFIGS, BestConfigs
from training.stages.kfold.plan import KFoldOptions, build_candidates
from tune import diversity
from tune.results import COMPLETED, STOPPED_BY_ASHA, TrialRecord, best_configs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
QUIET = dict(log=lambda _: None)
PARAMS = {  # searched keys of the space below
    "seed1": {"loss.weights.ce": 0.3, "trainer.seed": 1},
    "seed0": {"loss.weights.ce": 0.3, "trainer.seed": 0},
    "stopped": {"optimizer.lr": 1e-4},
}


def space_for(root: Path, **overrides):
    return load_space(root / "space.yaml", smoke=True, overrides={"data.root": str(root), "trainer.epochs": 3, "trainer.overlays": 0, **overrides})


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    """(root, data root, data, {trial id: TrialRecord}) of trials laid out as Tune keeps them: trial_<id>/checkpoint_<n>/."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diversity")
    data_root = write_camvid_subset(root / "camvid32", n_train=32)
    raw = yaml.safe_load((REPO / "search_spaces" / "deeplab.yaml").read_text())
    raw["trainer"]["seed"] = {"choice": [0, 1, 2], "default": 0}
    (data_root / "space.yaml").write_text(yaml.safe_dump(raw))
    space = space_for(data_root)
    data = prepare_data(space.defaults, **QUIET)
    records = {}
    for trial_id, params in PARAMS.items():
        epochs = 1 if trial_id == "stopped" else 3  # ASHA stopped it at its first rung
        cfg = space_for(data_root, **{"trainer.epochs": epochs}).resolve(params)
        run_dir = root / "tune" / f"trial_{trial_id}" / "checkpoint_000001"
        result = train(cfg, data, 0, run_dir, keep_val_proba=True, **QUIET)
        shutil.copytree(run_dir, run_dir.parent / "checkpoint_000000")  # an older kept checkpoint
        status = STOPPED_BY_ASHA if trial_id == "stopped" else COMPLETED
        records[trial_id] = TrialRecord(trial_id, status, result.best_miou, result.best_epoch, result.epochs_trained, params, str(run_dir / "best.pt"))
    # a trial that ended with the same model as the best one: what ranking one by one hands on twice
    best = max(("seed0", "seed1"), key=lambda t: records[t].best_val_miou)
    shutil.copytree(root / "tune" / f"trial_{best}", root / "tune" / "trial_copy")
    records["copy"] = TrialRecord("copy", COMPLETED, records[best].best_val_miou, records[best].best_epoch, 3, PARAMS[best],
                                  str(root / "tune" / "trial_copy" / "checkpoint_000001" / "best.pt"))
    torch.set_num_threads(threads)
    yield root, data_root, data, records


def ranked(records: dict[str, TrialRecord]) -> list[TrialRecord]:
    return sorted(records.values(), key=lambda r: (-r.best_val_miou, r.trial_id))


def ensemble_miou(records: dict[str, TrialRecord], trial_ids: list[str], num_classes: int) -> float:
    """Recomputed from the stored files: sum of the members' probabilities, argmax, mIoU."""
    stems = [Path(records[t].checkpoint).parent / "val" for t in trial_ids]
    total = sum(np.load(f"{s}_proba.npy").astype(np.float64) for s in stems)
    cm = ConfusionMatrix(num_classes)
    cm.update(torch.from_numpy(total.argmax(1)), torch.from_numpy(np.load(f"{stems[0]}_target.npy").astype(np.int64)))
    return cm.scores().miou


def test_trainer_keeps_the_best_epochs_validation_probabilities(trials, tmp_path):
    root, data_root, data, records = trials
    for trial_id in ("seed0", "seed1"):
        run_dir = Path(records[trial_id].checkpoint).parent
        proba, ids, target = (np.load(run_dir / f"val_{name}.npy") for name in ("proba", "ids", "target"))
        assert proba.dtype == np.uint8 and target.dtype == np.uint8
        assert proba.shape == (len(ids), len(data.classes), 64, 64) and target.shape == (len(ids), 64, 64) and len(ids) >= 5
        # the best epoch's: best.pt predicts them again (quantised softmax at the score size)
        cfg = space_for(data_root).resolve(records[trial_id].params)
        trainer = Trainer(cfg, data, 0, tmp_path / trial_id, keep_val_proba=True, **QUIET)
        trainer.model.load_state_dict(checkpoint.load(run_dir / checkpoint.BEST)["model"])
        trainer.evaluate()
        again = np.concatenate(trainer.val_proba[1])
        assert trainer.val_proba[0] == ids.tolist() and np.abs(again.astype(int) - proba).max() <= 1
        assert abs(proba.astype(int).sum(1) - 255).max() <= len(data.classes)  # probabilities, 1/255 steps
    # not asked for (train.py, the k-fold): nothing kept
    plain = Trainer(cfg, data, 0, tmp_path / "plain", **QUIET)
    plain.evaluate()
    assert plain.val_proba is None


def test_selection_scores_both_lists_and_hands_off_the_better(trials):
    root, data_root, data, records = trials
    board = ranked(records)
    selection = diversity.select_top_k(board, space_for(data_root, **{"search.top_k": 2}), log=lambda _: None)
    doc = selection.doc
    # ASHA-stopped trials and older checkpoints lose their probabilities; the latest of a completed trial keeps them
    assert not list((root / "tune" / "trial_stopped").glob("checkpoint_*/val_*.npy"))
    for trial_id in ("seed0", "seed1", "copy"):
        assert [p.parent.name for p in (root / "tune" / f"trial_{trial_id}").glob("checkpoint_*/val_proba.npy")] == ["checkpoint_000001"]
    assert set(doc.candidates) == {"seed0", "seed1", "copy"} and doc.candidates == [r.trial_id for r in board if r.trial_id != "stopped"]
    # the plain top-2 is the near-copy pair; the greedy selection starts from the best single trial on the fold
    num_classes = len(data.classes)
    assert sorted(doc.individual.trials) == sorted(doc.candidates[:2]) and "copy" in doc.individual.trials
    assert [s["add"] for s in doc.diverse.steps] == doc.diverse.trials and len(set(doc.diverse.trials)) == 2  # without replacement
    singles = {t: ensemble_miou(records, [t], num_classes) for t in doc.candidates}
    assert doc.diverse.steps[0]["fold_miou"] == pytest.approx(max(singles.values()), abs=1e-9)
    for entry in (doc.individual, doc.diverse):
        assert entry.fold_miou == pytest.approx(ensemble_miou(records, entry.trials, num_classes), abs=1e-9)
    best_pair = max((ensemble_miou(records, [doc.diverse.trials[0], t], num_classes), t) for t in doc.candidates if t != doc.diverse.trials[0])
    assert doc.diverse.fold_miou == pytest.approx(best_pair[0], abs=1e-9)
    # auto: the higher ensemble; the near-copy pair scores what one model does, the other seed adds to it
    assert doc.diverse.fold_miou > doc.individual.fold_miou, selection.table()
    assert "seed0" in doc.diverse.trials and "seed0" not in doc.individual.trials
    assert doc.method == "diverse" and doc.asked == "auto" and [r.trial_id for r in selection.chosen] == doc.diverse.trials
    assert selection.metrics() == {"topk_individual_fold_miou": doc.individual.fold_miou, "topk_diverse_fold_miou": doc.diverse.fold_miou}
    table = selection.table().splitlines()
    assert table[1].split()[:2] == ["individual", f"{doc.individual.fold_miou:.4f}"] and table[2].split()[:2] == ["diverse", f"{doc.diverse.fold_miou:.4f}"]
    assert "<- handed off" in table[2] and "<- handed off" not in table[1]


def test_forced_method_is_kept_and_a_better_fold_score_reported(trials, tmp_path):
    _, data_root, data, records = trials
    board = ranked(records)
    space = space_for(data_root, **{"search.top_k": 2, "search.top_k_method": "individual"})
    lines = []
    selection = diversity.select_top_k(board, space, log=lines.append)
    doc = selection.doc
    assert doc.method == "individual" and [r.trial_id for r in selection.chosen] == doc.individual.trials == doc.candidates[:2]
    note = (f"--top-k-method individual: diverse scores {doc.diverse.fold_miou:.4f} vs {doc.individual.fold_miou:.4f} on fold 0; "
            "keeping individual as asked")
    assert doc.notes == [note] and note in selection.table().splitlines()
    # best_configs.yaml: the chosen configs in rank order (what the k-fold takes first), both lists recorded
    for method in ("individual", "diverse"):
        space = space_for(data_root, **{"search.top_k": 2, "search.top_k_method": method})
        selection = diversity.select_top_k(board, space, log=lines.append)
        path = best_configs(board, space, selection, experiment="div", space=space.source).write(tmp_path / f"{method}_{BEST_CONFIGS}")
        loaded, cfgs = BestConfigs.load(path)
        assert [c.trial_id for c in loaded.configs] == getattr(selection.doc, method).trials
        assert [c.rank for c in loaded.configs] == [1, 2] and loaded.selection.method == method
        assert loaded.selection.individual == selection.doc.individual and loaded.selection.diverse == selection.doc.diverse
        assert cfgs[1].to_dict() == space.resolve(records[loaded.configs[1].trial_id].params).to_dict()
        got = build_candidates(loaded, cfgs, KFoldOptions(top_k=2), path)
        assert [c.trial_id for c in got] == getattr(selection.doc, method).trials


def test_fewer_completed_trials_than_top_k(trials):
    _, data_root, _, records = trials
    board = ranked(records)
    lines = []
    selection = diversity.select_top_k(board, space_for(data_root, **{"search.top_k": 5}), log=lines.append)
    doc = selection.doc
    assert doc.method == "individual" and doc.chosen_by.startswith("only 3 candidate(s) for top_k 5")
    assert sorted(doc.diverse.trials) == sorted(doc.individual.trials) == sorted(doc.candidates)
    # the trial ASHA stopped has no probabilities (dropped by the previous tests or now): it follows, unscored
    assert [r.trial_id for r in selection.chosen] == doc.candidates + ["stopped"]
    assert doc.notes == ["top-k: only 3 completed trial(s) for search.top_k 5; then 1 more by val_miou (stopped early, outside the fold ensembles)"]
    # no candidate at all (e.g. a search older than the stored probabilities): the plain top-k, said in a line
    old = [TrialRecord(r.trial_id, r.status, r.best_val_miou, r.best_epoch, r.epochs_trained, r.params, None) for r in board]
    selection = diversity.select_top_k(old, space_for(data_root, **{"search.top_k": 2}), log=lines.append)
    assert [r.trial_id for r in selection.chosen] == [r.trial_id for r in board[:2]] and selection.doc.individual is None
    assert selection.table() == "top-k: no completed trial has validation probabilities; handing off the top 2 by val_miou"
    assert json.loads(json.dumps(selection.doc.model_dump(mode="json")))["method"] == "individual"


def test_the_method_comes_from_the_flag_or_the_config(tmp_path, capsys):
    from training.errors import ConfigError
    from tune.runner import SearchOptions, cli_overrides, load_checked_space
    from tune.search import parse_args

    args = parse_args(["--space", "deeplab", "--smoke", "--top-k-method", "diverse"])
    opts = SearchOptions(space=args.space, smoke=True, top_k_method=args.top_k_method)
    assert load_checked_space(opts.space, True, cli_overrides(opts)).defaults.search.top_k_method == "diverse"
    assert load_checked_space("deeplab", True, {}).defaults.search.top_k_method == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--top-k-method", "best"])
    assert "invalid choice: 'best'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="search.top_k_method"):
        load_checked_space("deeplab", True, {"search.top_k_method": "best"})
