"""Cost of running trials through Ray Tune instead of calling the trainer directly.

Runs a search with one trial at a time (FIFO, random search with a fixed seed, N trials),
then trains the very same configs one after another with the plain trainer, and prints
wall time search / sequential, with and without Ray's startup (target <= 1.10).

    python benchmarks/tune_overhead.py [--trials 4] [--epochs 4] [--image-size 64] [--repeats 1] [--data DIR] [--json]

Default scale: the embedded sample data at 64 px (the --smoke preset), CPU. With --repeats N
the whole comparison runs N times (search, then the plain loop) and the medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64, help="training and scoring resolution (multiple of 32)")
    p.add_argument("--data", help="dataset root (default: the embedded sample)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the one trial (and the local Ray)")
    p.add_argument("--repeats", type=int, default=1, help="run the comparison N times; medians are reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet = (lambda *_: None) if args.json else print
    if args.repeats > 1:  # each run in a fresh process: the plain loop must not reuse an earlier run's warm caches
        runs = [json.loads(subprocess.run([sys.executable, __file__, *one_run_args(argv)], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
    else:
        runs = [compare(args, quiet)]
    keys = [k for k in runs[0] if k.endswith("_s") or k.startswith("ratio")]
    figures = {k: runs[0][k] for k in ("trials", "epochs_per_trial", "cpus", "image_size", "target")}
    figures.update({k: round(statistics.median(run[k] for run in runs), 3) for k in keys})
    figures["runs"] = [{k: run[k] for k in keys} for run in runs]
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"\n{args.trials} trials x {args.epochs} epochs at {args.image_size} px, one at a time, {args.cpus} CPUs; "
              f"{'median of ' + str(len(runs)) + ' runs' if len(runs) > 1 else 'one run'}")
        print(f"  search, whole command   {figures['search_total_s']:8.1f} s  (Ray start {figures['search_ray_start_s']:.1f} s)")
        print(f"  search, Tune loop only  {figures['search_tune_loop_s']:8.1f} s")
        print(f"  plain trainer in a loop {figures['sequential_total_s']:8.1f} s  (training only {figures['sequential_train_s']:.1f} s)")
        print(f"  ratio with startup      {figures['ratio_with_startup']:8.3f}   (target <= 1.10)")
        print(f"  ratio without startup   {figures['ratio_without_startup']:8.3f}   runs: "
              + ", ".join(f"{run['ratio_without_startup']:.3f}" for run in runs))
    return figures


def one_run_args(argv) -> list[str]:
    """This command's arguments for one run, as JSON."""
    args, skip = [], False
    for arg in (sys.argv[1:] if argv is None else list(argv)):
        if skip:
            skip = False
        elif arg == "--repeats":
            skip = True
        elif not arg.startswith("--repeats=") and arg != "--json":
            args.append(arg)
    return [*args, "--json"]


def compare(args: argparse.Namespace, quiet) -> dict:
    """One search (Tune, one trial at a time) and the same configs through the plain trainer."""
    work = Path(tempfile.mkdtemp(prefix="tune-overhead-"))
    os.environ["SEGTUNE_RESULTS"] = str(work / "results")

    from tune.runner import SearchOptions, run_search

    overrides = {
        "search.algorithm": "random",
        "search.scheduler.name": "fifo",
        "search.max_concurrent": 1,
        "search.num_samples": args.trials,
        "search.resources.cpu": args.cpus,
        "trainer.epochs": args.epochs,
        "search.scheduler.max_t": args.epochs,
        "data.image_size": args.image_size,
        "data.score_size": args.image_size,
    }
    outcome = run_search(
        SearchOptions(space="deeplab", smoke=True, data=args.data, experiment="overhead", overrides=overrides,
                      mlflow_uri=f"sqlite:///{work / 'mlflow.db'}", num_cpus=args.cpus),
        log=quiet,
    )

    import torch

    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.engine.trainer import train
    from tune.runner import cli_overrides

    torch.set_num_threads(args.cpus)
    started = time.perf_counter()
    space = load_space("deeplab", smoke=True, overrides=cli_overrides(SearchOptions(space="deeplab", data=args.data, overrides=overrides)))
    data = prepare_data(space.defaults, log=lambda _: None)
    prepared = time.perf_counter()
    for record in outcome.records:
        cfg = space.resolve(record.params)
        train(cfg, data, cfg.search.fold, work / "sequential" / record.trial_id, log=lambda _: None)
    sequential = time.perf_counter() - started
    sequential_train = time.perf_counter() - prepared

    shutil.rmtree(work, ignore_errors=True)
    return {
        "trials": args.trials,
        "epochs_per_trial": args.epochs,
        "cpus": args.cpus,
        "image_size": args.image_size,
        "search_total_s": round(outcome.seconds, 2),
        "search_ray_start_s": round(outcome.ray_start_seconds, 2),
        "search_tune_loop_s": round(outcome.fit_seconds, 2),
        "sequential_total_s": round(sequential, 2),
        "sequential_train_s": round(sequential_train, 2),
        "ratio_with_startup": round(outcome.seconds / sequential, 3),
        "ratio_without_startup": round(outcome.fit_seconds / sequential_train, 3),
        "target": 1.10,
    }


if __name__ == "__main__":
    main()
