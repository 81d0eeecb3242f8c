"""Training memory of UPerNet per encoder at 512 px, estimated on the meta device (no GPU needed).

Per encoder: parameters; weights + gradients + AdamW moments (16 bytes per parameter, fp32);
activations autograd keeps for the backward pass per image, counted by a saved-tensors hook
during a forward on the meta device, once in fp32 and once with the model in fp16 (the lower
bound of what AMP keeps: autocast leaves norms and softmax in fp32); and the largest batch
whose estimate, AMP taken as the mean of the two, stays under --budget GB less --headroom
(allocator fragmentation, cuDNN workspaces, the loss). An estimate, not a GPU measurement.

    python benchmarks/upernet_memory.py [--encoders tu-swin_tiny_patch4_window7_224,...] [--size 512] [--budget 24] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_ENCODERS = (
    "tu-swin_tiny_patch4_window7_224,tu-swin_small_patch4_window7_224,tu-swin_base_patch4_window12_384,"
    "tu-swin_large_patch4_window12_384,tu-convnext_tiny,tu-convnext_small,tu-convnext_base,tu-convnext_large,tu-resnest101e"
)
GB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default=DEFAULT_ENCODERS)
    p.add_argument("--arch", default="UPerNet")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--budget", type=float, default=24.0, help="GPU memory in GB")
    p.add_argument("--headroom", type=float, default=0.25, help="share of the budget kept free")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p.parse_args(argv)


def saved_activation_bytes(model, size: int, dtype) -> int:
    """Bytes of the tensors autograd saves for backward per image, from one training forward of two."""
    import torch

    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}
    keep = []  # saved tensors stay alive, so their ids stay unique

    def pack(tensor):
        if id(tensor) not in params and id(tensor) not in seen:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
            keep.append(tensor)
        return tensor

    x = torch.empty(2, 3, size, size, device="meta", dtype=dtype)  # 2: batch norm in train mode refuses one value per channel
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.to(dtype).train()(x)
    return sum(seen.values()) // 2


def estimate(encoder: str, args) -> dict:
    import segmentation_models_pytorch as smp
    import torch

    from training.modeling.encoders import timm_size_kwargs

    with torch.device("meta"):
        model = getattr(smp, args.arch)(encoder_name=encoder, encoder_weights=None, classes=args.classes, **timm_size_kwargs(encoder, args.size))
    n_params = sum(p.numel() for p in model.parameters())
    states = 16 * n_params  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
    fp32 = saved_activation_bytes(model, args.size, torch.float32)
    fp16 = saved_activation_bytes(model, args.size, torch.float16)
    amp = (fp32 + fp16) / 2
    usable = args.budget * GB * (1 - args.headroom)
    batch = int((usable - states) // amp) if usable > states else 0
    return {
        "encoder": encoder, "params_m": round(n_params / 1e6, 1), "states_gb": round(states / GB, 2),
        "act_fp32_gb_per_img": round(fp32 / GB, 3), "act_fp16_gb_per_img": round(fp16 / GB, 3),
        "max_batch_amp": batch,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = [estimate(encoder, args) for encoder in args.encoders.split(",")]
    if args.json:
        print(json.dumps({"arch": args.arch, "size": args.size, "budget_gb": args.budget, "headroom": args.headroom, "rows": rows}))
        return 0
    print(f"{args.arch} at {args.size} px, {args.budget:g} GB less {args.headroom:.0%} headroom (meta-device estimate, not a GPU measurement)")
    print(f"{'encoder':36s} {'params':>8s} {'w+g+adamw':>10s} {'act fp32/img':>13s} {'act fp16/img':>13s} {'max batch (AMP)':>16s}")
    for r in rows:
        print(f"{r['encoder']:36s} {r['params_m']:>7.1f}M {r['states_gb']:>9.2f}G {r['act_fp32_gb_per_img']:>12.3f}G "
              f"{r['act_fp16_gb_per_img']:>12.3f}G {r['max_batch_amp']:>16d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
