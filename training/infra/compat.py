"""Every use of a private Ray API, in one place, guarded by the Ray version it was written for.

Each function names the workaround it carries; tests/test_compat.py has one test per
function, so a Ray upgrade that breaks one fails there, not deep inside a search.
requirements.txt pins Ray to TESTED_RAY; `check_ray_version` refuses another minor version
with one line instead of letting a patched internal misbehave silently.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from training.errors import SegtuneError

TESTED_RAY = (2, 60)  # the minor version requirements.txt pins and the tests run
# Ray maps 127.0.0.1 to the machine's outward address (ray._private.services.
# resolve_ip_for_localhost) unless its single-machine mode is on; this variable, read when
# ray is imported, turns it on. Worker processes inherit it.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Tune's experiment state files (ray.tune.execution.tune_controller), newest name restored.
TUNE_STATE_GLOB = "experiment_state-*.json"


def ray_version() -> tuple[int, int]:
    import ray

    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def check_ray_version() -> None:
    """One line if the installed Ray is not the minor version these workarounds were tested with."""
    have = ray_version()
    if have != TESTED_RAY:
        import ray

        wanted = ".".join(map(str, TESTED_RAY))
        raise SegtuneError(
            f"ray {ray.__version__} is installed, but training/infra/compat.py patches Ray internals tested with "
            f"{wanted}.x only; install the pinned version: pip install 'ray[tune]=={wanted}.*'"
        )


def keep_local_ray_on_loopback() -> None:
    """Make a Ray started by this process bind 127.0.0.1 only (see LOOPBACK_ENV)."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ[LOOPBACK_ENV] == "0":
        if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
            raise SegtuneError("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone in this Ray; see training/infra/compat.py")
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported before this call (in-process use)


def local_init_kwargs(num_cpus: int | None, temp_dir: str | None, preload: tuple[str, ...] = (), workers: int | None = None) -> dict[str, Any]:
    """ray.init() arguments of a local, loopback-only instance (private: _node_ip_address, _temp_dir, _system_config).

    preload: modules every worker imports before it takes work (Ray's `preload_python_modules`).
    As the driver connects the raylet starts idle workers, so they import torch and the trainer
    (3.5 s measured) while the driver finishes setting up, not all inside the first trial's time.
    workers: how many stay idle (Ray's `num_workers_soft_limit`); start only that many with
    `raylet_prestarts(workers)` around ray.init.
    """
    kwargs: dict[str, Any] = {"_node_ip_address": "127.0.0.1", "num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": True}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    system: dict[str, Any] = {}
    if preload:
        system["preload_python_modules"] = list(preload)
    if workers:
        system["num_workers_soft_limit"] = int(workers)
    if system:
        kwargs["_system_config"] = system
    return kwargs


@contextmanager
def raylet_prestarts(workers: int | None) -> Iterator[list[int]]:
    """Inside the block, a local raylet starts `workers` idle workers when the driver connects, not one per CPU.

    Ray passes the raylet `--num_prestart_python_workers=<CPUs>` (ray._private.services.start_raylet)
    and has no setting for it. With modules to preload, every one of those workers imports torch
    and the trainer: on 2 cores the unused second worker took half the CPU from the one the first
    trial waited for (first trial 1.5 s later, measured); on a 16-core box 16 workers would each
    import torch for one or two trials. Yields the counts it rewrote (empty: Ray's default kept).
    """
    if not workers:
        yield []
        return
    from ray._private import ray_constants, services

    original = getattr(services, "start_ray_process", None)
    if original is None or not hasattr(ray_constants, "PROCESS_TYPE_RAYLET"):
        raise SegtuneError("ray._private.services.start_ray_process is gone in this Ray; see training/infra/compat.py")
    flag, rewritten = "--num_prestart_python_workers=", []

    def start_ray_process(command, process_type, *args, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_RAYLET:
            for i, arg in enumerate(command):
                if arg.startswith(flag):
                    rewritten.append(min(int(workers), int(arg[len(flag):])))
                    command = [*command[:i], f"{flag}{rewritten[-1]}", *command[i + 1:]]
                    break
        return original(command, process_type, *args, **kwargs)

    services.start_ray_process = start_ray_process
    try:
        yield rewritten
    finally:
        services.start_ray_process = original


def tune_actors_take_prestarted_workers() -> None:
    """Let Tune's trial actors start in the raylet's idle, preloaded workers.

    ray.tune.execution.class_cache gives every trainable actor runtime_env
    {"env_vars": {"PL_DISABLE_FORK": "1"}} (for PyTorch Lightning, which we do not use). A
    runtime env other than the job's keeps Ray from handing the actor an idle worker, so the
    first trial on each node paid a new process plus the torch/smp imports (measured: the
    actor's process was always younger than the fit; 3.5 s of imports). Without the variable
    the runtime env is empty and the actor takes a prestarted worker. Variables Tune copies
    from the driver's environment (AWS keys, Train settings) still make a runtime env.
    """
    from ray.tune.execution import class_cache

    defaults = getattr(class_cache, "DEFAULT_ENV_VARS", None)
    if not isinstance(defaults, dict):
        raise SegtuneError("ray.tune.execution.class_cache.DEFAULT_ENV_VARS is gone in this Ray; see training/infra/compat.py")
    defaults.pop("PL_DISABLE_FORK", None)


def tune_ignores_failures_of_a_replaced_actor() -> None:
    """A trial already requeued after its actor died is not failed again by that actor's other tasks.

    A reused actor runs `reset` and `train` for a trial's start; when its node is lost both
    futures fail. TuneController handles the first (counts a failure, stops the actor, requeues
    the trial as PENDING) and then the second, which counts another failure and, the trial being
    PENDING rather than RUNNING, errors it whatever FailureConfig.max_failures allows (seen:
    ActorUnavailableError twice within 10 ms, trial errored after 0 epochs; tests/test_multinode.py).
    A failure reaching a PENDING trial that has no actor any more can only come from the actor it
    was just taken off, so it is dropped. A pending trial whose new actor fails still has that
    actor and is handled by Tune as before.
    """
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    original = getattr(TuneController, "_trial_task_failure", None)
    if original is None:
        raise SegtuneError("ray.tune TuneController._trial_task_failure is gone in this Ray; see training/infra/compat.py")
    if getattr(original, "drops_replaced_actor_failures", False):
        return

    def _trial_task_failure(self, trial, exception):
        if trial.status == Trial.PENDING and trial not in getattr(self, "_trial_to_actor", {trial: None}):
            return None
        return original(self, trial, exception)

    _trial_task_failure.drops_replaced_actor_failures = True
    TuneController._trial_task_failure = _trial_task_failure


def link_checkpoint_files_on_local_storage(last: str) -> None:
    """Tune hard-links a trial's torch files into a local experiment storage instead of copying them.

    Every epoch the trial reports its run directory as a checkpoint and Tune copies all of it
    to the storage (ray.train._internal.storage.persist_current_checkpoint ->
    _pyarrow_fs_copy_files): last.pt (model + optimizer state, ~150 MB for DeepLabV3+ resnet18)
    and best.pt again, every epoch. Ray has no option to link. When source and destination
    are one local filesystem, the *.pt files are hard-linked: the trainer never writes them in
    place (training/infra/fs.save_torch replaces the file), so a later epoch cannot change a
    persisted checkpoint. Other files (appended logs, plots, arrays) are copied; `last` (the
    file whose presence marks a complete checkpoint) is linked last. Another device or
    filesystem falls back to Ray's copy. Idempotent; in the trial's process.
    """
    from ray.train._internal import storage

    original = getattr(storage, "_pyarrow_fs_copy_files", None)
    if original is None:
        raise SegtuneError("ray.train._internal.storage._pyarrow_fs_copy_files is gone in this Ray; see training/infra/compat.py")
    if getattr(original, "links_torch_files", False):
        return
    import pyarrow.fs

    def copy_files(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
        local = pyarrow.fs.LocalFileSystem
        if isinstance(source_filesystem, local) and isinstance(destination_filesystem, local) and os.path.isdir(source):
            try:
                _link_or_copy_tree(Path(source), Path(destination), last)
                return None
            except OSError:
                pass  # e.g. another device: Ray's copy below overwrites whatever was linked
        return original(source, destination, source_filesystem=source_filesystem, destination_filesystem=destination_filesystem, **kwargs)

    copy_files.links_torch_files = True
    storage._pyarrow_fs_copy_files = copy_files


def _link_or_copy_tree(source: Path, destination: Path, last: str) -> None:
    """Copies first, then the links, `last` last: a worker killed in between leaves a checkpoint
    without it, which training/engine/checkpoint.status never takes for a complete one."""
    import shutil

    files = sorted(p for p in source.rglob("*") if not p.is_dir())
    for path in sorted(files, key=lambda p: (p.suffix == ".pt", p.name == last)):
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if path.suffix == ".pt":
            os.link(path, target)
        else:
            shutil.copyfile(path, target)


def generator_backpressure(objects: int) -> dict[str, int]:
    """Task option bounding how far a streaming generator task runs ahead of its consumer."""
    return {"_generator_backpressure_num_objects": objects}


def tune_result_keys() -> set[str]:
    """Keys Tune adds to every reported result (not metrics of the model)."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}


def tune_state_files(tune_path: str) -> list[Path]:
    """Tune's experiment state files in a local experiment directory, oldest name first."""
    return sorted(Path(tune_path).glob(TUNE_STATE_GLOB))


def ray_start_on_loopback(ray_params: Any, head: bool) -> None:
    """`RAY_START_HOOK=training.infra.compat.ray_start_on_loopback` for a non-head `ray start`.

    `ray start` turns --node-ip-address=127.0.0.1 into the machine's outward address unless
    LOOPBACK_ENV=0, and with that setting it refuses to start a non-head node. Ray calls this
    hook after that rewrite and before it starts the node: with 127.0.0.1 as its node address
    the raylet and its agents listen on loopback only (tests/test_multinode.py).
    """
    ray_params.node_ip_address = "127.0.0.1"


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """The cluster launcher's own schema check and defaults of a `ray up` config (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
