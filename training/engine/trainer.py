"""THE training loop, shared by train.py, Tune trials and k-fold tasks; only callbacks differ.

AMP via torch.autocast (fp16 + GradScaler or bf16), optional channels_last, grad clipping,
per-step LR schedules, separate encoder LR, seeded per epoch so a resumed run replays the
same batches, checkpoints of everything needed to continue exactly.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch
from torch.utils.data import DataLoader

from training.data.class_balance import auto_class_weights
from training.data.dataset import PreparedData, make_datasets, seed_worker_transform
from training.data.transforms import normalize_images
from training.engine import checkpoint
from training.engine.checkpoint import BEST, LAST, METRICS  # noqa: F401  (the run directory's names, for callers)
from training.engine.costs import ForwardTimer, PeakMemory
from training.errors import NonFiniteLossError, SegtuneError
from training.evaluation.inference import MemberOutput, predict_batches
from training.evaluation.members import Member
from training.evaluation.metrics import ConfusionMatrix, metric_key
from training.evaluation.tta import autocast
from training.modeling.encoders import encoder_stages
from training.modeling.losses import LossMix
from training.modeling.models import arch_spec, build_model

if TYPE_CHECKING:
    from training.config import Config

@dataclass
class EpochResult:
    epoch: int  # 1-based: epochs completed
    train_loss: float
    val_loss: float
    val_miou: float
    pixel_acc: float
    per_class_iou: dict[str, float]
    loss_terms: dict[str, float]
    lr: float
    epoch_seconds: float
    img_per_s: float
    is_best: bool
    best_miou: float
    best_epoch: int
    out_dir: Path
    # What the run cost so far (training/engine/costs.py): epoch wall seconds (training + validation) summed over
    # every epoch trained, also those before a resume; the peak memory of the device ("cuda": tensors,
    # "cpu_rss": the process's resident set); the model's forward time per image in this epoch's validation pass.
    train_seconds: float = 0.0
    peak_mem_mb: float = 0.0
    mem_kind: str = ""
    infer_ms_per_image: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics for Tune/MLflow (per-class IoU as iou_<class>, NaN dropped)."""
        flat = {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_miou": self.val_miou,
            "pixel_acc": self.pixel_acc,
            "lr": self.lr,
            "epoch_seconds": self.epoch_seconds,
            "img_per_s": self.img_per_s,
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
            "s_per_epoch": self.train_seconds / max(self.epoch, 1),
            "peak_mem_mb": self.peak_mem_mb,
            "infer_ms_per_image": self.infer_ms_per_image,
        }
        flat.update({f"loss_{k}": v for k, v in self.loss_terms.items()})
        flat.update({f"iou_{metric_key(k)}": v for k, v in self.per_class_iou.items() if not math.isnan(v)})
        return flat


class Callback(Protocol):
    def __call__(self, result: EpochResult) -> None: ...


@dataclass
class TrainResult:
    best_miou: float
    best_epoch: int
    per_class_iou: dict[str, float]
    epochs_trained: int
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SegtuneError("trainer.device: cuda requested but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    return torch.float16


def encoder_param_groups(cfg: "Config", encoder: torch.nn.Module) -> list[dict[str, Any]]:
    """One group at lr * encoder_lr_mult, or with optimizer.layer_decay < 1 one per encoder stage,
    the deepest at that lr and each shallower one layer_decay times the next."""
    opt = cfg.optimizer
    encoder_lr = opt.lr * opt.encoder_lr_mult
    stages = encoder_stages(encoder, cfg.data.image_size) if opt.layer_decay < 1 else []
    if not stages:  # decay off, or nothing in the encoder trains
        return [{"params": list(encoder.parameters()), "lr": encoder_lr, "name": "encoder"}]
    frozen = [p for p in encoder.parameters() if not p.requires_grad]  # in no stage; kept so every parameter has a group
    stages[0] = frozen + stages[0]
    last = len(stages) - 1
    return [
        {"params": params, "lr": encoder_lr * opt.layer_decay ** (last - i), "name": f"encoder.stage{i}"}
        for i, params in enumerate(stages)
    ]


def build_optimizer(cfg: "Config", model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    groups = encoder_param_groups(cfg, model.encoder)
    encoder_ids = {id(p) for group in groups for p in group["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in encoder_ids], "lr": opt.lr, "name": "decoder"})
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=opt.lr, weight_decay=opt.weight_decay)


def build_scheduler(cfg: "Config", optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A per-step schedule over trainer.epochs."""
    sched = cfg.scheduler
    total = max(1, cfg.trainer.epochs * steps_per_epoch)
    warmup = int(sched.warmup_epochs * steps_per_epoch)
    if sched.name == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total, pct_start=sched.pct_start)
    if sched.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    floor = sched.min_lr_ratio
    power = sched.power

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if sched.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return (1 - progress) ** power  # poly

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_ema(cfg: "Config", model: torch.nn.Module):
    """torch's AveragedModel with an EMA update (buffers too: BN statistics follow the averaged weights), or None."""
    if cfg.trainer.ema is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.trainer.ema.decay), use_buffers=True)


def initial_weights(init_from: str, cfg: "Config", classes: list[str], fold: int | None) -> dict[str, Any]:
    """The model weights of trainer.init_from for `fold`: a best.pt, or `<dir>/fold<k>/best.pt`.

    A checkpoint of another fold is refused: its training side held this fold's validation images,
    which would make this run's validation score meaningless.
    """
    path = Path(init_from)
    if path.is_dir():
        path = path / f"fold{fold}" / BEST
    if not path.is_file():
        raise SegtuneError(f"trainer.init_from: {path}: no such checkpoint")
    state = checkpoint.load(path)
    if fold is not None and state.get("fold") != fold:
        raise SegtuneError(f"trainer.init_from: {path} was trained on fold {state.get('fold')}: its weights have seen fold {fold}'s "
                           "validation images")
    checkpoint.check_same_model(state, path, cfg, classes)
    return state["model"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


class Trainer:
    """Trains one config on one fold; `fit()` runs the epochs, calling callbacks after each.

    With `resume`, training continues from that checkpoint (file or run directory).
    """

    def __init__(
        self,
        cfg: "Config",
        data: PreparedData,
        fold: int | None,
        out_dir: str | Path,
        callbacks: Sequence[Callback] = (),
        device: str | torch.device | None = None,
        log: Callable[[str], None] = print,
        resume: str | Path | None = None,
        keep_val_proba: bool = False,
    ):
        self.cfg = cfg
        self.keep_val_proba = keep_val_proba  # store the best epoch's validation probabilities (checkpoint.VAL_STEM)
        self.val_proba: tuple[list, list, list] | None = None  # (ids, uint8 probabilities, targets) of the last evaluate()
        self.data = data
        self.fold = fold
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.callbacks = list(callbacks)
        self.log = log
        self.device = torch.device(device) if device is not None else resolve_device(cfg.trainer.device)
        self.dtype = amp_dtype(cfg.trainer.amp, self.device)
        self.memory = PeakMemory(self.device)  # from here: building the model and loaders is part of the run's peak
        self.infer_ms_per_image = 0.0
        self.classes = data.classes

        data.ensure_cached()
        self.train_ds, self.val_ds = make_datasets(cfg, data, fold)
        torch.manual_seed(cfg.trainer.seed)
        # A checkpoint holds every weight: resuming (or starting from trained weights) must not need the pretrained file.
        init = cfg.trainer.init_from if resume is None else None
        model_cfg = cfg.model if resume is None and not init else cfg.model.model_copy(update={"encoder_weights": None})
        self.model = build_model(model_cfg, len(self.classes), cfg.data.image_size)
        if init:
            self.model.load_state_dict(initial_weights(init, cfg, self.classes, fold))
        self.model = self.model.to(self.device)
        self.memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.ema = build_ema(cfg, self.model)
        self.class_weights = self._class_weights()
        self.loss_fn = LossMix(cfg.loss, self.class_weights).to(self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.train_loader = self._loader(self.train_ds, train=True)
        self.val_loader = self._loader(self.val_ds, train=False)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.epoch = 0
        self.best_miou = -1.0
        self.best_epoch = 0
        self.best_per_class: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        if resume is not None:
            self.resume(resume)

    def _loader(self, ds, train: bool) -> DataLoader:
        workers = self.cfg.data.num_workers
        self._generator = getattr(self, "_generator", torch.Generator())
        return DataLoader(
            ds,
            batch_size=self.cfg.data.batch_size,
            shuffle=train,
            drop_last=train and len(ds) > self.cfg.data.batch_size,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=seed_worker_transform if workers else None,
            generator=self._generator if train else None,
        )

    def _class_weights(self) -> list[float] | None:
        """loss.class_weights as a list: auto is computed from this fold's training masks only."""
        spec = self.cfg.loss.class_weights
        if spec is None:
            return None
        if spec == "auto":
            annotated = self.train_ds.annotated  # real labels only, not pseudo labels
            weights = auto_class_weights(annotated.cache, annotated.image_ids, len(self.classes), self.cfg.loss.ignore_index)
            how = f"auto (median frequency over {len(annotated)} annotated training images)"
        else:
            weights, how = list(spec), "from the config"
        self.log(f"class weights, {how}: " + ", ".join(f"{name} {w:.3g}" for name, w in zip(self.classes, weights)))
        return weights

    # ---- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "best_per_class": self.best_per_class,
            "history": self.history,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "class_weights": self.class_weights,
            "config": self.cfg.to_dict(),
            "classes": self.classes,
            "fold": self.fold,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.best_miou = state["best_miou"]
        self.best_epoch = state["best_epoch"]
        self.best_per_class = state["best_per_class"]
        self.history = list(state["history"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def resume(self, path: str | Path) -> None:
        state = checkpoint.load(path)
        checkpoint.check_resumable(state, path, self.cfg, self.classes, self.fold)
        self.load_state_dict(state)
        saved = state.get("class_weights")
        if self.cfg.loss.class_weights == "auto" and saved is not None and saved != self.class_weights:
            # the weights the run started with, even if the masks were counted differently since
            self.class_weights = list(saved)
            self.loss_fn = LossMix(self.cfg.loss, self.class_weights).to(self.device)
            self.log("class weights: the checkpoint's")
        self.log(f"resumed from {path} at epoch {self.epoch}")

    def _save(self, is_best: bool) -> None:
        summary = {
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "per_class_iou": self.best_per_class,
            "epochs_trained": self.epoch,
            "fold": self.fold,
            "class_weights": self.class_weights,
            "history": self.history,
        }
        checkpoint.save(self.state_dict(), self.out_dir, is_best, summary)

    # ---- loops -------------------------------------------------------------------
    def train_one_epoch(self) -> tuple[float, dict[str, float], float]:
        self.model.train()
        seed = _epoch_seed(self.cfg.trainer.seed, self.epoch)
        torch.manual_seed(seed)  # dropout etc.
        self._generator.manual_seed(seed)  # shuffle order and worker seeds
        self.train_ds.set_random_seed(seed)  # augmentations and pastes when num_workers == 0
        total, count = 0.0, 0
        term_sums: dict[str, float] = {}
        start = time.perf_counter()
        for step, (images, masks, _) in enumerate(self.train_loader):
            images = self._model_input(images.to(self.device, non_blocking=True))
            masks = masks.to(self.device, non_blocking=True).long()
            with autocast(self.device, self.dtype):
                logits = self.model(images)
            loss, terms = self.loss_fn(logits, masks)
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                raise NonFiniteLossError(
                    f"epoch {self.epoch + 1} step {step}: training loss is {loss.item()} ({parts}); "
                    "lower optimizer.lr, keep trainer.grad_clip, or set trainer.amp: off"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.trainer.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                if self.epoch < self.cfg.trainer.ema.warmup:
                    self.ema.n_averaged.zero_()  # AveragedModel copies the weights while nothing is averaged
                self.ema.update_parameters(self.model)
            n = images.shape[0]
            total += loss.item() * n
            count += n
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.item() * n
        seconds = time.perf_counter() - start
        return total / max(count, 1), {k: v / max(count, 1) for k, v in term_sums.items()}, count / max(seconds, 1e-9)

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch already on the device -> the model's normalised float input."""
        aug = self.cfg.augment
        return normalize_images(images, aug.mean, aug.std).contiguous(memory_format=self.memory_format)

    def evaluate(self, keep_samples: int = 0):
        """(val loss, scores, up to `keep_samples` (image, mask, pred) arrays for overlays)."""
        self.model.eval()
        model = self.ema.module.eval() if self.ema is not None else self.model
        member = Member(0, self.fold, model, self.cfg, divisor=arch_spec(self.cfg.model.arch).divisor,
                        dtype=self.dtype, memory_format=self.memory_format)
        cm = ConfusionMatrix(len(self.classes), self.cfg.loss.ignore_index)
        total, count = 0.0, 0
        samples = []
        self.val_proba = ([], [], []) if self.keep_val_proba else None
        with ForwardTimer(model, self.device) as forward:
            for batch in predict_batches([member], self.val_loader, device=self.device):
                logits, masks = batch.outputs[0].logits, batch.targets
                if self.val_proba is not None:
                    self._keep_proba(batch.ids, batch.outputs[0], masks)
                with torch.no_grad():
                    loss, _ = self.loss_fn(logits, masks)
                pred = logits.argmax(1)
                cm.update(pred, masks)
                total += loss.item() * masks.shape[0]
                count += masks.shape[0]
                for i in range(min(masks.shape[0], keep_samples - len(samples))):
                    samples.append((batch.images[i].numpy(), masks[i].cpu().numpy(), pred[i].cpu().numpy()))
        self.infer_ms_per_image = forward.ms_per_image  # at data.batch_size, with the run's AMP and memory format
        return total / max(count, 1), cm.scores(self.classes), samples

    def _costs(self, epoch_seconds: float) -> dict[str, Any]:
        """EpochResult's cost fields after an epoch of `epoch_seconds`; earlier epochs come from the history (kept by a resume)."""
        return {
            "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in self.history) + epoch_seconds,
            "peak_mem_mb": max([self.memory.peak_mb(), *(h.get("peak_mem_mb", 0.0) for h in self.history)]),
            "mem_kind": self.memory.kind,
            "infer_ms_per_image": self.infer_ms_per_image,
        }

    def _keep_proba(self, ids: list, output: "MemberOutput", masks: torch.Tensor) -> None:
        from training.evaluation.selection import quantize

        self.val_proba[0].extend(ids)
        self.val_proba[1].append(quantize(output.proba))
        self.val_proba[2].append(masks.cpu().numpy().astype("uint8"))

    def _save_val_proba(self) -> None:
        """The best epoch's validation probabilities next to best.pt, as an OOFFold (uint8, the score size)."""
        import numpy as np

        from training.evaluation.selection import OOFFold

        ids, proba, targets = self.val_proba
        OOFFold.save(self.out_dir / checkpoint.VAL_STEM, ids, np.concatenate(proba), np.concatenate(targets))

    def fit(self) -> TrainResult:
        cfg = self.cfg
        tag = f"fold {self.fold}" if self.fold is not None else "holdout"
        self.log(
            f"{cfg.model.arch}/{cfg.model.encoder} {tag}: {len(self.train_ds)} train / {len(self.val_ds)} val images, "
            f"{self.device} amp={self.dtype or 'off'}"
        )
        while self.epoch < cfg.trainer.epochs:
            start = time.perf_counter()
            train_loss, terms, img_per_s = self.train_one_epoch()
            if not all(torch.isfinite(p).all() for p in self.model.parameters()):
                # The last step's loss was finite but its update was not: never checkpoint garbage.
                raise NonFiniteLossError(
                    f"epoch {self.epoch + 1}: model weights became NaN/inf; lower optimizer.lr, keep trainer.grad_clip, "
                    f"or set trainer.amp: off (last good checkpoint: {self.out_dir / LAST})"
                )
            val_loss, scores, samples = self.evaluate(keep_samples=cfg.trainer.overlays)
            self.epoch += 1
            is_best = scores.miou > self.best_miou
            if is_best:
                self.best_miou, self.best_epoch, self.best_per_class = scores.miou, self.epoch, scores.per_class_iou
            seconds = time.perf_counter() - start
            result = EpochResult(
                epoch=self.epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                val_miou=scores.miou,
                pixel_acc=scores.pixel_acc,
                per_class_iou=scores.per_class_iou,
                loss_terms=terms,
                lr=self.optimizer.param_groups[-1]["lr"],
                epoch_seconds=seconds,
                img_per_s=img_per_s,
                is_best=is_best,
                best_miou=self.best_miou,
                best_epoch=self.best_epoch,
                out_dir=self.out_dir,
                **self._costs(seconds),
            )
            self.history.append({k: v for k, v in asdict(result).items() if k not in ("out_dir", "per_class_iou")})
            if is_best and samples:
                from training.evaluation.plots import save_epoch_plots

                save_epoch_plots(self.out_dir, samples, scores.per_class_iou, self.classes)
            if is_best and self.val_proba is not None:
                self._save_val_proba()
            self._save(is_best)
            self.log(
                f"epoch {self.epoch}/{cfg.trainer.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                f"val_mIoU {scores.miou:.4f}  best {self.best_miou:.4f}@{self.best_epoch}  "
                f"{img_per_s:.1f} img/s  {seconds:.1f}s"
            )
            for callback in self.callbacks:
                callback(result)
        return TrainResult(self.best_miou, self.best_epoch, self.best_per_class, self.epoch, self.history, self.out_dir)


def train(
    cfg: "Config",
    data: PreparedData,
    fold: int | None,
    out_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
    keep_val_proba: bool = False,
) -> TrainResult:
    """Train `cfg` on `fold`, optionally continuing from a checkpoint (file or directory).

    keep_val_proba: also store the best epoch's validation probabilities (checkpoint.VAL_STEM).
    """
    return Trainer(cfg, data, fold, out_dir, callbacks, device, log, resume=resume, keep_val_proba=keep_val_proba).fit()


def evaluate_untrained(cfg: "Config", data: PreparedData, fold: int) -> float:
    """val mIoU of the freshly initialised model: the baseline a run must beat."""
    with tempfile.TemporaryDirectory(prefix="untrained-") as scratch:
        return Trainer(cfg, data, fold, scratch, log=lambda _: None).evaluate()[1].miou
