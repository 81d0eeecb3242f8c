"""The pseudo-label stage on CamVid (30 annotated + 6 test images, 64 px), real Ray and MLflow.

A module-scoped k-fold (one config, 2 epochs per fold) stands in for "the k-fold finished". The
stage then runs in a subprocess that is killed (SIGKILL) once a fold of round 1 is complete, and
resumed; the tests read what it left on disk and in MLflow. The guarantees the stage rests on
(pseudo images on the training side only, unconfident pixels outside the loss, annotated images
refused) are checked directly on the datasets and the loss.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, write_camvid_subset
from test_reliability import run_to_end
from test_search import search_env, short_tmp, stop_ray_processes, tail

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXPERIMENT = "pseudo-test"
N_TRAIN, N_TEST = 30, 6
IGNORE = 255


def write_best_configs(results: Path, root: Path, uri: str) -> Path:
    """What tune/search.py writes: one config of the deeplab smoke space, 2 epochs."""
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.handoff import BestConfigs

    space = load_space("deeplab", smoke=True, overrides={"data.root": str(root)})
    params = {"model.encoder": "resnet18", "optimizer.lr": 3e-3}
    entry = {"rank": 1, "trial_id": "trial_1", "best_val_miou": 0.1, "best_epoch": 2, "epochs_trained": 2, "checkpoint": None,
             "params": params, "config": space.resolve(params).to_dict()}
    manifest = prepare_data(space.defaults, log=lambda _: None).manifest
    doc = BestConfigs(experiment=EXPERIMENT, space=space.source, smoke=True, data_root=str(root), mlflow_tracking_uri=uri,
                      metric="val_miou", fold=0, fold_manifest=str(manifest.path), configs=[entry])
    path = results / EXPERIMENT / "best_configs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return doc.write(path)


def run_cli(args: list[str], env: dict, log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_to_end([PYTHON, *args], env, log, timeout)


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    """A finished smoke k-fold of one config on 30 CamVid images (5 folds x 2 epochs)."""
    tmp = tmp_path_factory.mktemp("pseudo")
    root = write_camvid_subset(tmp / "camvid", N_TRAIN, N_TEST)
    results, ray_tmp = tmp / "results", short_tmp("pl")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    write_best_configs(results, root, uri)
    env = search_env(results, ray_tmp)
    done = run_cli(["training/final_kfold.py", "--smoke", "--experiment", EXPERIMENT], env, tmp / "kfold.log")
    stop_ray_processes(ray_tmp)
    assert done.returncode == 0, tail(tmp / "kfold.log")
    return SimpleNamespace(tmp=tmp, root=root, results=results, uri=uri, env=env, ray_tmp=ray_tmp, kfold_dir=results / EXPERIMENT / "kfold")


def round_fold_done(fold_dir: Path) -> bool:
    from training.engine import checkpoint

    return checkpoint.status(fold_dir, 2) == checkpoint.DONE


@pytest.fixture(scope="module")
def rounds(kfold):
    """pseudo_label.py killed (SIGKILL) once a fold of round 1 is trained, then resumed to the end."""
    pseudo = kfold.results / EXPERIMENT / "pseudo"
    cmd = [PYTHON, "training/pseudo_label.py", "--experiment", EXPERIMENT, "--rounds", "2", "--smoke", "--min-delta", "0"]
    log1 = kfold.tmp / "pseudo1.log"
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=kfold.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while not any(round_fold_done(d) for d in (pseudo / "round1" / "1").glob("fold*")):
                assert proc.poll() is None, f"the stage ended before a fold of round 1 was trained:\n{tail(log1)}"
                assert time.time() < deadline, f"no fold of round 1 trained within 600 s:\n{tail(log1)}"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            stop_ray_processes(kfold.ray_tmp)
    done_before = {d.name: (d / "best.pt").stat().st_mtime_ns for d in (pseudo / "round1" / "1").glob("fold*") if round_fold_done(d)}
    labels_mtime = (pseudo / "round1" / "pseudo_labels.yaml").stat().st_mtime_ns
    log2 = kfold.tmp / "pseudo2.log"
    resumed = run_cli([*cmd[1:], "--resume"], kfold.env, log2)
    stop_ray_processes(kfold.ray_tmp)
    assert resumed.returncode == 0, tail(log2)
    summary = json.loads((pseudo / "summary.json").read_text())
    return SimpleNamespace(pseudo=pseudo, summary=summary, done_before=done_before, labels_mtime=labels_mtime, log2=log2.read_text())


# ---- the stage end to end ---------------------------------------------------------------------------


def test_every_round_has_its_oof_miou_and_submission(rounds, kfold):
    summary = rounds.summary
    numbers = [r["round"] for r in summary["rounds"]]
    assert numbers[:2] == [0, 1] and numbers == list(range(len(numbers))), numbers
    kfold_summary = json.loads((kfold.kfold_dir / "summary.json").read_text())
    assert summary["rounds"][0]["oof_miou"] == pytest.approx(kfold_summary["ensemble"]["oof_miou"])
    for r in summary["rounds"][1:]:
        round_dir = rounds.pseudo / f"round{r['round']}"
        round_summary = json.loads((round_dir / "summary.json").read_text())
        assert r["oof_miou"] == pytest.approx(round_summary["ensemble"]["oof_miou"])
        assert r["delta"] == pytest.approx(r["oof_miou"] - summary["rounds"][r["compared_with_round"]]["oof_miou"])
        with open(round_dir / "submission.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == N_TEST and all(row["PredictionString"] for row in rows)
        assert 0 < r["labels"]["images"] <= N_TEST and 0 < r["labels"]["confident_share"] <= 1
    kept = [r for r in summary["rounds"] if r["kept"]]
    best = max(kept, key=lambda r: r["oof_miou"])
    assert summary["final"]["round"] == best["round"] and summary["final"]["submission"] == best["submission"]
    # the stopping rule: a round is kept only when it beat the best before it by --min-delta (0 here)
    for r in summary["rounds"][1:]:
        assert r["kept"] == (r["delta"] >= 0)
    if len(numbers) < 3:
        assert not summary["rounds"][-1]["kept"], "stopped before --rounds 2 although round 1 improved"


def test_oof_is_scored_on_the_same_annotated_images_every_round(rounds, kfold):
    """No pseudo-labelled image is ever in a validation fold: each round's OOF covers exactly the k-fold's annotated images."""
    def oof_ids(kfold_dir: Path) -> list[int]:
        return sorted(int(i) for f in (kfold_dir / "oof").glob("fold*_ids.npy") for i in np.load(f))

    reference = oof_ids(kfold.kfold_dir)
    assert len(reference) == N_TRAIN and min(reference) >= 0
    for r in rounds.summary["rounds"][1:]:
        assert oof_ids(rounds.pseudo / f"round{r['round']}") == reference


def test_resume_after_a_kill_retrains_nothing_that_finished(rounds):
    assert rounds.done_before, "the kill came before any fold of round 1 finished"
    for fold, mtime in rounds.done_before.items():
        assert (rounds.pseudo / "round1" / "1" / fold / "best.pt").stat().st_mtime_ns == mtime, fold
    assert (rounds.pseudo / "round1" / "pseudo_labels.yaml").stat().st_mtime_ns == rounds.labels_mtime  # labels not made again
    assert "labels already made" in rounds.log2
    statuses = {f["fold"]: f["status"] for f in json.loads((rounds.pseudo / "round1" / "summary.json").read_text())["configs"][0]["folds"]}
    for fold in rounds.done_before:
        assert statuses[int(fold.removeprefix("fold"))] in ("skipped", "logged"), statuses


def test_each_round_is_an_mlflow_parent_linked_to_the_kfold(rounds, kfold):
    from mlflow.tracking import MlflowClient

    from training.handoff import KFoldResult, PseudoLabelSet

    client = MlflowClient(kfold.uri)
    kfold_parent = KFoldResult.read(kfold.kfold_dir / "kfold_result.yaml").mlflow_parent_run_id
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], "tags.`segtune.role` = 'pseudo_round'")
    by_round = {int(r.data.tags["segtune.pseudo_round"]): r for r in parents}
    assert sorted(by_round) == [r["round"] for r in rounds.summary["rounds"][1:]]
    for number, run in by_round.items():
        assert run.data.tags["segtune.upstream_run_id"] == kfold_parent
        labels = PseudoLabelSet.read(rounds.pseudo / f"round{number}" / "pseudo_labels.yaml")
        assert run.data.metrics["pseudo_confident_share"] == pytest.approx(labels.confident_share)
        assert run.data.metrics["pseudo_share_Road"] == pytest.approx(labels.class_share["Road"])
        assert run.data.metrics["ensemble_oof_miou"] == pytest.approx(rounds.summary["rounds"][number]["oof_miou"])
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`segtune.role` = 'kfold_fold'")
        assert len(children) == 5 and all(c.info.status == "FINISHED" for c in children)


# ---- the guarantees, on the datasets and the loss ----------------------------------------------------


@pytest.fixture(scope="module")
def labelled_set(kfold):
    """A pseudo-label set over the 6 test images: a class per pixel, every third row unconfident."""
    from training.data.coco import file_sha256, load_coco
    from training.handoff import PseudoImage, PseudoLabelSet

    test = load_coco(kfold.root, "test.json", check_images=False)
    out = kfold.tmp / "handmade"
    images = []
    for k, image_id in enumerate(test.image_ids):
        record, path = test.image(image_id), test.image_path(image_id)
        mask = np.full((record.height, record.width), k % 5, np.uint8)
        mask[::3] = IGNORE
        (out / "labels").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "labels" / f"{k}.png"), mask)
        images.append(PseudoImage(image=str(path.resolve()), mask=f"labels/{k}.png", sha256=file_sha256(path), height=record.height,
                                  width=record.width, source="test"))
    classes = load_coco(kfold.root, "train.json", check_images=False).classes
    return PseudoLabelSet(classes=classes, ignore_index=IGNORE, threshold=0.5, ensemble="handmade", images=images,
                          confident_share=2 / 3).write(out / "pseudo_labels.yaml")


def config_with(kfold, labels: Path, **extra):
    from training.config import load_space

    overrides = {"data.root": str(kfold.root), "data.pseudo_labels": str(labels), "loss.ignore_index": IGNORE,
                 "augment.train": [], "data.image_cache": False} | extra
    return load_space("deeplab", smoke=True, overrides=overrides).defaults


def test_pseudo_images_join_the_training_side_of_every_fold_only(kfold, labelled_set):
    from training.data.dataset import make_datasets, prepare_data
    from training.handoff import PseudoLabelSet

    cfg = config_with(kfold, labelled_set)
    data = prepare_data(cfg, log=lambda _: None)
    pseudo_paths = {str(Path(p.image).resolve()) for p in PseudoLabelSet.read(labelled_set).images}
    for fold in range(data.manifest.n_splits):
        train, val = make_datasets(cfg, data, fold)
        assert len(train) == len(data.manifest.train_ids(fold)) + N_TEST
        assert train.annotated.image_ids == sorted(data.manifest.train_ids(fold))
        assert sorted(val.image_ids) == sorted(data.manifest.val_ids(fold))
        assert not {str(val.index.image_path(i).resolve()) for i in val.image_ids} & pseudo_paths
        assert all(train[i][2] < 0 for i in range(len(train.annotated), len(train)))  # pseudo samples: never an annotated id


def test_unconfident_pixels_never_reach_the_loss(kfold, labelled_set):
    """Through the training dataset and the config's loss mix: logits at ignored pixels change neither loss nor gradients."""
    from training.data.dataset import make_datasets, prepare_data
    from training.modeling.losses import LossMix

    cfg = config_with(kfold, labelled_set, **{"loss.weights": {"ce": 1.0, "dice": 1.0, "focal": 0.5, "lovasz": 0.5}})
    train, _ = make_datasets(cfg, prepare_data(cfg, log=lambda _: None), 0)
    samples = [train[i] for i in range(len(train.annotated), len(train))]
    target = torch.stack([s[1] for s in samples]).long()
    ignored = target == IGNORE
    assert 0.2 < ignored.float().mean() < 0.5  # every third row of each image survived the resize
    loss_fn = LossMix(cfg.loss)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(samples), len(train.annotated.index.classes), *target.shape[1:], generator=generator, requires_grad=True)
    loss, _ = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad.permute(0, 2, 3, 1)[ignored].abs().max() == 0
    changed = logits.detach().clone()
    changed.permute(0, 2, 3, 1)[ignored] = torch.randn(int(ignored.sum()), changed.shape[1], generator=generator) * 10
    assert loss_fn(changed, target)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_an_annotated_image_cannot_be_pseudo_labelled(kfold, tmp_path):
    from training.data.coco import load_coco
    from training.errors import DataError
    from training.stages.pseudo_label.plan import images_to_label

    cfg = config_with(kfold, Path("unused"), **{"data.pseudo_labels": None, "loss.ignore_index": None})
    train = load_coco(kfold.root, "train.json", check_images=False)
    unlabelled = tmp_path / "extra"
    unlabelled.mkdir()
    shutil.copy(train.image_path(train.image_ids[3]), unlabelled / "renamed.png")
    with pytest.raises(DataError) as err:
        images_to_label(cfg, str(unlabelled), log=lambda _: None)
    line = str(err.value)
    assert "\n" not in line and "renamed.png" in line and str(train.image_path(train.image_ids[3])) in line

    # a test set that lists an annotated image
    test = json.loads((kfold.root / "test.json").read_text())
    test["images"].append(dict(json.loads((kfold.root / "train.json").read_text())["images"][0], id=10_000))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "images").symlink_to(kfold.root / "images")
    shutil.copy(kfold.root / "train.json", tmp_path / "root" / "train.json")
    (tmp_path / "root" / "test.json").write_text(json.dumps(test))
    cfg2 = config_with(kfold, Path("unused"), **{"data.pseudo_labels": None, "loss.ignore_index": None, "data.root": str(tmp_path / "root")})
    with pytest.raises(DataError, match="in the test set but annotated as"):
        images_to_label(cfg2, None, log=lambda _: None)


def test_the_cli_refuses_bad_options_in_one_line(kfold):
    for args, expected in ((["--rounds", "0"], "--rounds: must be >= 1"), (["--threshold", "1.5"], "--threshold: a probability"),
                           (["--experiment", "nope"], "nope/kfold/kfold_result.yaml: not found")):
        log = kfold.tmp / "cli.log"
        done = run_cli(["training/pseudo_label.py", *args], kfold.env, log, timeout=120)
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], lines


def test_a_batch_with_no_confident_pixel_is_a_zero_loss_not_nan():
    from training.config import LossConfig
    from training.modeling.losses import LossMix

    loss_fn = LossMix(LossConfig(weights={"ce": 1.0, "dice": 1.0, "lovasz": 1.0}, ignore_index=IGNORE))
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, terms = loss_fn(logits, torch.full((2, 8, 8), IGNORE))
    loss.backward()
    assert loss.item() == 0 and all(v.item() == 0 for v in terms.values()) and logits.grad.abs().max() == 0


def test_warm_start_takes_the_same_folds_weights_and_refuses_another_fold(kfold, tmp_path):
    """trainer.init_from (the rounds' --warm-start): each fold starts from that fold's best.pt; another fold's is refused."""
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.engine import checkpoint
    from training.engine.trainer import Trainer
    from training.errors import SegtuneError

    overrides = {"data.root": str(kfold.root), "model.encoder": "resnet18", "data.image_cache": False}
    cfg = load_space("deeplab", smoke=True, overrides=overrides).defaults
    data = prepare_data(cfg, log=lambda _: None)
    config_dir = kfold.kfold_dir / "1"  # the k-fold's config directory: fold<k>/best.pt per fold
    warm = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": str(config_dir)})})
    trainer = Trainer(warm, data, 2, tmp_path / "warm", log=lambda _: None)
    saved = checkpoint.load(config_dir / "fold2" / "best.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())
    other = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": str(config_dir / "fold0" / "best.pt")})})
    with pytest.raises(SegtuneError, match="trained on fold 0: its weights have seen fold 2's validation images"):
        Trainer(other, data, 2, tmp_path / "other", log=lambda _: None)
