"""A two-node Ray cluster on 127.0.0.1 (`ray start --head` + a second `ray start --address`, each
with its own resources and temp dir): a smoke search runs trials on both nodes, the second
node's raylet is killed with SIGKILL mid-search and the search still accounts for every trial;
the node comes back and a smoke k-fold spreads its folds over both nodes.

The test stops every process it started, by pid (`ray start --block` takes its node down on SIGTERM).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, write_camvid_subset
from services import free_port
from test_search import FINISHED, events, read_leaderboard, search_cmd, short_tmp, tail, wait_for_nodes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RAY = str(Path(PYTHON).parent / "ray")
COMMON = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats", "--block"]


def start_worker_node(address: str, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", f"--address={address}", '--resources={"node2": 1}', f"--temp-dir={short_tmp('rw')}", *COMMON],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every process below `pid`, read from /proc."""
    parent_of, name_of = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name_of[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parent_of[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parent_of.items():
            if parent == current:
                found.append((child, name_of[child]))
                frontier.append(child)
    return found


def raylet_of(node: subprocess.Popen) -> int:
    raylets = [pid for pid, name in descendants(node.pid) if name == "raylet"]
    assert len(raylets) == 1, descendants(node.pid)
    return raylets[0]


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def trial_nodes(tune_dir: Path) -> dict[str, set[str]]:
    """trial dir name -> node ids its attempts started on (from the trainable's events.log)."""
    return {d.name: {f["node"] for _, kind, f in events(d) if kind == "start"} for d in tune_dir.glob("trial_*")}


def test_search_and_kfold_across_two_nodes_survive_a_lost_node(tmp_path):
    data = write_camvid_subset(tmp_path / "camvid24", n_train=24, n_test=3)
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray 2.60 maps 127.0.0.1 to this machine's address for multi-node clusters; token auth on.
    env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", SEGTUNE_RESULTS=str(tmp_path / "results"))
    env.pop("RAY_ADDRESS", None)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "node2", "node2b")}
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={short_tmp('rh')}", *COMMON], env=env, stdout=logs["head"], stderr=subprocess.STDOUT)
    node2 = node2b = search = None
    exp = tmp_path / "results" / "lost"
    try:
        wait_for_nodes(address, 1, env)
        node2 = start_worker_node(address, env, logs["node2"])
        wait_for_nodes(address, 2, env)

        # ---- search: trials on both nodes, then the second node dies ---------------------------
        search_log = tmp_path / "search.log"
        with open(search_log, "w") as out:
            search = subprocess.Popen(
                search_cmd("--space", "deeplab", "--smoke", "--num-samples", "4", "--data", str(data), "--experiment", "lost",
                           "--address", address, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
            deadline = time.time() + 400
            nodes_seen: set[str] = set()
            while time.time() < deadline and search.poll() is None:
                started = trial_nodes(exp / "tune")
                nodes_seen = set().union(*started.values()) if started else set()
                if len(nodes_seen) == 2:
                    break
                time.sleep(0.2)
            assert len(nodes_seen) == 2, "trials never ran on both nodes:\n" + tail(search_log)
            os.kill(raylet_of(node2), signal.SIGKILL)  # SIGKILL: the node is lost mid-search, like a reclaimed spot instance
            killed_at = time.time()
            search.wait(timeout=500)
        assert search.returncode == 0, tail(search_log)
        board = read_leaderboard(exp / "leaderboard.csv")
        assert len(board) == 4, board  # every trial accounted for
        assert all(row["status"] in FINISHED for row in board), [row["status"] for row in board]
        after_kill = {f["node"] for d in (exp / "tune").glob("trial_*") for t, kind, f in events(d) if kind == "start" and t > killed_at}
        assert after_kill and len(after_kill) == 1, after_kill  # retried trials ran on the surviving head node

        # ---- the node comes back; the k-fold spreads its folds over both nodes --------------------
        node2.wait(timeout=60)  # `ray start --block` exits once its raylet is gone
        node2b = start_worker_node(address, env, logs["node2b"])
        wait_for_nodes(address, 2, env)
        kfold_log = tmp_path / "kfold.log"
        with open(kfold_log, "w") as out:
            kfold = subprocess.run([PYTHON, "training/final_kfold.py", "--experiment", "lost", "--smoke", "--epochs", "1", "--tta", "none",
                                    "--address", address], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=500)
        assert kfold.returncode == 0, tail(kfold_log)
        fold_nodes = re.findall(r"fold \d+: trained on node (\w+)", kfold_log.read_text())
        assert len(fold_nodes) == 5 and len(set(fold_nodes)) == 2, kfold_log.read_text()[-3000:]
        assert (exp / "kfold" / "submission.csv").is_file()
    finally:
        if search is not None and search.poll() is None:
            search.send_signal(signal.SIGINT)
            try:
                search.wait(timeout=30)
            except subprocess.TimeoutExpired:
                search.kill()
        for proc in (node2b, node2, head):
            stop(proc)
        for f in logs.values():
            f.close()
