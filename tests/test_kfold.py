"""The k-fold stage end to end on a tiny CamVid subset (30 train + 5 test images, 64 px).

One module-scoped run stands in for "the search finished": a best_configs.yaml with two
configs (mobilenet_v2 for 2 epochs, resnet18 for 1 epoch), a parent MLflow run of the search,
and config 1 / fold 0 crashed after its first epoch. Then `run_kfold --resume` (run 1) and
the same again (run 2); the tests read what they left on disk and in MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from conftest import REPO, write_camvid_subset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXPERIMENT = "kfold-test"
CONFIGS = [  # (params, epochs reached in the search)
    ({"model.encoder": "mobilenet_v2", "optimizer.lr": 3e-3}, 2),
    ({"model.encoder": "resnet18", "optimizer.lr": 1e-3}, 1),
]
N_TRAIN, N_TEST = 30, 5


class Crash(Exception):
    pass


def write_best_configs(results: Path, root: Path, uri: str, exp_id: str, parent: str) -> Path:
    """What tune/search.py writes, for two configs of the deeplab smoke space."""
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.handoff import BestConfigs

    space = load_space("deeplab", smoke=True, overrides={"data.root": str(root)})
    entries = []
    for rank, (params, epochs) in enumerate(CONFIGS, start=1):
        entries.append({
            "rank": rank, "trial_id": f"trial_{rank}", "best_val_miou": 0.1, "best_epoch": epochs,
            "epochs_trained": epochs, "checkpoint": None, "params": params,
            "config": space.resolve(params).to_dict(),
        })
    manifest = prepare_data(space.defaults, log=lambda _: None).manifest
    doc = BestConfigs(
        experiment=EXPERIMENT, space=space.source, smoke=True, data_root=str(root),
        mlflow_tracking_uri=uri, mlflow_experiment_id=exp_id, search_parent_run_id=parent,
        metric="val_miou", fold=0, fold_manifest=str(manifest.path), configs=entries,
    )
    path = results / EXPERIMENT / "best_configs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return doc.write(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Results root, tracking URI and a local Ray for this module; restored afterwards."""
    import ray

    from training.infra.ray import connect

    tmp = tmp_path_factory.mktemp("kfold")
    saved = {k: os.environ.get(k) for k in ("SEGTUNE_RESULTS", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    os.environ["SEGTUNE_RESULTS"] = str(tmp / "results")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the URI must come from best_configs.yaml
    os.environ.pop("RAY_ADDRESS", None)
    started = not ray.is_initialized()  # another module may have left its local Ray up
    if started:
        assert connect(None, num_cpus=2, log=lambda _: None).started  # the stage's own local start
        # On loopback, not the machine's outward address (which Ray 2.x substitutes by default).
        addresses = (ray.util.get_node_ip_address(), [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]])
        if addresses != ("127.0.0.1", ["127.0.0.1"]):
            ray.shutdown()
            pytest.fail(f"the k-fold stage's local Ray is not on loopback: node ip, node managers = {addresses}")
    yield tmp
    if started:
        ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def runs(env):
    from mlflow.tracking import MlflowClient

    from training.engine.trainer import train
    from training.handoff import BestConfigs
    from training.stages.kfold.plan import KFoldOptions, build_candidates, prepare_kfold_data
    from training.stages.kfold.stage import run_kfold

    root = write_camvid_subset(env / "camvid", N_TRAIN, N_TEST)
    uri = f"sqlite:///{env / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT)
    search_parent = client.create_run(exp_id, tags={"segtune.role": "search"}, run_name="search").info.run_id
    client.set_terminated(search_parent)
    best_path = write_best_configs(env / "results", root, uri, exp_id, search_parent)

    # A crash of config 1 / fold 0 after its first epoch, with the config the stage trains.
    options = KFoldOptions(experiment=EXPERIMENT, top_k=2, smoke=True, resume=True)
    best, cfgs = BestConfigs.load(best_path)
    cand = build_candidates(best, cfgs, options, best_path)[0]
    data = prepare_kfold_data(cand.cfg, best, best_path, log=lambda _: None)
    crashed = best_path.parent / "kfold" / "1" / "fold0"

    def crash(result):
        raise Crash

    with pytest.raises(Crash):
        train(cand.cfg, data, 0, crashed, callbacks=[crash], log=lambda _: None)
    before_resume = json.loads((crashed / "metrics.json").read_text())

    logs1: list[str] = []
    t = time.perf_counter()
    summary1 = run_kfold(options, log=logs1.append)
    run1_s = time.perf_counter() - t
    kfold = best_path.parent / "kfold"
    mtimes = {p: p.stat().st_mtime_ns for p in kfold.glob("*/fold*/*.pt")}

    logs2: list[str] = []
    t = time.perf_counter()
    summary2 = run_kfold(options, log=logs2.append)
    run2_s = time.perf_counter() - t
    return SimpleNamespace(
        root=root, uri=uri, exp_id=exp_id, search_parent=search_parent, best_path=best_path, kfold=kfold,
        data=data, before_resume=before_resume, summary1=summary1, summary2=summary2, logs1=logs1, logs2=logs2,
        run1_s=run1_s, run2_s=run2_s, mtimes=mtimes,
    )


def test_five_folds_trained_and_crashed_fold_resumed(runs):
    s = runs.summary1
    assert s["n_folds"] == 5 and [c["rank"] for c in s["configs"]] == [1, 2]
    for c, (_, epochs) in zip(s["configs"], CONFIGS):
        assert c["epochs"] == epochs
        for f in c["folds"]:
            out = runs.kfold / str(c["rank"]) / f"fold{f['fold']}"
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["epochs_trained"] == epochs and len(metrics["history"]) == epochs
            assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
            expected = "resumed" if (c["rank"], f["fold"]) == (1, 0) else "trained"
            assert f["status"] == expected, (c["rank"], f)
    # The crashed fold continued from its last.pt: epoch 1 is the record from before the crash.
    history = json.loads((runs.kfold / "1" / "fold0" / "metrics.json").read_text())["history"]
    assert runs.before_resume["epochs_trained"] == 1
    assert history[0] == runs.before_resume["history"][0]
    assert [h["epoch"] for h in history] == [1, 2]


def test_oof_covers_every_training_image_exactly_once(runs):
    manifest = runs.data.manifest
    all_ids = sorted(runs.data.index.image_ids)
    assert len(all_ids) == N_TRAIN
    predicted = []
    for k in range(5):
        with np.load(runs.kfold / "oof" / f"fold{k}.npz") as npz:
            ids = npz["image_ids"].tolist()
        # Fold k's images are predicted by the fold-k models, the ones that never trained on them.
        assert sorted(ids) == manifest.val_ids(k)
        predicted += ids
    assert sorted(predicted) == all_ids  # every image once, none twice
    masks = sorted(int(p.stem) for p in (runs.kfold / "oof_masks").glob("*.png"))
    assert masks == all_ids
    assert runs.summary1["oof"]["images"] == N_TRAIN


def test_single_model_oof_reproduces_the_folds_val_miou(runs):
    # Without TTA a fold's OOF prediction is exactly the trainer's validation pass on best.pt.
    for c in runs.summary1["configs"]:
        for f in c["folds"]:
            assert f["oof_miou"] == pytest.approx(f["val_miou"], abs=1e-6), (c["rank"], f["fold"])


def test_every_choice_is_the_best_oof_candidate(runs):
    """TTA views, vote, weights and post-processing: each choice is the top OOF candidate it was
    compared with (nothing forced in this run), every candidate is recorded, and the ensemble's
    OOF mIoU is at least the mean single-fold val mIoU (the earlier issue's acceptance check)."""
    s = json.loads((runs.kfold / "summary.json").read_text())
    d, ens = s["decisions"], s["ensemble"]
    assert d["tta"]["allowed"] == "hflip" and set(d["tta"]["candidates"]) == {"none", "hflip"}  # smoke: flip views
    assert d["tta"]["oof_miou"] == max(d["tta"]["candidates"].values()) == d["tta"]["candidates"][s["tta"]]
    table = {(row["tta"], row["vote"]): row["oof_miou"] for row in d["tta_vote_table"]}
    assert len(table) == 4 and table[(s["tta"], s["vote"])] == max(table.values())
    runner = d["tta"]["runner_up"]
    assert runner["choice"] != s["tta"] and runner["oof_miou"] <= d["tta"]["oof_miou"]
    w = d["weights"]
    assert w["candidates"][w["chosen"]] == max(w["candidates"].values())
    assert set(w["greedy"]) == {"1", "2"} and sum(w["greedy"].values()) >= 1 and w["greedy_steps"]
    pp = d["postprocess"]
    assert pp["oof_miou_after"] >= pp["oof_miou_before"] == w["candidates"][w["chosen"]]
    assert pp["candidates"] and {c["class_name"] for c in pp["candidates"]} <= set(runs.data.classes[1:])
    assert ens["oof_miou"] == pp["oof_miou_after"] and not ens["notes"]
    folds = [f for c in s["configs"] for f in c["folds"]]
    assert len(folds) == 10
    assert ens["mean_fold_val_miou"] == pytest.approx(np.mean([f["val_miou"] for f in folds]))
    assert ens["oof_miou"] >= np.mean([f["val_miou"] for f in folds]), (ens["oof_miou"], [f["val_miou"] for f in folds])
    assert set(ens["selected"]) <= {"1", "2"} and ens["selected"] and ens["weights"] == {k: v for k, v in
                                                                                         (w["equal"] if w["chosen"] == "equal" else w["greedy"]).items() if v}
    result = yaml.safe_load((runs.kfold / "kfold_result.yaml").read_text())
    assert result["version"] == 2 and result["oof_miou"] == ens["oof_miou"]
    assert result["ensemble"]["tta"]["hflip"] == (s["tta"] == "hflip") and result["ensemble"]["vote"] == s["vote"]
    assert len(result["ensemble"]["members"]) == 5 * len(ens["selected"])
    assert all(not Path(m["checkpoint"]).is_absolute() and (runs.kfold / m["checkpoint"]).is_file() for m in result["ensemble"]["members"])


def test_a_forced_choice_oof_rejects_is_reported(runs, env):
    """--vote/--weights forced against the evidence: kept as asked, said in the summary (from the cached OOF files)."""
    from training.stages.kfold.plan import KFoldOptions
    from training.stages.kfold.stage import run_kfold

    d = runs.summary1["decisions"]
    worse_vote = min(d["vote"]["candidates"], key=d["vote"]["candidates"].get)
    worse_weights = min(d["weights"]["candidates"], key=d["weights"]["candidates"].get)
    logs: list[str] = []
    summary = run_kfold(KFoldOptions(experiment=EXPERIMENT, top_k=2, smoke=True, resume=True, vote=worse_vote, weights=worse_weights,
                                     postprocess="none"), log=logs.append)
    notes = summary["ensemble"]["notes"]
    assert summary["vote"] == worse_vote and summary["decisions"]["weights"]["chosen"] == worse_weights
    if d["vote"]["candidates"][worse_vote] < d["vote"]["candidates"][d["vote"]["chosen"]]:
        assert any(n.startswith(f"--vote {worse_vote} is kept as asked, but OOF prefers") for n in notes), notes
    if summary["decisions"]["weights"]["candidates"][worse_weights] < max(summary["decisions"]["weights"]["candidates"].values()):
        assert any(n.startswith(f"--weights {worse_weights} is kept as asked") for n in notes), notes
    assert summary["ensemble"]["postprocess"] == {}
    assert all(f"note: {n}" in "\n".join(logs) for n in notes)
    # back to the evidence's choices, so the tests after this one see run 1's outputs
    again = run_kfold(KFoldOptions(experiment=EXPERIMENT, top_k=2, smoke=True, resume=True), log=lambda _: None)
    assert again["ensemble"] == runs.summary1["ensemble"]


def test_submission_has_one_valid_row_per_test_image(runs):
    from training.evaluation.submission import iter_submission

    test = json.loads((runs.root / "test.json").read_text())
    path = runs.kfold / "submission.csv"
    assert path.read_text().splitlines()[0] == "image_id,PredictionString"
    assert b"\r" not in path.read_bytes()  # LF line ends
    rows = list(iter_submission(path))
    assert [r[0] for r in rows] == [im["file_name"] for im in sorted(test["images"], key=lambda im: im["id"])]
    assert len(rows) == N_TEST
    num_classes = len(runs.data.classes)
    for _, mask in rows:
        assert mask.shape == (256, 256) and mask.min() >= 0 and mask.max() < num_classes
    sub = runs.summary1["submission"]
    assert sub["images"] == N_TEST and sub["models"] == 5 * len(runs.summary1["ensemble"]["selected_ranks"])


def test_submission_row_is_the_ensemble_mask_resized_nearest(runs):
    """A CSV row, rebuilt by hand from kfold_result.yaml: each fold model at its 64 px input (with the
    chosen flip views), the weighted vote there, post-processing, then the label mask resized nearest
    to the image's own size and from there to 256x256."""
    import cv2
    import torch

    from training.data.coco import load_coco, read_image
    from training.data.transforms import normalize_images
    from training.evaluation.members import InputSpec, load_member
    from training.evaluation.postprocess import PostProcess
    from training.evaluation.submission import iter_submission

    result = yaml.safe_load((runs.kfold / "kfold_result.yaml").read_text())
    spec = result["ensemble"]
    assert spec["tta"]["scales"] == [1.0] and not spec["tta"]["vflip"]
    members = [(load_member(runs.kfold / m["checkpoint"], 0, torch.device("cpu")), m["weight"]) for m in spec["members"]]
    assert {m.cfg.data.image_size for m, _ in members} == {64}
    test = load_coco(runs.root, "test.json")
    image_id = test.image_ids[-1]
    image = read_image(test.image_path(image_id))
    prob_sum, votes = 0, 0
    with torch.no_grad():
        for m, weight in members:
            ispec = InputSpec.of(m.cfg)
            x = normalize_images(ispec.transform()(image=image)["image"][None], ispec.mean, ispec.std)
            p = m.model(x).softmax(1)
            if spec["tta"]["hflip"]:
                p = (p + m.model(x.flip(3)).flip(3).softmax(1)) / 2
            prob_sum = prob_sum + weight * p
            votes = votes + weight * torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).permute(0, 3, 1, 2)
    if spec["vote"] == "soft":
        labels = prob_sum.argmax(1)[0]
    else:
        top = votes == votes.amax(1, keepdim=True)
        labels = torch.where(top, prob_sum, torch.full_like(prob_sum, -1.0)).argmax(1)[0]
    labels = labels.numpy().astype(np.uint8)
    assert labels.shape == (64, 64)
    post = PostProcess.from_names(spec["postprocess"], spec["classes"])
    labels = post.apply(labels, (prob_sum / sum(w for _, w in members))[0].numpy())
    own = cv2.resize(labels, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    expected = cv2.resize(own, (256, 256), interpolation=cv2.INTER_NEAREST)
    rows = dict(iter_submission(runs.kfold / "submission.csv"))
    np.testing.assert_array_equal(rows[test.image(image_id).file_name], expected)


def test_second_run_skips_finished_folds(runs):
    now = {p: p.stat().st_mtime_ns for p in runs.kfold.glob("*/fold*/*.pt")}
    assert now == runs.mtimes and len(now) == 20  # best.pt + last.pt x 10: nothing rewritten
    statuses = {f["status"] for c in runs.summary2["configs"] for f in c["folds"]}
    assert statuses == {"skipped"}
    assert any("already trained" in line for line in runs.logs2)
    assert runs.summary2["timings"]["train_s"] < 5
    assert runs.run2_s < runs.run1_s / 2, (runs.run1_s, runs.run2_s)
    assert runs.summary2["ensemble"] == runs.summary1["ensemble"]


def test_mlflow_lineage(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.uri)
    all_runs = client.search_runs([runs.exp_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("segtune.role") == "kfold"]
    assert len(parents) == 1, "the second run must reuse the kfold parent"
    parent = parents[0]
    assert parent.data.tags["segtune.upstream_run_id"] == parent.data.tags["search_parent_run_id"] == runs.search_parent
    assert parent.info.status == "FINISHED"
    assert {"oof_miou_1", "oof_miou_2", "ensemble_oof_miou"} <= set(parent.data.metrics)

    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    folds = [r for r in children if r.data.tags.get("segtune.role") == "kfold_fold"]
    assert len(folds) == 10, "one child per (config, fold), no duplicates after the second run"
    seen = set()
    for r in folds:
        rank, fold = int(r.data.tags["segtune.config_rank"]), int(r.data.tags["segtune.fold"])
        seen.add((rank, fold))
        assert r.data.tags["segtune.trial_id"] == f"trial_{rank}"
        # the names earlier versions wrote are still there
        assert (r.data.tags["config_rank"], r.data.tags["fold"], r.data.tags["segtune.stage"]) == (str(rank), str(fold), "kfold_fold")
        assert r.info.status == "FINISHED"
        assert r.data.tags["segtune.checkpoint"].endswith(f"kfold/{rank}/fold{fold}/best.pt")
        artifacts = {a.path: a for a in client.list_artifacts(r.info.run_id)}
        assert artifacts["best.pt"].file_size == os.path.getsize(r.data.tags["segtune.checkpoint"]) > 0, (rank, fold)
        epochs = CONFIGS[rank - 1][1]
        history = client.get_metric_history(r.info.run_id, "val_miou")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (rank, fold)
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == epochs
    assert seen == {(r, k) for r in (1, 2) for k in range(5)}

    # Live: epoch 1 of a 2-epoch fold reached MLflow while epoch 2 was still training (a log
    # written only when the task ended would be stamped within milliseconds of the run's end).
    for r in folds:
        rank, fold = int(r.data.tags["segtune.config_rank"]), int(r.data.tags["segtune.fold"])
        if rank != 1 or fold == 0:  # fold 0's epoch 1 predates the crash and is backfilled
            continue
        epoch2_s = json.loads((runs.kfold / "1" / f"fold{fold}" / "metrics.json").read_text())["history"][1]["epoch_seconds"]
        logged_1 = {m.step: m.timestamp for m in client.get_metric_history(r.info.run_id, "val_miou")}[1]
        assert r.info.end_time - logged_1 >= 500 * epoch2_s, (fold, r.info.end_time - logged_1, epoch2_s)

    ensembles = [r for r in children if r.data.tags.get("segtune.role") == "kfold_ensemble"]
    # run 1, the forced choices, and run 1's choices again (an ensemble run per distinct ensemble)
    assert len(ensembles) in (1, 2)
    ens = next(r for r in ensembles if r.data.metrics["oof_miou"] == pytest.approx(runs.summary1["ensemble"]["oof_miou"]))
    assert ens.data.metrics["oof_miou"] == pytest.approx(runs.summary1["ensemble"]["oof_miou"])
    assert any(k.startswith("iou_") for k in ens.data.metrics)
    # the selected ensemble registered once per distinct ensemble (run 2 and the re-run of run 1's choices add none)
    versions = client.search_model_versions(f"name = '{EXPERIMENT}'")
    assert len(versions) == len(ensembles), [(v.version, v.run_id) for v in versions]
    model = runs.summary1["mlflow"]["model"]
    assert runs.summary2["mlflow"]["model"] == model and model["uri"] == f"models:/{EXPERIMENT}/{model['version']}"
    version = client.get_model_version(EXPERIMENT, model["version"])
    assert float(version.tags["segtune.oof_miou"]) == pytest.approx(runs.summary1["ensemble"]["oof_miou"], abs=1e-6)
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(ens.info.run_id)}


# ---- bad input: one `error:` line naming the file or key, nothing done lost ------------------


def _cli_error(capsys, argv) -> str:
    from training.cli import run_cli
    from training.final_kfold import main

    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs(runs, env, capsys, monkeypatch, tmp_path):
    import shutil

    before = {p: p.stat().st_mtime_ns for p in runs.kfold.rglob("*") if p.is_file()}
    line = _cli_error(capsys, ["--experiment", "nope"])
    assert str(env / "results" / "nope" / "best_configs.yaml") in line

    # A previous run exists: refusing to mix into it without --resume.
    assert "pass --resume" in _cli_error(capsys, ["--experiment", EXPERIMENT, "--top-k", "2", "--smoke"])
    # Resuming with other epochs than the run on disk.
    line = _cli_error(capsys, ["--experiment", EXPERIMENT, "--top-k", "2", "--smoke", "--resume", "--epochs", "3"])
    assert "plan.json" in line and "epochs" in line
    assert "has only 2 config(s)" in _cli_error(capsys, ["--experiment", EXPERIMENT, "--top-k", "3"])
    line = _cli_error(capsys, ["--experiment", EXPERIMENT, "--top-k", "6"])
    assert "at most 5" in line and "2^k-1 subsets" in line and "63 at k=6" in line
    assert "--tta" in _cli_error(capsys, ["--experiment", EXPERIMENT, "--tta", "mirror"])

    # Another dataset than the one the search's fold manifest was made for.
    other = write_camvid_subset(tmp_path / "other", n_train=12, n_test=2, stride_seed=1)
    line = _cli_error(capsys, ["--experiment", EXPERIMENT, "--top-k", "2", "--smoke", "--resume", "--data", str(other)])
    assert yaml.safe_load(runs.best_path.read_text())["fold_manifest"] in line and "made for dataset" in line

    # A config that fails validation: the file and key path are named.
    doc = yaml.safe_load(runs.best_path.read_text())
    doc["configs"][1]["config"]["model"]["encoder"] = "resnet_nope"
    bad = tmp_path / "results" / "bad" / "best_configs.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text(yaml.safe_dump(doc))
    line = _cli_error(capsys, ["--experiment", str(bad)])
    assert str(bad) in line and "configs[1].config" in line and "model.encoder" in line

    # No experiment at all under the results root.
    monkeypatch.setenv("SEGTUNE_RESULTS", str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in _cli_error(capsys, [])
    shutil.rmtree(tmp_path / "other")
    after = {p: p.stat().st_mtime_ns for p in runs.kfold.rglob("*") if p.is_file()}
    assert after == before  # nothing already done was touched


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "training/final_kfold.py", "--experiment", "missing-experiment"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, SEGTUNE_RESULTS=str(tmp_path)),
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {tmp_path / 'missing-experiment' / 'best_configs.yaml'}: not found "
                      "(run tune/search.py --experiment missing-experiment first)"], proc.stderr
