"""One test per private-Ray workaround in training/infra/compat.py, against the installed Ray."""

from __future__ import annotations

import fnmatch
import json
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


TUNE_PROBE_HEAD = (
    "import json, os, sys, time\n"
    "from training.infra import compat\n"
    "compat.keep_local_ray_on_loopback()\n"
    "import ray\n"
    "from ray import tune\n"
)


def run_probe(probe: str, tmp_path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AIR_NEW_OUTPUT="0", PYTHONPATH=str(REPO))
    out = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_tune_trial_actor_starts_in_the_one_preloaded_idle_worker(tmp_path):
    """local_init_kwargs(preload, workers) + raylet_prestarts + tune_actors_take_prestarted_workers:
    the raylet starts one idle worker (not one per CPU), and the trial runs in it, with the
    preloaded module already imported."""
    probe = TUNE_PROBE_HEAD + (
        "def children(pid):\n"
        "    for entry in os.listdir('/proc'):\n"
        "        try:\n"
        "            status = open(f'/proc/{entry}/status').read()\n"
        "            cmdline = open(f'/proc/{entry}/cmdline').read()\n"
        "        except OSError:\n"
        "            continue\n"
        "        if f'PPid:\\t{pid}\\n' in status:\n"
        "            yield int(entry), status.split()[1], cmdline\n"
        "def raylet():\n"
        "    return next((pid, cmd) for pid, name, cmd in children(os.getpid()) if name == 'raylet')\n"
        "def idle_workers():\n"
        "    return {pid for pid, _, cmd in children(raylet()[0]) if cmd.startswith('ray::IDLE')}\n"
        "with compat.raylet_prestarts(1) as rewritten:\n"
        "    ray.init(**compat.local_init_kwargs(2, None, ('training.data.coco',), workers=1))\n"
        "compat.tune_actors_take_prestarted_workers()\n"
        "started, deadline = set(), time.time() + 12\n"  # every worker seen while they start and import
        "while time.time() < deadline:\n"
        "    started |= idle_workers()\n"
        "    time.sleep(0.1)\n"
        "before = idle_workers()\n"
        "flags = [a for a in raylet()[1].split('\\0') if a.startswith('--num_prestart_python_workers=')]\n"
        "def trial(config):\n"
        "    tune.report({'pid': os.getpid(), 'preloaded': 'training.data.coco' in sys.modules})\n"
        f"res = tune.Tuner(trial, run_config=tune.RunConfig(storage_path={str(tmp_path)!r}, verbose=0)).fit()\n"
        "m = res[0].metrics\n"
        "print(json.dumps({'rewritten': rewritten, 'flags': flags, 'started': sorted(started), 'before': sorted(before),\n"
        "                  'pid': m['pid'], 'preloaded': m['preloaded']}))\n"
        "ray.shutdown()\n"
    )
    seen = json.loads(run_probe(probe, tmp_path)[-1])
    assert seen["rewritten"] == [1] and seen["flags"] == ["--num_prestart_python_workers=1"], seen  # Ray's default: 2 (the CPUs)
    assert len(seen["started"]) == 1 and seen["before"] == seen["started"], seen  # without raylet_prestarts: 2 started
    assert seen["pid"] in seen["before"] and seen["preloaded"], seen  # without the Tune patch: a new process, nothing preloaded


def test_checkpoint_torch_files_are_linked_into_local_storage_and_stay_as_reported(tmp_path):
    """link_checkpoint_files_on_local_storage: a reported *.pt is hard-linked into the storage,
    unchanged *.pt files are shared between checkpoints, a file replaced later (as save_torch
    does) and a log appended later leave the earlier checkpoint as it was reported."""
    probe = TUNE_PROBE_HEAD + (
        "from pathlib import Path\n"
        "from training.infra.fs import atomic_file\n"
        "ray.init(**compat.local_init_kwargs(1, None))\n"
        "def trial(config):\n"
        "    compat.link_checkpoint_files_on_local_storage('last.pt')\n"
        "    work = Path(os.getcwd()) / 'work'\n"
        "    work.mkdir()\n"
        "    for epoch in (1, 2):\n"
        "        with atomic_file(work / 'last.pt', 'wb') as f: f.write(f'epoch {epoch}'.encode())\n"
        "        if epoch == 1: (work / 'best.pt').write_bytes(b'best')\n"
        "        with open(work / 'events.log', 'a') as f: f.write(f'epoch {epoch}\\n')\n"
        "        tune.report({'epoch': epoch}, checkpoint=tune.Checkpoint.from_directory(str(work)))\n"
        f"tune.Tuner(trial, run_config=tune.RunConfig(storage_path={str(tmp_path)!r}, name='t', verbose=0)).fit()\n"
        "ray.shutdown()\n"
    )
    run_probe(probe, tmp_path)
    first, second = sorted((tmp_path / "t").glob("*/checkpoint_*"))
    assert (first / "last.pt").read_bytes() == b"epoch 1" and (second / "last.pt").read_bytes() == b"epoch 2"
    assert (first / "events.log").read_text() == "epoch 1\n" and (second / "events.log").read_text() == "epoch 1\nepoch 2\n"
    assert os.stat(first / "best.pt").st_ino == os.stat(second / "best.pt").st_ino  # linked, not copied
    assert os.stat(first / "events.log").st_ino != os.stat(second / "events.log").st_ino


def test_an_interrupted_checkpoint_link_never_looks_complete(tmp_path):
    """The linking copier puts last.pt last: a copy that stops midway leaves no last.pt, so
    training/engine/checkpoint.status (and tune/resume.saved_run) never takes it for complete."""
    from training.engine import checkpoint

    source, dest = tmp_path / "work", tmp_path / "storage"
    source.mkdir()
    for name in ("best.pt", "last.pt", "metrics.json", "val_proba.npy", "val_target.npy", "events.log"):
        (source / name).write_bytes(name.encode())
    (dest / "val_target.npy").mkdir(parents=True)  # this copy fails (IsADirectoryError), as a kill would stop it
    with pytest.raises(OSError):
        compat._link_or_copy_tree(source, dest, checkpoint.LAST)
    assert not (dest / checkpoint.LAST).exists() and (dest / "metrics.json").is_file()
    (dest / "val_target.npy").rmdir()
    compat._link_or_copy_tree(source, dest, checkpoint.LAST)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in source.iterdir())
    assert os.stat(dest / "last.pt").st_ino == os.stat(source / "last.pt").st_ino


def test_a_requeued_trial_is_not_failed_again_by_the_actor_it_was_taken_off():
    """tune_ignores_failures_of_a_replaced_actor: a failure reaching a PENDING trial without an actor
    is dropped; one reaching a trial that has its actor still goes to Tune (here: raised, fail_fast)."""
    from ray.exceptions import ActorUnavailableError
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    compat.tune_ignores_failures_of_a_replaced_actor()
    compat.tune_ignores_failures_of_a_replaced_actor()  # idempotent

    class Controller:
        RAISE = _fail_fast = TuneController.RAISE  # Tune's own handling re-raises: visible here
        _trial_to_actor: dict = {}

    trial = Trial("trainable", stub=True)
    trial.set_status(Trial.PENDING)
    lost = ActorUnavailableError("the actor is unavailable", b"\0" * 16)
    assert TuneController._trial_task_failure(Controller(), trial, lost) is None and trial.num_failures == 0
    Controller._trial_to_actor = {trial: object()}  # its new actor: a real failure, Tune's to handle
    with pytest.raises(ActorUnavailableError):
        TuneController._trial_task_failure(Controller(), trial, lost)
    trial.set_status(Trial.RUNNING)
    Controller._trial_to_actor = {}
    with pytest.raises(ActorUnavailableError):
        TuneController._trial_task_failure(Controller(), trial, lost)
