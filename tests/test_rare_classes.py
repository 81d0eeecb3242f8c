"""Rare classes: copy-paste from the fold's training side, class weights (auto = median frequency
on the training side), OHEM; ignored pixels reach no loss. Real CamVid subsets at 64 px."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training.config import load_space
from training.data.class_balance import median_frequency_weights
from training.data.dataset import make_datasets, prepare_data
from training.engine.checkpoint import load as load_checkpoint
from training.engine.trainer import LAST, METRICS, Trainer, train
from training.errors import ConfigError, SegtuneError
from training.modeling.losses import LossMix

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_torch_thread")]
QUIET = dict(log=lambda _: None)
RARE = ["Bicyclist", "Pedestrian", "SignSymbol"]  # CamVid's classes with the fewest pixels


def smoke_cfg(root: Path, **overrides):
    return load_space("deeplab", smoke=True, overrides={"data.root": str(root), **overrides}).defaults


def copy_paste(**params):
    return {"name": "CopyPaste", "classes": RARE, "p": 1.0, "max_objects": 3, **params}


@pytest.fixture(scope="module")
def data40(camvid_small):
    return prepare_data(smoke_cfg(camvid_small), **QUIET)


def objects_of(index, image_ids, names):
    labels = {index.classes.index(n) for n in names}
    return {i for i in image_ids for a in index.anns_by_image.get(i, []) if index.label_of_category[a["category_id"]] in labels}


# ---- copy-paste ------------------------------------------------------------------------------


def test_copy_paste_never_takes_an_object_from_a_validation_image(camvid_small, data40):
    cfg = smoke_cfg(camvid_small, **{"augment.train": [copy_paste()]})
    manifest = data40.manifest
    for fold in range(manifest.n_splits):
        train_ds, val_ds = make_datasets(cfg, data40, fold)
        val_ids = set(manifest.val_ids(fold))
        assert set(val_ds.image_ids) == val_ids and not val_ds.pasters
        assert objects_of(data40.index, val_ids, RARE), "the validation side has rare objects the bank could take"
        (paster,) = train_ds.pasters
        sources = paster.bank.source_ids
        assert sources and sources <= set(manifest.train_ids(fold)) and not sources & val_ids, fold
        # every training image with a rare object gave at least one (they are all big enough here)
        assert sources == objects_of(data40.index, train_ds.image_ids, RARE)


def test_pasted_pixels_come_from_training_images(camvid_small, data40):
    cfg = smoke_cfg(camvid_small, **{"augment.train": [copy_paste(max_objects=1, scale=[1.0, 1.0])]})
    train_ds, _ = make_datasets(cfg, data40, 0)
    (paster,) = train_ds.pasters
    paster.set_random_seed(0)
    train_ids = set(train_ds.image_ids)
    gained = 0
    for image_id in train_ds.image_ids[:12]:
        image, mask = train_ds.images.load(image_id), train_ds.cache.load(image_id)
        before = (image.copy(), mask.copy())
        pasted_image, pasted_mask, (placed,) = paster.paste(image, mask, image_id)
        assert np.array_equal(image, before[0]) and np.array_equal(mask, before[1])  # inputs untouched
        assert placed.source_id in train_ids and placed.source_id != image_id
        # the new pixels are the source object's, at scale 1 (mirrored when flipped)
        obj = next(o for o in paster.bank.by_label[placed.label]
                   if o.source_id == placed.source_id and o.mask.shape == placed.mask.shape
                   and np.array_equal(o.mask[:, ::-1] if placed.flipped else o.mask, placed.mask))
        y0, x0, y1, x1 = obj.box
        source = train_ds.images.load(obj.source_id)[y0:y1, x0:x1]
        source = source[:, ::-1] if placed.flipped else source
        h, w = placed.mask.shape
        window = (slice(placed.top, placed.top + h), slice(placed.left, placed.left + w))
        assert np.array_equal(pasted_image[window][placed.mask], source[placed.mask])
        assert (pasted_mask[window][placed.mask] == placed.label).all()
        outside = np.ones(mask.shape, bool)
        outside[window] = ~placed.mask
        assert np.array_equal(pasted_image[outside], image[outside]) and np.array_equal(pasted_mask[outside], mask[outside])
        gained += int((pasted_mask == placed.label).sum() - (mask == placed.label).sum())
    assert gained > 0


def test_a_pasted_sample_holds_more_of_the_pasted_classes(camvid_small, data40):
    """Through the dataset and its albumentations pipeline (flip + crop), seeded alike with and without pasting."""
    pipeline = [{"name": "RandomResizedCrop", "scale": [0.5, 1.0], "p": 1.0}, {"name": "HorizontalFlip", "p": 0.5}]
    plain_ds, _ = make_datasets(smoke_cfg(camvid_small, **{"augment.train": pipeline}), data40, 0)
    pasted_ds, _ = make_datasets(smoke_cfg(camvid_small, **{"augment.train": [*pipeline, copy_paste(scale=[1.0, 2.0])]}), data40, 0)
    labels = torch.tensor([data40.classes.index(n) for n in RARE])
    counts = []
    for ds in (plain_ds, pasted_ds):
        ds.set_random_seed(7)
        counts.append(sum(int(torch.isin(ds[i][1].long(), labels).sum()) for i in range(len(ds))))
    assert counts[1] > 1.2 * counts[0], counts
    # seeded, a sample replays exactly (what an exact resume needs)
    pasted_ds.set_random_seed(11)
    first = [pasted_ds[i][:2] for i in range(3)]
    pasted_ds.set_random_seed(11)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, [pasted_ds[i][:2] for i in range(3)]))


def test_copy_paste_p_is_searchable_and_options_come_from_an_override_dict(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(textwrap.dedent("""
        augment:
          train:
            - {name: CopyPaste, classes: [Bicyclist], p: {uniform: [0.0, 1.0], default: 0.5}, max_objects: 2}
            - {name: HorizontalFlip, p: 0.5}
        loss:
          class_weights: {choice: [null, auto], default: auto}
          ohem: {keep: {uniform: [0.1, 1.0], default: 0.25}}
    """))
    space = load_space(space_file)
    assert {"augment.train.0.p", "loss.class_weights", "loss.ohem.keep"} <= set(space.distributions)
    assert space.defaults.augment.train[0]["p"] == 0.5 and space.defaults.loss.ohem.keep == 0.25
    cfg = space.resolve({"augment.train.0.p": 0.8, "loss.class_weights": None, "loss.ohem.keep": 0.5})
    assert cfg.augment.train[0] == {"name": "CopyPaste", "classes": ["Bicyclist"], "p": 0.8, "max_objects": 2}
    assert cfg.loss.class_weights is None and cfg.loss.ohem.keep == 0.5
    # every sampled bound must be a valid config
    space_file.write_text(space_file.read_text().replace("uniform: [0.0, 1.0]", "uniform: [0.0, 2.0]"))
    with pytest.raises(ConfigError, match=r"augment\.train\.0\.p=2\.0.*augment\.train\[0\]\.p: CopyPaste"):
        load_space(space_file)


# ---- config errors: one line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("augment: {train: [{name: CopyPaste, classes: [Car], p: 2}]}", "augment.train[0].p: CopyPaste: Input should be less than or equal to 1 (got 2)"),
        ("augment: {train: [{name: CopyPaste, classes: []}]}", "augment.train[0].classes: CopyPaste"),
        ("augment: {train: [{name: CopyPaste, classes: [Car], scale: [2, 1]}]}", "augment.train[0]: CopyPaste: scale must be [low, high] with 0 < low <= high"),
        ("augment: {train: [{name: HorizontalFlip}, {name: CopyPaste, classes: [Car], colour: red}]}", "augment.train[1].colour: CopyPaste: unknown key"),
        ("augment: {eval: [{name: CopyPaste, classes: [Car]}]}", "augment.eval[0]: CopyPaste is a training augmentation"),
        ("data: {classes: [Sky, Car]}\naugment: {train: [{name: CopyPaste, classes: [Battery]}]}",
         "augment.train[0].classes: unknown class 'Battery'; known: ['Sky', 'Car']"),
        ("data: {classes: [Sky, Car]}\nloss: {class_weights: [1, 2]}", "loss.class_weights: 2 weights for 3 classes (Background first: ['Background', 'Sky', 'Car'])"),
        ("loss: {class_weights: [1, -2]}", "loss.class_weights: class weights must be finite numbers >= 0, got -2"),
        ("loss: {class_weights: [0, 0]}", "loss.class_weights: at least one class weight must be > 0"),
        ("loss: {class_weights: median}", "loss.class_weights"),
        ("loss: {ohem: {keep: 0}}", "loss.ohem.keep: Input should be greater than 0"),
    ],
)
def test_config_errors_are_one_line(tmp_path, text, fragment):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert fragment in message, message


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"augment.train": [copy_paste(classes=["Bicyclist", "Batery"])]}, "augment.train[0].classes: unknown class 'Batery'; known: ['Sky', "),
        ({"loss.class_weights": [1.0, 2.0]}, "loss.class_weights: 2 weights for 12 classes"),
    ],
)
def test_class_names_are_checked_against_the_data_up_front(camvid16, overrides, fragment):
    cfg = smoke_cfg(camvid16, **overrides)  # data.classes unset: only the data knows them
    with pytest.raises(ConfigError) as info:
        prepare_data(cfg, **QUIET)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---- class weights and OHEM ------------------------------------------------------------------


def overwrite_mask(cache, image_id: int, label: int) -> None:
    mask = cache.load(image_id)
    np.save(cache.path(image_id), np.full_like(mask, label))


def test_auto_class_weights_come_from_the_training_side_only(camvid16, tmp_path):
    cfg = smoke_cfg(camvid16, **{"data.cache_dir": str(tmp_path / "cache"), "loss.class_weights": "auto"})
    data = prepare_data(cfg, **QUIET)  # its own mask cache: this test rewrites masks
    train_ids, val_ids = data.manifest.train_ids(0), data.manifest.val_ids(0)
    weights = Trainer(cfg, data, 0, tmp_path / "a", **QUIET).class_weights
    # median-frequency balancing by hand on the training masks
    masks = [data.cache.load(i) for i in train_ids]
    n = len(data.classes)
    counts = sum(np.bincount(m.ravel(), minlength=n) for m in masks)
    present_in = sum(np.where(np.bincount(m.ravel(), minlength=n) > 0, m.size, 0) for m in masks)
    freq = counts / present_in
    np.testing.assert_allclose(weights, np.median(freq) / freq, rtol=1e-12)
    assert weights == median_frequency_weights(counts, present_in)
    rare = data.classes.index("Bicyclist")
    assert weights[rare] > 1 > weights[data.classes.index("Road")]
    overwrite_mask(data.cache, val_ids[0], rare)  # a validation mask changes: the weights do not
    assert Trainer(cfg, data, 0, tmp_path / "b", **QUIET).class_weights == weights
    overwrite_mask(data.cache, train_ids[0], rare)  # a training mask changes: they do
    assert Trainer(cfg, data, 0, tmp_path / "c", **QUIET).class_weights[rare] < weights[rare]


def logits_and_masks(data, seed: int = 0):
    ids = data.manifest.train_ids(0)[:2]
    masks = torch.from_numpy(np.stack([data.cache.load(i)[:64, :64] for i in ids])).long()
    logits = 3 * torch.randn(2, len(data.classes), 64, 64, generator=torch.Generator().manual_seed(seed))
    return logits, masks


@pytest.fixture(scope="module")
def data16(camvid16):
    return prepare_data(smoke_cfg(camvid16), **QUIET)


@pytest.mark.parametrize("term", ["ce", "soft_ce", "focal", "dice", "lovasz", "jaccard", "tversky"])
@pytest.mark.parametrize("ohem", [None, {"keep": 0.3}])
def test_ignored_pixels_change_neither_loss_nor_gradients(camvid16, data16, term, ohem):
    weights = [float(w) for w in np.linspace(0.2, 3.0, len(data16.classes))]
    cfg = smoke_cfg(camvid16, **{"loss.weights": {term: 1.0}, "loss.ignore_index": 255, "loss.class_weights": weights, "loss.ohem": ohem})
    logits, masks = logits_and_masks(data16)
    masks[:, 10:40, 5:50] = 255
    ignored = (masks == 255).unsqueeze(1).expand_as(logits)
    loss_fn = LossMix(cfg.loss)
    results = []
    for noise in (0.0, 50.0):  # huge logits at ignored pixels would dominate any loss that saw them
        changed = torch.where(ignored, logits + noise * torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)), logits)
        changed.requires_grad_(True)
        loss, _ = loss_fn(changed, masks)
        loss.backward()
        results.append((loss.detach(), changed.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-9)
    assert not grad_a[ignored].any() and grad_a[~ignored].any()


def test_class_weights_weight_ce_soft_ce_and_focal_only(camvid16, data16):
    from segmentation_models_pytorch import losses as smp_losses

    weights = [float(w) for w in np.linspace(0.2, 3.0, len(data16.classes))]
    terms = {"ce": 1.0, "soft_ce": 1.0, "focal": 1.0, "dice": 1.0}
    cfg = smoke_cfg(camvid16, **{"loss.weights": terms, "loss.class_weights": weights, "loss.smooth_factor": 0.2})
    logits, masks = logits_and_masks(data16)
    w = torch.tensor(weights)
    _, parts = LossMix(cfg.loss)(logits, masks)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, masks, weight=w))
    torch.testing.assert_close(parts["soft_ce"], F.cross_entropy(logits, masks, weight=w, label_smoothing=0.2))
    torch.testing.assert_close(parts["focal"], smp_losses.FocalLoss("multiclass", class_weights=weights)(logits, masks))
    torch.testing.assert_close(parts["dice"], smp_losses.DiceLoss("multiclass")(logits, masks))
    assert not torch.allclose(parts["ce"], F.cross_entropy(logits, masks))
    with pytest.raises(SegtuneError, match="auto needs the weights"):
        LossMix(smoke_cfg(camvid16, **{"loss.class_weights": "auto"}).loss)


def test_ohem_keeps_the_hardest_non_ignored_pixels(camvid16, data16):
    logits, masks = logits_and_masks(data16, seed=3)
    masks[0, :20] = 255
    valid = masks != 255
    per_pixel = F.cross_entropy(logits, masks, ignore_index=255, reduction="none")[valid]

    def ohem_loss(**loss):
        return LossMix(smoke_cfg(camvid16, **{"loss.weights": {"ce": 1.0}, "loss.ignore_index": 255, **loss}).loss)(logits, masks)[0]

    k = int(np.ceil(0.1 * valid.sum().item()))
    torch.testing.assert_close(ohem_loss(**{"loss.ohem": {"keep": 0.1}}), per_pixel.topk(k).values.mean())
    torch.testing.assert_close(ohem_loss(**{"loss.ohem": {"keep": 0.1, "min_kept": 2 * k}}), per_pixel.topk(2 * k).values.mean())
    assert ohem_loss(**{"loss.ohem": {"keep": 0.1}}) > 1.5 * per_pixel.mean()
    # keep everything: the plain (weighted, smoothed) term
    weights = [float(w) for w in np.linspace(0.2, 3.0, len(data16.classes))]
    for term, smoothing in (("ce", 0.0), ("soft_ce", 0.2)):
        overrides = {"loss.weights": {term: 1.0}, "loss.ignore_index": 255, "loss.class_weights": weights, "loss.smooth_factor": 0.2}
        plain = LossMix(smoke_cfg(camvid16, **overrides).loss)(logits, masks)[0]
        full = LossMix(smoke_cfg(camvid16, **overrides, **{"loss.ohem": {"keep": 1.0}}).loss)(logits, masks)[0]
        expected = F.cross_entropy(logits, masks, weight=torch.tensor(weights), ignore_index=255, label_smoothing=smoothing)
        torch.testing.assert_close(full, plain)
        torch.testing.assert_close(full, expected)


# ---- the trainer with all three ----------------------------------------------------------------


def test_short_run_with_copy_paste_class_weights_and_ohem(camvid16, tmp_path):
    overrides = {
        "data.cache_dir": str(tmp_path / "cache"),
        "data.num_workers": 1,  # the pasters travel to a loader worker and are seeded there
        "augment.train": [copy_paste(p=0.5), {"name": "HorizontalFlip", "p": 0.5}],
        "loss.class_weights": "auto",
        "loss.ohem": {"keep": 0.25, "min_kept": 1000},
        "trainer.epochs": 1,
        "trainer.overlays": 0,
    }
    cfg = smoke_cfg(camvid16, **overrides)
    data = prepare_data(cfg, **QUIET)
    lines = []
    result = train(cfg, data, 0, tmp_path / "run", log=lines.append)
    assert result.epochs_trained == 1 and np.isfinite(result.history[0]["train_loss"])
    logged = next(line for line in lines if line.startswith("class weights, auto"))
    weights = json.loads((tmp_path / "run" / METRICS).read_text())["class_weights"]
    assert len(weights) == len(data.classes) and f"Bicyclist {weights[-1]:.3g}" in logged
    assert load_checkpoint(tmp_path / "run" / LAST)["class_weights"] == weights
    # a resume keeps the weights the run started with, even when the masks count differently now
    overwrite_mask(data.cache, data.manifest.train_ids(0)[0], data.classes.index("Bicyclist"))
    lines.clear()
    resumed = Trainer(smoke_cfg(camvid16, **{**overrides, "trainer.epochs": 2}), data, 0, tmp_path / "run", log=lines.append, resume=tmp_path / "run")
    assert "class weights: the checkpoint's" in lines and resumed.class_weights == weights
    resumed.fit()
    assert json.loads((tmp_path / "run" / METRICS).read_text())["class_weights"] == weights
