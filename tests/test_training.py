"""The training loop on real CamVid subsets at 64 px: learning, exact resume, NaN guard, AMP,
schedules, metrics; and the embedded-sample smoke run end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import PYTHON, REPO, write_camvid_subset
from training.config import load_space
from training.data.dataset import make_datasets, prepare_data
from training.engine.checkpoint import load as load_checkpoint
from training.engine.trainer import (BEST, LAST, METRICS, Trainer, build_optimizer, build_scheduler,
                                     evaluate_untrained, train)
from training.errors import NonFiniteLossError, SegtuneError, WeightsNotFoundError
from training.evaluation.metrics import ConfusionMatrix, SegScores, resize_logits
from training.evaluation.tta import autocast
from training.modeling.losses import LossMix
from training.modeling.models import build_model

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_torch_thread")]
QUIET = dict(log=lambda _: None)
# history fields that measure time or memory, not training
TIMING = ("epoch_seconds", "img_per_s", "train_seconds", "peak_mem_mb", "infer_ms_per_image")


def smoke_cfg(root: Path, **overrides):
    return load_space("deeplab", smoke=True, overrides={"data.root": str(root), **overrides}).defaults


@pytest.fixture(scope="module")
def data16(camvid16):
    return prepare_data(smoke_cfg(camvid16), **QUIET)


@pytest.fixture(scope="module")
def data40(camvid_small):
    return prepare_data(smoke_cfg(camvid_small), **QUIET)


# ---- learning ------------------------------------------------------------------------------


def test_short_training_learns(camvid_small, data40, tmp_path):
    cfg = smoke_cfg(camvid_small, **{"trainer.epochs": 3})
    untrained = evaluate_untrained(cfg, data40, fold=0)
    epochs = []
    result = train(cfg, data40, 0, tmp_path, callbacks=[epochs.append], **QUIET)
    losses = [r.train_loss for r in epochs]
    assert [r.epoch for r in epochs] == [1, 2, 3] and result.epochs_trained == 3
    assert losses[-1] < 0.85 * losses[0], losses
    assert result.best_miou > untrained + 0.05, (untrained, [r.val_miou for r in epochs])
    assert result.best_miou == max(r.val_miou for r in epochs)
    assert result.best_epoch == 1 + int(np.argmax([r.val_miou for r in epochs]))
    # what the callbacks see is what the files say
    metrics = json.loads((tmp_path / METRICS).read_text())
    assert metrics["best_miou"] == result.best_miou and metrics["best_epoch"] == result.best_epoch
    assert set(metrics["per_class_iou"]) == set(data40.classes)
    flat = epochs[-1].metrics()
    assert {"val_miou", "train_loss", "lr", "loss_ce", "loss_dice", "iou_Road"} <= set(flat)
    assert all(isinstance(v, (int, float)) and not math.isnan(v) for v in flat.values())
    assert (tmp_path / "overlays.png").is_file() and (tmp_path / "per_class_iou.png").is_file()
    # both checkpoints load without unpickling arbitrary objects
    last = load_checkpoint(tmp_path / LAST)
    best = torch.load(tmp_path / BEST, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "history", "config"} <= set(last)
    assert last["epoch"] == 3 and best["epoch"] == result.best_epoch
    assert best["classes"] == data40.classes and best["fold"] == 0 and best["config"] == cfg.to_dict()


# ---- exact resume --------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_after(epoch: int):
    def callback(result):
        if result.epoch == epoch:
            raise Crash  # after last.pt of this epoch is written, like a killed worker
    return callback


def resume_cfg(root: Path, **overrides):
    # the full (non-smoke) augmentation pipeline, so every random transform must replay
    augment = load_space("deeplab").defaults.augment.train
    return smoke_cfg(root, **{"trainer.epochs": 2, "data.batch_size": 4, "augment.train": augment, "trainer.overlays": 0, **overrides})


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_exactly(camvid16, data16, tmp_path, workers):
    cfg = resume_cfg(camvid16, **{"data.num_workers": workers})
    straight = train(cfg, data16, 0, tmp_path / "straight", **QUIET)
    with pytest.raises(Crash):
        train(cfg, data16, 0, tmp_path / "resumed", callbacks=[crash_after(1)], **QUIET)
    after_one = load_checkpoint(tmp_path / "resumed")
    assert after_one["epoch"] == 1
    resumed = train(cfg, data16, 0, tmp_path / "resumed", resume=tmp_path / "resumed" / LAST, **QUIET)

    a = load_checkpoint(tmp_path / "straight" / LAST)
    b = load_checkpoint(tmp_path / "resumed" / LAST)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert len(straight.history) == len(resumed.history) == 2
    def same(x, y) -> bool:  # exact equality that also holds for NaN (a class absent from val)
        return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    for h_a, h_b in zip(straight.history, resumed.history):
        assert same({k: v for k, v in h_a.items() if k not in TIMING}, {k: v for k, v in h_b.items() if k not in TIMING})
    assert straight.best_miou == resumed.best_miou and straight.best_epoch == resumed.best_epoch
    assert same(straight.per_class_iou, resumed.per_class_iou)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"] == b["scheduler"]
    # the second epoch really trained (equal weights are not an artefact of nothing changing)
    assert not all(torch.equal(after_one["model"][k], b["model"][k]) for k in b["model"])


def test_resume_needs_no_pretrained_file(camvid16, data16, tmp_path):
    """The checkpoint holds every weight: a node without the encoder's weights file resumes."""
    weights = tmp_path / "encoder.pth"
    torch.manual_seed(11)
    encoder = build_model(load_space("deeplab", smoke=True).defaults.model, len(data16.classes)).encoder
    torch.save(encoder.state_dict(), weights)
    cfg = resume_cfg(camvid16, **{"model.encoder_weights": str(weights)})
    with pytest.raises(Crash):
        train(cfg, data16, 0, tmp_path / "run", callbacks=[crash_after(1)], **QUIET)
    first_epoch = load_checkpoint(tmp_path / "run")["history"]
    weights.unlink()
    with pytest.raises(WeightsNotFoundError, match="file not found"):  # a fresh start does need it
        Trainer(cfg, data16, 0, tmp_path / "fresh", **QUIET)
    resumed = train(cfg, data16, 0, tmp_path / "run", resume=tmp_path / "run" / LAST, **QUIET)
    assert resumed.epochs_trained == 2 and resumed.history[:1] == first_epoch
    # the run's cost continues across the resume: the seconds of the epoch before it count
    first, second = resumed.history
    assert second["train_seconds"] == pytest.approx(first["epoch_seconds"] + second["epoch_seconds"])
    assert first["mem_kind"] == second["mem_kind"] == "cpu_rss" and second["peak_mem_mb"] >= first["peak_mem_mb"] > 50
    assert 0 < second["infer_ms_per_image"] < 1000 * second["epoch_seconds"]


def test_resume_refuses_another_fold_or_model(camvid16, data16, tmp_path):
    cfg = smoke_cfg(camvid16, **{"trainer.epochs": 1, "trainer.overlays": 0})
    train(cfg, data16, 0, tmp_path, **QUIET)
    checkpoint = tmp_path / LAST
    with pytest.raises(SegtuneError, match=rf"^{re.escape(str(checkpoint))}: checkpoint is of fold 0, this run trains fold 1$"):
        Trainer(cfg, data16, 1, tmp_path / "fold1", resume=checkpoint, **QUIET)
    other = smoke_cfg(camvid16, **{"trainer.epochs": 1, "model.encoder": "mobilenet_v2"})
    with pytest.raises(SegtuneError, match=rf"^{re.escape(str(checkpoint))}: checkpoint has model.encoder='resnet18', this run has model.encoder='mobilenet_v2'$"):
        Trainer(other, data16, 0, tmp_path / "other", resume=checkpoint, **QUIET)
    other = smoke_cfg(camvid16, **{"trainer.epochs": 1, "model.arch": "Unet"})
    with pytest.raises(SegtuneError, match=r"checkpoint has model.arch='DeepLabV3Plus', this run has model.arch='Unet'$"):
        Trainer(other, data16, 0, tmp_path / "other", resume=checkpoint, **QUIET)
    # the same run resumes, whatever the letter case of the arch
    same = smoke_cfg(camvid16, **{"trainer.epochs": 1, "trainer.overlays": 0, "model.arch": cfg.model.arch.lower()})
    assert Trainer(same, data16, 0, tmp_path / "same", resume=checkpoint, **QUIET).epoch == 1


# ---- non-finite loss -----------------------------------------------------------------------


def test_nan_loss_stops_the_run(camvid16, data16, tmp_path):
    # lr 1e36: the first step sends weights to ~1e36, the next forward overflows to inf/NaN
    cfg = smoke_cfg(camvid16, **{"optimizer.lr": 1e36, "scheduler.name": "constant", "trainer.overlays": 0})
    seen = []
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, data16, 0, tmp_path, callbacks=[seen.append], **QUIET)
    message = str(info.value)
    assert "training loss is nan" in message and "optimizer.lr" in message
    assert len(seen) < cfg.trainer.epochs  # stopped, did not run to the end


def test_infinite_loss_stops_at_the_first_step(camvid16, data16, tmp_path):
    cfg = smoke_cfg(camvid16, **{"loss.weights": {"ce": 1e308}, "trainer.overlays": 0})
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 0: training loss is inf \(ce="):
        train(cfg, data16, 0, tmp_path, **QUIET)
    assert not (tmp_path / LAST).exists()


# ---- AMP -----------------------------------------------------------------------------------


def test_bf16_autocast_keeps_loss_in_fp32(camvid16, data16, tmp_path):
    cfg = smoke_cfg(camvid16, **{"trainer.amp": "bf16", "trainer.epochs": 1, "loss.weights": {"ce": 1.0, "dice": 0.5, "focal": 0.5, "lovasz": 0.5}})
    trainer = Trainer(cfg, data16, 0, tmp_path, device="cpu", **QUIET)
    assert trainer.dtype == torch.bfloat16
    images, masks, _ = next(iter(trainer.train_loader))
    masks = masks.long()
    with autocast(trainer.device, trainer.dtype):  # the trainer's own autocast
        logits = trainer.model(trainer._model_input(images))
        loss, parts = trainer.loss_fn(logits, masks)
    assert logits.dtype == torch.bfloat16  # the model really ran in bf16
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    # identical to the fp32 computation on the same logits, outside autocast
    ref_loss, ref_parts = LossMix(cfg.loss)(logits.float(), masks)
    assert torch.equal(loss, ref_loss) and all(torch.equal(parts[k], ref_parts[k]) for k in parts)
    result = trainer.fit()
    assert math.isfinite(result.history[0]["train_loss"]) and result.epochs_trained == 1


def real_masks(data, size: int, count: int = 2) -> torch.Tensor:
    """`count` CamVid masks, nearest-resized to size x size, as a long batch."""
    ids = [image.id for image in data.index.images][:count]
    resized = [cv2.resize(data.cache.load(i), (size, size), interpolation=cv2.INTER_NEAREST) for i in ids]
    return torch.from_numpy(np.stack(resized)).long()


@pytest.mark.parametrize("ignore_index", [None, 0])
def test_loss_mix_is_the_weighted_sum_of_its_terms(camvid16, data16, ignore_index):
    from segmentation_models_pytorch import losses as smp_losses

    weights = {"ce": 1.0, "soft_ce": 0.7, "dice": 0.5, "focal": 0.3, "lovasz": 0.2, "jaccard": 0.15, "tversky": 0.1}
    cfg = smoke_cfg(camvid16, **{"loss.weights": weights, "loss.ignore_index": ignore_index, "loss.focal_gamma": 1.5, "loss.smooth_factor": 0.2})
    masks = real_masks(data16, 64)
    logits = 3 * torch.randn(2, len(data16.classes), 64, 64, generator=torch.Generator().manual_seed(0))
    ignore = -100 if ignore_index is None else ignore_index
    direct = {
        "ce": nn.functional.cross_entropy(logits, masks, ignore_index=ignore),
        "soft_ce": nn.functional.cross_entropy(logits, masks, ignore_index=ignore, label_smoothing=0.2),
        "dice": smp_losses.DiceLoss("multiclass", ignore_index=ignore_index)(logits, masks),
        "focal": smp_losses.FocalLoss("multiclass", gamma=1.5, ignore_index=ignore_index)(logits, masks),
        "lovasz": smp_losses.LovaszLoss("multiclass", ignore_index=ignore_index)(logits, masks),
        "jaccard": smp_losses.JaccardLoss("multiclass", ignore_index=ignore_index)(logits, masks),
        "tversky": smp_losses.TverskyLoss("multiclass", ignore_index=ignore_index)(logits, masks),
    }
    total, parts = LossMix(cfg.loss)(logits, masks)
    assert parts.keys() == direct.keys()
    for name, value in direct.items():
        torch.testing.assert_close(parts[name], value, msg=name)
    torch.testing.assert_close(total, sum(weights[name] * value for name, value in direct.items()))
    if ignore_index is None:  # soft_ce is smp's label-smoothed cross entropy, not plain ce
        torch.testing.assert_close(parts["soft_ce"], smp_losses.SoftCrossEntropyLoss(smooth_factor=0.2)(logits, masks))
        assert not torch.allclose(parts["soft_ce"], parts["ce"])


def test_ignored_pixels_count_in_no_loss_term(camvid16, data16):
    """Every term on a mask with an ignored (255) region equals the term on the other pixels alone."""
    from segmentation_models_pytorch import losses as smp_losses

    weights = {"ce": 1.0, "soft_ce": 0.7, "dice": 0.5, "focal": 0.3, "lovasz": 0.2, "jaccard": 0.15, "tversky": 0.1}
    masks = real_masks(data16, 64)
    masks[:, :24, :40] = 255  # e.g. an unlabelled border
    keep = masks != 255
    assert 0 < keep.sum() < masks.numel()
    logits = 3 * torch.randn(2, len(data16.classes), 64, 64, generator=torch.Generator().manual_seed(1))
    cfg = smoke_cfg(camvid16, **{"loss.weights": weights, "loss.ignore_index": 255})
    total, parts = LossMix(cfg.loss)(logits, masks)
    # the kept pixels as one 1 x K image, scored without ignore_index
    kept_logits = logits.permute(0, 2, 3, 1)[keep].T[None, :, :, None]
    kept_masks = masks[keep][None, :, None]
    kept_total, kept_parts = LossMix(smoke_cfg(camvid16, **{"loss.weights": weights}).loss)(kept_logits, kept_masks)
    for name in weights:
        torch.testing.assert_close(parts[name], kept_parts[name], msg=name)
    torch.testing.assert_close(total, kept_total)
    # smp's SoftCrossEntropyLoss divides by all pixels, ignored ones included
    smp_soft_ce = smp_losses.SoftCrossEntropyLoss(smooth_factor=cfg.loss.smooth_factor, ignore_index=255)(logits, masks)
    torch.testing.assert_close(smp_soft_ce, parts["soft_ce"] * keep.float().mean())


def test_loss_terms_run_in_fp32_under_fp16_autocast(camvid16, data16):
    """At 2 x 512 x 512 a class's pixel count exceeds fp16's 65504: Dice's sums would be inf."""
    from segmentation_models_pytorch import losses as smp_losses

    weights = {"ce": 1.0, "soft_ce": 0.5, "dice": 1.0, "focal": 0.5, "jaccard": 0.5, "tversky": 0.5}
    cfg = smoke_cfg(camvid16, **{"loss.weights": weights})
    masks = real_masks(data16, 512)
    assert torch.bincount(masks.flatten()).max() > 65504
    logits = (3 * torch.randn(2, len(data16.classes), 512, 512, generator=torch.Generator().manual_seed(0))).half()
    assert not torch.isfinite(smp_losses.DiceLoss("multiclass")(logits, masks))  # what fp16 would give
    loss_fn = LossMix(cfg.loss)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.ones(1, 1).matmul(torch.ones(1, 1)).dtype == torch.float16  # autocast is really on
        loss, parts = loss_fn(logits, masks)
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    assert torch.isfinite(loss) and all(torch.isfinite(p) for p in parts.values())
    ref_loss, ref_parts = loss_fn(logits.float(), masks)
    assert torch.equal(loss, ref_loss) and all(torch.equal(parts[k], ref_parts[k]) for k in parts)


def test_channels_last_model_and_inputs(camvid16, data16, tmp_path):
    cfg = smoke_cfg(camvid16, **{"trainer.channels_last": True, "trainer.epochs": 1, "trainer.overlays": 0})
    trainer = Trainer(cfg, data16, 0, tmp_path, device="cpu", **QUIET)
    # kernels wider than 1x1: for those, channels_last and the default layout differ
    kernels = [p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in kernels)
    images, _, _ = next(iter(trainer.train_loader))
    inputs = trainer._model_input(images)
    assert inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous()
    before = [p.detach().clone() for p in kernels]
    train_loss, _, _ = trainer.train_one_epoch()
    assert math.isfinite(train_loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, kernels))  # the step updated the weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)


def grad_norms_at_step(trainer: Trainer) -> list[float]:
    """The total gradient norm the optimizer sees at each step (after clipping, before the update)."""
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.register_step_pre_hook(record)
    return norms


@pytest.mark.parametrize("amp", ["off", "fp16"])  # fp16: clipping must act on unscaled gradients (~6 s on CPU)
def test_grad_clip_bounds_the_gradient_norm(camvid16, data16, tmp_path, amp):
    limit = 0.05
    overrides = {"trainer.epochs": 1, "trainer.overlays": 0, "data.batch_size": 4, "trainer.amp": amp}
    if amp == "off":
        unclipped = Trainer(smoke_cfg(camvid16, **overrides, **{"trainer.grad_clip": None}), data16, 0, tmp_path / "a", device="cpu", **QUIET)
        raw = grad_norms_at_step(unclipped)
        unclipped.train_one_epoch()
        assert len(raw) >= 2 and min(raw) > 10 * limit, raw  # without clipping every step exceeds the limit
    clipped = Trainer(smoke_cfg(camvid16, **overrides, **{"trainer.grad_clip": limit}), data16, 0, tmp_path / "b", device="cpu", **QUIET)
    assert clipped.dtype == (torch.float16 if amp == "fp16" else None)
    norms = grad_norms_at_step(clipped)
    clipped.train_one_epoch()
    # clipped to the limit, not below it: a clip before unscaling would leave limit / 65536
    assert len(norms) >= 2 and all(0.99 * limit <= n <= limit * (1 + 1e-4) for n in norms), norms
# ---- optimizers and schedules --------------------------------------------------------------


class TinySegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def lr_curve(name: str, steps_per_epoch: int = 10, **scheduler) -> tuple[np.ndarray, np.ndarray]:
    cfg = load_space("deeplab", smoke=True, overrides={
        "scheduler.name": name, "trainer.epochs": 4, "optimizer.lr": 1e-2, "optimizer.encoder_lr_mult": 0.1,
        **{f"scheduler.{k}": v for k, v in scheduler.items()},
    }).defaults
    model = TinySegNet()
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    enc, dec = [], []
    for _ in range(cfg.trainer.epochs * steps_per_epoch):
        enc.append(opt.param_groups[0]["lr"])
        dec.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    enc, dec = np.array(enc), np.array(dec)
    assert np.allclose(enc, 0.1 * dec), "encoder lr = lr * encoder_lr_mult at every step"
    return dec, enc


def test_cosine_with_warmup():
    lr, _ = lr_curve("cosine", warmup_epochs=1, min_lr_ratio=0.01)
    warm, decay = lr[:10], lr[10:]
    assert np.all(np.diff(warm) > 0) and warm[0] == pytest.approx(1e-3)
    assert decay[0] == pytest.approx(1e-2) and lr.max() == pytest.approx(1e-2)
    assert np.all(np.diff(decay) < 0)
    # the last of 40 steps, 29 of 30 into the decay towards the floor 0.01 * lr
    assert decay[-1] == pytest.approx(1e-2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 29 / 30))))
    assert np.all(lr >= 1e-4)


def test_onecycle():
    lr, _ = lr_curve("onecycle", pct_start=0.25)
    peak = int(np.argmax(lr))
    assert abs(peak - 10) <= 1 and lr[peak] == pytest.approx(1e-2)
    assert lr[0] == pytest.approx(1e-2 / 25)
    assert lr[-1] < 1e-5
    assert np.all(np.diff(lr[:peak]) > 0) and np.all(np.diff(lr[peak:]) < 0)


def test_poly_and_constant():
    lr, _ = lr_curve("poly", power=0.9, warmup_epochs=0)
    assert lr[0] == pytest.approx(1e-2) and np.all(np.diff(lr) < 0)
    assert lr[-1] == pytest.approx(1e-2 * (1 / 40) ** 0.9)
    const, _ = lr_curve("constant")
    assert np.all(const == 1e-2)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizers_step(name, cls):
    cfg = load_space("deeplab", smoke=True, overrides={"optimizer.name": name, "optimizer.weight_decay": 0.01}).defaults
    model = TinySegNet()
    opt = build_optimizer(cfg, model)
    assert type(opt) is cls
    assert [g["name"] for g in opt.param_groups] == ["encoder", "decoder"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    if name == "sgd":
        assert opt.defaults["momentum"] == cfg.optimizer.momentum and opt.defaults["nesterov"]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("optimizer, scheduler", [("sgd", "onecycle"), ("adam", "poly")])  # adamw + cosine: the other tests
def test_trainer_runs_each_optimizer_and_schedule(camvid16, data16, tmp_path, optimizer, scheduler):
    cfg = smoke_cfg(camvid16, **{"optimizer.name": optimizer, "scheduler.name": scheduler, "trainer.epochs": 1,
                                 "data.batch_size": 4, "trainer.overlays": 0, "scheduler.warmup_epochs": 0.5})
    result = train(cfg, data16, 0, tmp_path, **QUIET)
    assert math.isfinite(result.history[0]["train_loss"]) and 0 <= result.best_miou <= 1


# ---- metrics -------------------------------------------------------------------------------


def test_miou_from_accumulated_confusion_matrix():
    # batch 1: truth 0 0 0 1, pred 0 0 1 1;  batch 2: truth 1 1 1 1, pred 1 1 1 1
    batches = [(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 1]])), (torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))]
    cm = ConfusionMatrix(2)
    per_batch = []
    for pred, target in batches:
        cm.update(pred, target)
        one = ConfusionMatrix(2)
        one.update(pred, target)
        per_batch.append(one.scores().miou)
    scores = cm.scores(["bg", "fg"])
    # by hand: class 0: tp 2, fp 0, fn 1 -> 2/3; class 1: tp 5, fp 1, fn 0 -> 5/6
    assert scores.per_class_iou == pytest.approx({"bg": 2 / 3, "fg": 5 / 6})
    assert scores.miou == pytest.approx(0.75)
    assert scores.pixel_acc == pytest.approx(7 / 8)
    assert np.mean(per_batch) == pytest.approx((7 / 12 + 1.0) / 2)  # 0.79: the wrong way differs
    assert abs(np.mean(per_batch) - scores.miou) > 0.03
    assert cm.matrix.tolist() == [[2, 1], [0, 5]]


def test_metrics_absent_classes_and_ignore_index():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 255, 255]))
    scores = cm.scores()
    assert cm.matrix.sum() == 2  # ignored pixels are not counted
    assert scores.miou == 1.0 and math.isnan(scores.per_class_iou["2"])  # absent from truth and prediction
    assert SegScores.from_matrix(np.zeros((3, 3))).miou == 0.0


def test_score_size_resizes_masks(camvid16, data16, tmp_path):
    cfg = smoke_cfg(camvid16, **{"data.score_size": 256, "trainer.overlays": 1})
    train_ds, val_ds = make_datasets(cfg, data16, 0)
    image, mask, image_id = val_ds[0]
    assert image.shape == (3, 64, 64) and mask.shape == (256, 256) and mask.dtype == torch.uint8
    expected = cv2.resize(data16.cache.load(image_id), (256, 256), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(mask.numpy(), expected)
    assert train_ds[0][1].shape == (64, 64)  # training targets follow the input size
    assert resize_logits(torch.zeros(2, 12, 64, 64), (256, 256)).shape == (2, 12, 256, 256)
    trainer = Trainer(cfg, data16, 0, tmp_path, **QUIET)
    _, scores, samples = trainer.evaluate(keep_samples=1)
    assert samples[0][1].shape == samples[0][2].shape == (256, 256)
    assert 0 <= scores.miou <= 1


def test_samples_are_uint8_and_normalised_on_the_device_like_albumentations(camvid16, data16):
    """Loader workers ship uint8; the trainer's normalisation equals albumentations' Normalize."""
    import albumentations as A

    from training.data.coco import read_image
    from training.data.transforms import normalize_images

    cfg = smoke_cfg(camvid16)
    _, val_ds = make_datasets(cfg, data16, 0)
    image, _, image_id = val_ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    resized = cv2.resize(read_image(data16.index.image_path(image_id)), (64, 64), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), resized)
    reference = A.Normalize(mean=cfg.augment.mean, std=cfg.augment.std)(image=resized)["image"]
    ours = normalize_images(image[None], cfg.augment.mean, cfg.augment.std)[0].permute(1, 2, 0).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


# ---- the embedded sample dataset, end to end -----------------------------------------------


def test_smoke_run_on_sample_data_learns(tmp_path):
    out = tmp_path / "smoke"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_torch_thread
    proc = subprocess.run([PYTHON, "training/train.py", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best val mIoU" in proc.stdout
    metrics = json.loads((out / METRICS).read_text())
    assert {"best_miou", "best_epoch", "per_class_iou"} <= set(metrics)
    assert 1 <= metrics["best_epoch"] <= 4 and len(metrics["history"]) == 4
    cfg = load_space("deeplab", smoke=True).defaults
    data = prepare_data(cfg, **QUIET)
    assert list(metrics["per_class_iou"]) == data.classes and len(data.classes) == 11
    untrained = evaluate_untrained(cfg, data, fold=0)
    assert metrics["best_miou"] > 2 * untrained and metrics["best_miou"] > untrained + 0.15, (untrained, metrics["best_miou"])
    assert (out / LAST).is_file() and (out / BEST).is_file()


def test_cli_holdout_validates_on_val_json(tmp_path):
    """`--fold holdout`: every train.json image trains, val.json's images are the validation set."""
    root = write_camvid_subset(tmp_path / "camvid", n_train=12)
    other = write_camvid_subset(tmp_path / "other", n_train=6, stride_seed=1)  # different frames
    val = json.loads((other / "train.json").read_text())
    assert not {im["id"] for im in val["images"]} & {im["id"] for im in json.loads((root / "train.json").read_text())["images"]}
    (root / "val.json").write_text(json.dumps(val))
    out = tmp_path / "holdout"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PYTHON, "training/train.py", "--smoke", "--fold", "holdout", "--epochs", "1", "--data", str(root), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 train / 6 val images" in proc.stdout + proc.stderr
    assert json.loads((out / METRICS).read_text())["best_epoch"] == 1
    (root / "val.json").unlink()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "val.json" in lines[0], proc.stderr[-2000:]
    bad = subprocess.run(cmd[:3] + ["--fold", "first"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--fold 'first'" in bad.stderr


def test_ema_weights_are_validated_checkpointed_and_resumed(camvid16, data16, tmp_path):
    """trainer.ema: the val mIoU is the average's (best.pt re-scored gives it back), best.pt holds the
    average, not the raw weights, and a resumed run ends with the same average."""
    from training.engine.checkpoint import load_model

    cfg = resume_cfg(camvid16, **{"trainer.ema": {"decay": 0.9, "warmup": 0}})
    straight = train(cfg, data16, 0, tmp_path / "straight", **QUIET)
    last = load_checkpoint(tmp_path / "straight" / LAST)
    best = load_checkpoint(tmp_path / "straight" / "best.pt")
    averaged = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    raw_differs = [k for k in last["model"] if not torch.equal(last["model"][k], averaged[k])]
    assert raw_differs  # the average is not the raw weights
    if straight.best_epoch == 2:
        assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    # the best epoch's val mIoU is what best.pt's weights score
    model, loaded_cfg, fold = load_model(tmp_path / "straight" / "best.pt")
    trainer = Trainer(loaded_cfg, data16, fold, tmp_path / "rescore", log=lambda _: None)
    trainer.model = model
    trainer.ema = None
    _, scores, _ = trainer.evaluate()
    assert scores.miou == pytest.approx(straight.best_miou, abs=1e-9)

    with pytest.raises(Crash):
        train(cfg, data16, 0, tmp_path / "resumed", callbacks=[crash_after(1)], **QUIET)
    train(cfg, data16, 0, tmp_path / "resumed", resume=tmp_path / "resumed" / LAST, **QUIET)
    again = load_checkpoint(tmp_path / "resumed" / LAST)
    assert all(torch.equal(last["ema"][k], again["ema"][k]) for k in last["ema"])
    # a checkpoint trained without EMA cannot silently resume into an EMA run
    plain = resume_cfg(camvid16)
    with pytest.raises(Crash):
        train(plain, data16, 0, tmp_path / "plain", callbacks=[crash_after(1)], **QUIET)
    with pytest.raises(SegtuneError, match="no weight average"):
        train(cfg, data16, 0, tmp_path / "plain", resume=tmp_path / "plain" / LAST, **QUIET)


def test_ema_warmup_follows_the_weights_and_decay_is_checked(camvid16, data16, tmp_path):
    from training.config import config_from_dict
    from training.errors import ConfigError

    cfg = resume_cfg(camvid16, **{"trainer.epochs": 1, "trainer.ema": {"decay": 0.5, "warmup": 1}})
    train(cfg, data16, 0, tmp_path / "warm", **QUIET)
    last = load_checkpoint(tmp_path / "warm" / LAST)
    assert all(torch.equal(last["model"][k], last["ema"][f"module.{k}"]) for k in last["model"])  # copied during warmup
    tree = cfg.to_dict()
    tree["trainer"]["ema"]["decay"] = 1.0
    with pytest.raises(ConfigError, match="trainer.ema.decay"):
        config_from_dict(tree)


def test_ema_decay_is_searchable(tmp_path):
    import yaml

    raw = yaml.safe_load((REPO / "search_spaces" / "deeplab.yaml").read_text())
    raw["trainer"]["ema"] = {"decay": {"choice": [0.99, 0.999], "default": 0.999}, "warmup": 1}
    path = tmp_path / "ema.yaml"
    path.write_text(yaml.safe_dump(raw))
    space = load_space(str(path))
    assert "trainer.ema.decay" in space.distributions
    assert space.defaults.trainer.ema.decay == 0.999
    assert space.resolve({"trainer.ema.decay": 0.99}).trainer.ema.model_dump() == {"decay": 0.99, "warmup": 1}
