"""One ensemble member on CPU: torch vs its ONNX export on onnxruntime, images per second.

    python benchmarks/onnx_inference.py [--size 256] [--encoder mobilenet_v2] [--images 16] [--batch 8]
        [--repeats 5] [--threads N] [--checkpoint best.pt] [--json]

The member is exported as predict.py --export onnx exports it (delivery/onnx_export.py: fp32,
dynamic batch/height/width, checked against torch). Both runtimes get the same normalised
batches and the same number of threads; the figure is the median over `repeats` passes, as
wall-clock img/s and as img per CPU-second (process CPU time, which other load on a shared
box barely changes). Weights are random unless --checkpoint names a trained best.pt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from training.config import load_space
from training.delivery.onnx_export import INPUT, OUTPUT, export_member
from training.evaluation.members import Member, load_member
from training.modeling.models import arch_spec, build_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="model input side (multiple of 32)")
    p.add_argument("--arch", default="DeepLabV3Plus")
    p.add_argument("--encoder", default="mobilenet_v2")
    p.add_argument("--images", type=int, default=16, help="images timed per pass")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per runtime; the median is reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of both runtimes")
    p.add_argument("--checkpoint", help="a trained best.pt to time instead of a random member")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def member_for(args) -> Member:
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            sys.exit(f"error: --checkpoint {args.checkpoint}: no such file")
        return load_member(args.checkpoint, 0, torch.device("cpu"))
    space = load_space("deeplab", overrides={"data.image_size": args.size, "model.arch": args.arch,
                                             "model.encoder": args.encoder, "model.encoder_weights": None})
    cfg = space.defaults
    torch.manual_seed(0)
    return Member(0, 0, build_model(cfg.model, 11).eval(), cfg, 0, arch_spec(cfg.model.arch).divisor)


def time_passes(run, batches: list, repeats: int) -> tuple[list[float], list[float]]:
    """(img/s wall, img per CPU-second) of each pass over `batches`, after one warm-up batch."""
    run(batches[0])
    n = sum(len(b) for b in batches)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            run(batch)
        wall.append(n / (time.perf_counter() - start))
        cpu.append(n / (time.process_time() - start_cpu))
    return wall, cpu


def main(argv=None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    member = member_for(args)
    size = member.cfg.data.image_size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        path = Path(tmp) / "member.onnx"
        start = time.perf_counter()
        diff = export_member(member, path)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model_mb = os.path.getsize(path) / 2**20

    def run_torch(x):
        with torch.no_grad():
            return member.model(x)

    def run_onnx(x):
        return session.run([OUTPUT], {INPUT: x.numpy()})[0]

    results = []
    for name, run in (("torch", run_torch), ("onnxruntime", run_onnx)):
        wall, cpu = time_passes(run, batches, max(1, args.repeats))
        results.append({"runtime": name, "img_per_s": round(statistics.median(wall), 2), "img_per_s_runs": [round(r, 2) for r in wall],
                        "img_per_cpu_s": round(statistics.median(cpu), 2)})
    report = {
        "device": f"cpu ({args.threads} threads, {platform.processor() or platform.machine()})",
        "model": f"{member.cfg.model.arch}/{member.cfg.model.encoder}",
        "input_size": size,
        "batch": args.batch,
        "images": args.images,
        "repeats": args.repeats,
        "export_s": round(export_s, 1),
        "onnx_mb": round(model_mb, 1),
        "max_abs_probability_diff": diff,
        "speedup": round(results[1]["img_per_s"] / results[0]["img_per_s"], 2),
        "speedup_cpu": round(results[1]["img_per_cpu_s"] / results[0]["img_per_cpu_s"], 2),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "load_average": os.getloadavg()[0],
        "results": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['model']} at {size}px, batch {args.batch}, on {report['device']}; export {report['export_s']} s, "
          f"{report['onnx_mb']} MB; max |p_onnx - p_torch| {diff:.1e}; load average {report['load_average']:.2f}")
    print(f"{'runtime':<12} {'img/s':>9} {'img/cpu-s':>10}")
    for r in results:
        print(f"{r['runtime']:<12} {r['img_per_s']:>9.2f} {r['img_per_cpu_s']:>10.2f}")
    print(f"onnxruntime / torch: {report['speedup']}x wall, {report['speedup_cpu']}x per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
