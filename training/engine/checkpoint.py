"""The trainer's run directory, owned here: what a checkpoint holds, how it is read, and whether a run is complete.

    <out_dir>/last.pt       everything to continue exactly (model, optimizer, scheduler, scaler, history)
    <out_dir>/best.pt       the best epoch's weights (the EMA's with trainer.ema) + config/classes/fold (what stages predict with)
    <out_dir>/metrics.json  best_miou, best_epoch, per_class_iou, epochs_trained, history
    <out_dir>/val_proba.npy the best epoch's validation softmax, uint8 N x C x S x S at the score size, with
    <out_dir>/val_ids.npy, val_target.npy   (only when asked: search trials, for the diversity-aware top-k)

Every stage (Tune trials, k-fold tasks, prediction) reads runs through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.errors import SegtuneError
from training.infra.fs import save_torch, write_text

if TYPE_CHECKING:
    from training.config import Config

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.json"
VAL_STEM = "val"  # evaluation/selection.OOFFold files: val_proba.npy, val_ids.npy, val_target.npy
BEST_KEYS = ("model", "epoch", "best_miou", "best_per_class", "config", "classes", "fold")
NEW, PARTIAL, DONE = "new", "partial", "done"


def save(state: dict[str, Any], out_dir: Path, is_best: bool, summary: dict[str, Any]) -> None:
    """last.pt, best.pt (when `is_best`) and metrics.json, each replaced atomically, metrics last."""
    save_torch(state, out_dir / LAST)
    if is_best:
        best = {k: state[k] for k in BEST_KEYS}
        if state.get("ema") is not None:  # best.pt holds the weights validation scored: the average's
            best["model"] = ema_weights(state["ema"])
        save_torch(best, out_dir / BEST)
    write_text(out_dir / METRICS, json.dumps(summary, indent=1, allow_nan=True))


def ema_weights(ema_state: dict[str, Any]) -> dict[str, Any]:
    """The model weights inside a torch AveragedModel state dict (keys "module.<name>")."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint (a file, or a run directory's last.pt) without unpickling arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise SegtuneError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(out_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a run directory, or None if it has none (yet)."""
    try:
        return json.loads((Path(out_dir) / METRICS).read_text())
    except FileNotFoundError:
        return None


def epochs_completed(out_dir: Path) -> int:
    return int((read_metrics(out_dir) or {}).get("epochs_trained", 0))


def status(out_dir: Path, epochs: int, finished_without_last: bool = False) -> str:
    """DONE (metrics.json complete, best.pt, last.pt at the target epoch), PARTIAL or NEW.

    finished_without_last: also DONE without last.pt when metrics.json and best.pt say the run
    finished (a finished search trial's resume state is dropped by tune/results.py). Not for
    directories that may still be arriving (a checkpoint being copied has no last.pt yet).
    """
    out_dir = Path(out_dir)
    if not (out_dir / LAST).is_file():
        if not finished_without_last:
            return NEW
        try:
            metrics = read_metrics(out_dir) or {}
        except (OSError, ValueError):
            return NEW
        complete = metrics.get("epochs_trained", 0) >= epochs and len(metrics.get("history", [])) >= epochs and (out_dir / BEST).is_file()
        return DONE if complete else NEW
    try:
        metrics = read_metrics(out_dir) or {}
        if metrics.get("epochs_trained", 0) < epochs or len(metrics.get("history", [])) < epochs or not (out_dir / BEST).is_file():
            return PARTIAL
        # mmap: reads the epoch without loading the weights.
        state = torch.load(out_dir / LAST, map_location="cpu", weights_only=True, mmap=True)
        return DONE if state.get("epoch", 0) >= epochs else PARTIAL
    except (OSError, ValueError, RuntimeError, KeyError):
        return PARTIAL


def check_resumable(state: dict[str, Any], checkpoint: str | Path, cfg: "Config", classes: list[str], fold: int | None) -> None:
    """Refuse a checkpoint of another fold, model or class list (one line naming the key)."""
    if state.get("fold") != fold:
        raise SegtuneError(f"{checkpoint}: checkpoint is of fold {state.get('fold')}, this run trains fold {fold}")
    if cfg.trainer.ema is not None and state.get("ema") is None:
        raise SegtuneError(f"{checkpoint}: checkpoint has no weight average (trained without trainer.ema); resume it with trainer.ema: null")
    check_same_model(state, checkpoint, cfg, classes)


def check_same_model(state: dict[str, Any], checkpoint: str | Path, cfg: "Config", classes: list[str]) -> None:
    """Refuse a checkpoint of another model or class list (one line naming the key)."""
    if state.get("classes") != classes:
        raise SegtuneError(f"{checkpoint}: checkpoint classes {state.get('classes')} differ from the data's {classes}")
    saved = (state.get("config") or {}).get("model") or {}
    ours = cfg.to_dict()["model"]
    for key in ("arch", "encoder", "params"):  # encoder_weights only seeded the first epoch
        differs = str(saved.get(key)).lower() != ours[key].lower() if key == "arch" else saved.get(key) != ours[key]
        if differs:
            raise SegtuneError(f"{checkpoint}: checkpoint has model.{key}={saved.get(key)!r}, this run has model.{key}={ours[key]!r}")


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """(eval-mode model on `device`, its Config, the checkpoint's fold) from a best.pt/last.pt.

    The checkpoint holds every weight, so the encoder's pretrained file is not needed.
    """
    model, cfg, fold, _ = load_model_and_classes(checkpoint, device)
    return model, cfg, fold


def load_model_and_classes(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """load_model plus the class names the model was trained for."""
    from training.config import config_from_dict
    from training.modeling.models import build_model

    state = load(checkpoint)
    cfg = config_from_dict(state["config"], f"{checkpoint}: config")
    model = build_model(cfg.model.model_copy(update={"encoder_weights": None}), len(state["classes"]), cfg.data.image_size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state.get("fold"), list(state["classes"])
