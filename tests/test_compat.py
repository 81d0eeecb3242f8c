"""One test per private-Ray workaround in training/infra/compat.py, against the installed Ray."""

from __future__ import annotations

import fnmatch
import os
import subprocess

import pytest

from conftest import PYTHON, REPO
from training.infra import compat


def test_installed_ray_is_the_tested_minor_version():
    compat.check_ray_version()
    import ray

    req = (REPO / "requirements.txt").read_text()
    assert f"ray[tune]=={'.'.join(map(str, compat.TESTED_RAY))}.*" in req  # the pin and the guard agree
    assert ray.__version__.startswith(".".join(map(str, compat.TESTED_RAY)) + ".")


def test_local_ray_binds_loopback_only():
    """keep_local_ray_on_loopback + local_init_kwargs: every node address of a local Ray is 127.0.0.1."""
    probe = (
        "import ray\n"
        "from training.infra import compat\n"
        "compat.keep_local_ray_on_loopback()\n"
        "ray.init(**compat.local_init_kwargs(1, None))\n"
        "print(ray.util.get_node_ip_address(), sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", compat.LOOPBACK_ENV)}
    out = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "127.0.0.1 ['127.0.0.1']"


def test_generator_backpressure_holds_the_task_back():
    """A streaming task with the option runs at most N items ahead of a consumer that does not read."""
    probe = (
        "import ray, time\n"
        "from training.infra import compat\n"
        "compat.keep_local_ray_on_loopback()\n"
        "ray.init(**compat.local_init_kwargs(1, None))\n"
        "@ray.remote\n"
        "def produce(stamps):\n"
        "    for i in range(10):\n"
        "        ray.get(stamps.append.remote(i))\n"
        "        yield i\n"
        "@ray.remote\n"
        "class Stamps:\n"
        "    def __init__(self): self.items = []\n"
        "    def append(self, i): self.items.append(i)\n"
        "    def get(self): return self.items\n"
        "stamps = Stamps.remote()\n"
        "gen = produce.options(**compat.generator_backpressure(2)).remote(stamps)\n"
        "time.sleep(3)\n"
        "print(len(ray.get(stamps.get.remote())))\n"
        "print(sum(1 for _ in gen))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    ahead, total = map(int, out.stdout.strip().splitlines()[-2:])
    assert ahead <= 3 and total == 10  # without the option all 10 would be produced before anyone reads


def test_tune_result_keys_are_tunes_own():
    from ray.tune.result import TRAINING_ITERATION

    keys = compat.tune_result_keys()
    assert TRAINING_ITERATION in keys and "time_total_s" in keys and "done" in keys
    assert not {"val_miou", "epoch", "best_miou"} & keys


def test_tune_state_glob_matches_tunes_file_names(tmp_path):
    from ray.tune.execution.tune_controller import TuneController

    name = TuneController.CKPT_FILE_TMPL.format("2026-12-02_00-00-00")
    assert fnmatch.fnmatch(name, compat.TUNE_STATE_GLOB)
    (tmp_path / name).write_text("{}")
    older = TuneController.CKPT_FILE_TMPL.format("2026-12-01_00-00-00")
    (tmp_path / older).write_text("{}")
    assert [p.name for p in compat.tune_state_files(str(tmp_path))] == [older, name]


def test_ray_start_hook_is_loaded_by_ray_start():
    from ray._private import ray_constants
    from ray._common.utils import load_class  # what `ray start` resolves RAY_START_HOOK with

    assert ray_constants.RAY_START_HOOK == "RAY_START_HOOK"
    hook = load_class("training.infra.compat.ray_start_on_loopback")

    class Params:
        node_ip_address = "10.1.2.3"

    params = Params()
    hook(params, False)
    assert params.node_ip_address == "127.0.0.1"


def test_cluster_config_validation_catches_a_bad_key():
    import yaml

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = compat.validate_cluster_config(cfg)
    assert prepared["available_node_types"]
    cfg["not_a_key"] = 1
    with pytest.raises(Exception):
        compat.validate_cluster_config(cfg)


def test_a_foreign_ray_version_is_refused_in_one_line(monkeypatch):
    from training.errors import SegtuneError

    monkeypatch.setattr(compat, "ray_version", lambda: (2, 99))
    with pytest.raises(SegtuneError) as err:
        compat.check_ray_version()
    assert "\n" not in str(err.value) and "ray[tune]==2.60.*" in str(err.value)
