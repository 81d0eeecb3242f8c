"""Every use of a private Ray API, in one place, guarded by the Ray version it was written for.

Each function names the workaround it carries; tests/test_compat.py has one test per
function, so a Ray upgrade that breaks one fails there, not deep inside a search.
requirements.txt pins Ray to TESTED_RAY; `check_ray_version` refuses another minor version
with one line instead of letting a patched internal misbehave silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

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


def local_init_kwargs(num_cpus: int | None, temp_dir: str | None) -> dict[str, Any]:
    """ray.init() arguments of a local, loopback-only instance (private: _node_ip_address, _temp_dir)."""
    kwargs: dict[str, Any] = {"_node_ip_address": "127.0.0.1", "num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": True}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    return kwargs


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
