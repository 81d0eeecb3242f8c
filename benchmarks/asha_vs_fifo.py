"""ASHA vs FIFO on the same 16 sampled configs: epochs consumed and the best final mIoU.

Both searches use Tune's random search with the same seed, so they sample the same configs
(checked); FIFO trains each for max_t epochs, ASHA stops the weak ones at its rungs.
Target: >= 3x fewer epochs with ASHA and the same best config (+-0.01 mIoU).

    python benchmarks/asha_vs_fifo.py [--configs 16] [--max-t 16] [--reduction-factor 4] [--data DIR] [--json]

Default scale: the embedded sample data at 64 px (the --smoke preset), CPU, 2 trials at once.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=16)
    p.add_argument("--max-t", type=int, default=16, help="epochs of a full trial (= trainer.epochs)")
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=4.0)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="dataset root (default: the embedded sample)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def run(scheduler: str, args, work: Path, log):
    from tune.runner import SearchOptions, run_search

    overrides = {
        "search.algorithm": "random",
        "search.seed": args.seed,
        "search.num_samples": args.configs,
        "search.max_concurrent": args.concurrent,
        "search.scheduler.name": scheduler,
        "search.scheduler.max_t": args.max_t,
        "search.scheduler.grace_period": args.grace_period,
        "search.scheduler.reduction_factor": args.reduction_factor,
        "search.resources.cpu": 1,
        "trainer.epochs": args.max_t,
    }
    return run_search(
        SearchOptions(space="deeplab", smoke=True, data=args.data, experiment=f"bench-{scheduler}", overrides=overrides,
                      mlflow_uri=f"sqlite:///{work / 'mlflow.db'}", num_cpus=args.concurrent),
        log=log,
    )


def final_miou(record) -> float:
    """val mIoU of the trial's last epoch (the trainer's metrics.json history in its checkpoint)."""
    if not record.checkpoint:
        return 0.0
    history = json.loads((Path(record.checkpoint).parent / "metrics.json").read_text())["history"]
    return history[-1]["val_miou"] if history else 0.0


def summarise(outcome, max_t: int) -> dict:
    """Epochs consumed and the best config among trials that trained all max_t epochs."""
    records = outcome.records
    full = [r for r in records if r.epochs_trained >= max_t]
    best = max(full, key=final_miou)
    return {
        "epochs": sum(r.epochs_trained for r in records),
        "trials_full_length": len(full),
        "best_final_config": best.params,
        "best_final_val_miou": final_miou(best),
        "wall_s": round(outcome.seconds, 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="asha-vs-fifo-"))
    os.environ["SEGTUNE_RESULTS"] = str(work / "results")
    log = (lambda *_: None) if args.json else print

    results = {}
    for scheduler in ("fifo", "asha"):
        outcome = run(scheduler, args, work, log)
        results[scheduler] = (outcome, summarise(outcome, args.max_t))

    fifo_out, fifo = results["fifo"]
    asha_out, asha = results["asha"]
    same_configs = sorted(json.dumps(r.params, sort_keys=True) for r in fifo_out.records) == sorted(json.dumps(r.params, sort_keys=True) for r in asha_out.records)
    same_best = fifo["best_final_config"] == asha["best_final_config"]
    # Each config trains deterministically (per-epoch seeding), so FIFO's run of ASHA's pick
    # tells how far ASHA's choice is from the best config FIFO found.
    fifo_finals = {json.dumps(r.params, sort_keys=True): final_miou(r) for r in fifo_out.records}
    ranking = sorted(fifo_finals.values(), reverse=True)
    asha_pick = fifo_finals[json.dumps(asha["best_final_config"], sort_keys=True)]
    figures = {
        "configs": args.configs,
        "max_t": args.max_t,
        "reduction_factor": args.reduction_factor,
        "grace_period": args.grace_period,
        "same_sampled_configs": same_configs,
        "fifo_epochs": fifo["epochs"],
        "asha_epochs": asha["epochs"],
        "epoch_ratio": round(fifo["epochs"] / max(1, asha["epochs"]), 2),
        "fifo_best_final_val_miou": round(fifo["best_final_val_miou"], 4),
        "asha_best_final_val_miou": round(asha["best_final_val_miou"], 4),
        "miou_difference": round(asha["best_final_val_miou"] - fifo["best_final_val_miou"], 4),
        "same_best_config": same_best,
        "asha_pick_fifo_rank": ranking.index(asha_pick) + 1,
        "asha_pick_fifo_val_miou": round(asha_pick, 4),
        "asha_pick_within_0.01": fifo["best_final_val_miou"] - asha_pick <= 0.01,
        "fifo_wall_s": fifo["wall_s"],
        "asha_wall_s": asha["wall_s"],
        "asha_trials_full_length": asha["trials_full_length"],
        "target": ">= 3x fewer epochs, same best config +-0.01 mIoU",
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"\n{args.configs} configs (random search, seed {args.seed}; same configs in both runs: {same_configs}), max_t {args.max_t}, "
              f"ASHA grace {args.grace_period}, reduction factor {args.reduction_factor:g}")
        print(f"  epochs trained     FIFO {fifo['epochs']:5d}   ASHA {asha['epochs']:5d}   ratio {figures['epoch_ratio']:.2f}x (target >= 3x)")
        print(f"  best final mIoU    FIFO {fifo['best_final_val_miou']:.4f}  ASHA {asha['best_final_val_miou']:.4f}  difference {figures['miou_difference']:+.4f}")
        print(f"  same best config   {same_best}   (ASHA ran {asha['trials_full_length']} configs to max_t)")
        print(f"  ASHA's pick        rank {figures['asha_pick_fifo_rank']} of {len(ranking)} in FIFO, final mIoU {asha_pick:.4f} "
              f"(within 0.01 of FIFO's best: {figures['asha_pick_within_0.01']})")
        print(f"  wall time          FIFO {fifo['wall_s']:.0f} s   ASHA {asha['wall_s']:.0f} s")
    return figures


if __name__ == "__main__":
    main()
