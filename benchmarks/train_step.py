"""Train-step throughput (img/s) of DeepLabV3+ per encoder: forward, loss, backward, optimizer step.

The step is the trainer's own (build_model, LossMix ce+dice, build_optimizer, grad clipping,
autocast + GradScaler); inputs are random tensors, so data loading is not measured
(benchmarks/loader.py does that). CPU runs fp32; CUDA runs fp16 autocast unless --amp says otherwise.
Reported: batch / median step time over --steps timed steps after --warmup steps; with
--threads 1 on CPU also batch / median CPU time of a step (per core, robust to other load).

    python benchmarks/train_step.py [--encoders resnet18,mobilenet_v2] [--size 128] [--batch 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default="resnet18,mobilenet_v2,resnet34,tu-efficientnet_b0")
    p.add_argument("--arch", default="DeepLabV3Plus")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto", help="auto: fp16 on CUDA, off on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p.parse_args(argv)


def bench_encoder(encoder: str, args, device, log) -> dict:
    import torch

    from training.config import load_space
    from training.engine.trainer import amp_dtype, build_optimizer
    from training.modeling.losses import LossMix
    from training.modeling.models import build_model

    cfg = load_space("deeplab", overrides={
        "model.arch": args.arch, "model.encoder": encoder, "model.encoder_weights": None,
        "data.image_size": args.size, "data.batch_size": args.batch, "trainer.amp": args.amp,
        "loss.weights": {"ce": 1.0, "dice": 0.5},
    }).defaults
    dtype = amp_dtype(cfg.trainer.amp, device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(cfg.model, args.classes).to(device, memory_format=memory_format).train()
    loss_fn = LossMix(cfg.loss)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    masks = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss, _ = loss_fn(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    assert torch.isfinite(loss)
    median = statistics.median(times)
    result = {
        "encoder": encoder,
        "img_per_s": round(args.batch / median, 1),
        "step_ms": round(1000 * median, 1),
        "step_ms_min": round(1000 * min(times), 1),
        "step_ms_max": round(1000 * max(times), 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        # one CPU thread: images per second of that core's own time, unaffected by other load
        "img_per_s_per_core": round(args.batch / statistics.median(cpu_times), 1) if device.type == "cpu" and torch.get_num_threads() == 1 else None,
        "amp": str(dtype).removeprefix("torch.") if dtype else "off",
    }
    per_core = f"   {result['img_per_s_per_core']:6.1f} img/s per core (CPU time)" if result["img_per_s_per_core"] else ""
    log(f"  {encoder:24s} {result['img_per_s']:8.1f} img/s   step {result['step_ms']:7.1f} ms "
        f"(min {result['step_ms_min']}, max {result['step_ms_max']})   {result['params_m']:6.2f} M params   amp {result['amp']}{per_core}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch

    from training.engine.trainer import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log = (lambda _: None) if args.json else print
    log(f"{args.arch} train step, batch {args.batch} x {args.size}px, {args.classes} classes, {name}; "
        f"median of {args.steps} steps after {args.warmup} warm-up (load average {os.getloadavg()[0]:.2f})")
    results = [bench_encoder(e.strip(), args, device, log) for e in args.encoders.split(",") if e.strip()]
    summary = {
        "arch": args.arch, "size": args.size, "batch": args.batch, "device": name,
        "torch": torch.__version__, "load_avg": round(os.getloadavg()[0], 2), "encoders": results,
    }
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
