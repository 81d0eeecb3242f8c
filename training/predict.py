"""Predict label masks for images with the k-fold's ensemble; optionally export the ensemble as ONNX.

    python training/predict.py --model results/<exp>/kfold | path/to/kfold_result.yaml | models:/<name>/<version>
        --images DIR_OR_FILE --out DIR [--overlay] [--device cpu|cuda] [--batch-size N] [--workers N]
        [--export onnx] [--mlflow-uri URI]

Writes <out>/masks/<relative path>.png per image (8-bit class ids at the image's own size;
folders are searched recursively), with --overlay <out>/overlays/<relative path>.png, with
--export onnx <out>/onnx/ (member<i>.onnx and ensemble.json). An image that cannot be used
(corrupt, greyscale, RGBA) is one `error:` line naming it; the others are still written and
the exit status is 1. Bad arguments (no such model, no images) exit with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli import run_cli
from training.errors import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="results/<exp>/kfold, its kfold_result.yaml, or an MLflow model: models:/<name>/<version> (or runs:/<run id>/<path>)")
    p.add_argument("--images", help="an image file or a folder (searched recursively for png, jpg, jpeg, bmp, tif, tiff, webp)")
    p.add_argument("--out", required=True, help="output folder: masks/, overlays/, onnx/")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays with a legend of the classes present")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: what the members' configs ask for (CUDA when visible)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--workers", type=int, help="image loading processes (default: the cores but one, at most 4)")
    p.add_argument("--export", choices=("onnx",), help="also write every member as ONNX plus a manifest to <out>/onnx/")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI for models:/ (default MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.images and not args.export:
        raise ConfigError("give --images to predict, --export onnx to export, or both")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers: must be >= 0, got {args.workers}")
    from training.delivery.images import ImageSource
    from training.delivery.predict import check_model, default_workers, load_ensemble, predict_images
    from training.infra.fs import check_writable

    out = Path(args.out)
    check_model(args.model)
    check_writable(out)
    source = ImageSource.open(args.images, exclude=out) if args.images else None
    ensemble = load_ensemble(args.model, args.device, args.mlflow_uri)
    failed = 0
    if source is not None:
        report = predict_images(ensemble, source, out, args.batch_size, default_workers() if args.workers is None else args.workers,
                                args.overlay)
        failed = len(report.failed)
        extra = f" and overlays to {report.overlays}" if report.overlays else ""
        print(f"wrote {report.written} masks to {report.masks}{extra}"
              + (f"; {failed} of {len(source)} images failed (see the error lines)" if failed else ""))
    if args.export == "onnx":
        from training.delivery.onnx_export import ONNX_DIR, export_onnx

        print(f"wrote {export_onnx(ensemble, out / ONNX_DIR)}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
