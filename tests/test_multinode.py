"""A two-node Ray cluster on 127.0.0.1 (`ray start --head` + a second `ray start --address`, each
with its own resources and temp dir): a smoke search runs trials on both nodes, the second
node's raylet is killed with SIGKILL while one of its trials runs, and the search still accounts
for every trial (that one retried on the head); the node comes back and a smoke k-fold spreads
its folds over both nodes.

Loopback only. Ray 2.60 turns 127.0.0.1 into the machine's outward address (services.
resolve_ip_for_localhost) for `ray start --node-ip-address`, `ray start --address` and
`ray.init(address=...)`, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its single-machine mode),
in which `ray start` refuses to start a non-head node. So:
* the head, the search and k-fold drivers and the probes run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
  the head's node address is 127.0.0.1 and its GCS and raylet listen on 127.0.0.1 only (Ray binds
  to loopback only when the node address is exactly 127.0.0.1; 127.0.0.2 would listen on all
  interfaces);
* the second `ray start` runs with the multi-node guard on (=1), joins through
  [::ffff:127.0.0.1]:PORT (the head's GCS socket, in a form Ray does not rewrite), and
  RAY_START_HOOK=training.infra.compat.ray_start_on_loopback sets its node address back to 127.0.0.1 after
  Ray's rewrite.
The test checks the result: both nodes report 127.0.0.1 and every TCP socket that the nodes, their
workers and the search driver listen on is a loopback address.

The test stops every process it started, by pid (`ray start --block` takes its node down on SIGTERM).
"""

from __future__ import annotations

import ipaddress
import json
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
COMMON = ["--object-store-memory=100000000", "--disable-usage-stats", "--block"]


def start_worker_node(port: int, env: dict, log, temp_dir: Path) -> subprocess.Popen:
    """The second node, on 127.0.0.1 (see the module docstring)."""
    node_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_START_HOOK="training.infra.compat.ray_start_on_loopback")
    return subprocess.Popen([RAY, "start", f"--address=[::ffff:127.0.0.1]:{port}", '--resources={"node2": 1}', f"--temp-dir={temp_dir}", "--num-cpus=1", *COMMON],
                            env=node_env, stdout=log, stderr=subprocess.STDOUT)


def alive_nodes(address: str, env: dict) -> list[dict]:
    probe = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
             "print(json.dumps([{k: n[k] for k in ('NodeID', 'NodeManagerAddress', 'Resources')} for n in ray.nodes() if n['Alive']]))")
    proc = subprocess.run([PYTHON, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket held by `pids` (/proc/net/tcp, tcp6)."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[len("socket:["):-1]] = pid
        except OSError:  # the process ended meanwhile
            continue
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, host order
            found.append((owner[inode], str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def assert_loopback_only(procs: list[subprocess.Popen], gcs_port: int) -> list[tuple[int, str, int]]:
    pids = {p.pid for p in procs} | {pid for p in procs for pid, _ in descendants(p.pid)}
    sockets = listening_sockets(pids)
    assert any(port == gcs_port for _, _, port in sockets), f"the head's GCS port {gcs_port} is not among {sockets}"
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"
    return sockets


def live_trial_on(node_tmp: Path, node_id: str) -> dict | None:
    """A trial running on the node whose temp dir is `node_tmp`, at a point where it is sure to
    keep running: started on `node_id` and not yet reported (ASHA cannot stop it before its
    first report) or past epoch 3 (no ASHA rung; max_t 4). Read from the trainer's live
    events.log in the trial's working dir on that node."""
    for log in node_tmp.glob("session_*/artifacts/**/trainer-*/events.log"):
        try:
            lines = log.read_text().splitlines()
        except OSError:  # the trial ended and removed it
            continue
        starts = [dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv) for line in lines if line.split()[1:2] == ["start"]]
        epochs = [int(line.split()[2]) for line in lines if line.split()[1:2] == ["epoch"]]
        if starts and starts[-1].get("node") == node_id and (not epochs or epochs[-1] == 3):
            return {"trial_id": starts[-1]["trial"], "last_epoch": epochs[-1] if epochs else 0}
    return None


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


def cluster_env(tmp_path: Path) -> dict:
    """Token auth on; Ray's single-machine mode keeps the head and the drivers on 127.0.0.1 (docstring)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               SEGTUNE_RESULTS=str(tmp_path / "results"))
    env.pop("RAY_ADDRESS", None)
    return env


def start_head(port: int, env: dict, log, num_cpus: int = 1) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={short_tmp('rh')}", f"--num-cpus={num_cpus}", *COMMON], env=env, stdout=log, stderr=subprocess.STDOUT)


def start_smoke_search(data: Path, experiment: str, trials: int, address: str, tmp_path: Path, env: dict, out) -> subprocess.Popen:
    return subprocess.Popen(
        search_cmd("--space", "deeplab", "--smoke", "--num-samples", str(trials), "--data", str(data), "--experiment", experiment,
                   "--address", address, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
    )


def interrupt(search: subprocess.Popen | None) -> None:
    """Ctrl-C a search still running (it ends its trials), then kill it if it hangs."""
    if search is not None and search.poll() is None:
        search.send_signal(signal.SIGINT)
        try:
            search.wait(timeout=30)
        except subprocess.TimeoutExpired:
            search.kill()


def trial_nodes(tune_dir: Path) -> dict[str, set[str]]:
    """trial dir name -> node ids its attempts started on (from the trainable's events.log)."""
    return {d.name: {f["node"] for _, kind, f in events(d) if kind == "start"} for d in tune_dir.glob("trial_*")}


def test_search_and_kfold_across_two_nodes_survive_a_lost_node(tmp_path):
    data = write_camvid_subset(tmp_path / "camvid24", n_train=24, n_test=3)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = cluster_env(tmp_path)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "node2", "node2b")}
    head = start_head(port, env, logs["head"])
    node2 = node2b = search = None
    node2_tmp = short_tmp("rw")
    exp = tmp_path / "results" / "lost"
    try:
        wait_for_nodes(address, 1, env)
        node2 = start_worker_node(port, env, logs["node2"], node2_tmp)
        wait_for_nodes(address, 2, env)
        nodes = alive_nodes(address, env)
        assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}, nodes
        head_id = next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])
        node2_id = next(n["NodeID"] for n in nodes if "node2" in n["Resources"])
        assert_loopback_only([head, node2], port)

        # ---- search: trials on both nodes, then the second node dies ---------------------------
        search_log = tmp_path / "search.log"
        with open(search_log, "w") as out:
            search = start_smoke_search(data, "lost", 4, address, tmp_path, env, out)
            deadline = time.time() + 400
            nodes_seen: set[str] = set()
            running = None
            while time.time() < deadline and search.poll() is None:
                if len(nodes_seen) < 2:  # first: both nodes have checkpointed trial epochs to storage
                    started = trial_nodes(exp / "tune")
                    nodes_seen = set().union(*started.values()) if started else set()
                if len(nodes_seen) == 2 and (running := live_trial_on(node2_tmp, node2_id)):
                    break
                time.sleep(0.2)
            assert nodes_seen == {head_id, node2_id}, f"trials never ran on both nodes ({nodes_seen}):\n" + tail(search_log)
            assert running, "no trial was running on the second node:\n" + tail(search_log)
            assert_loopback_only([head, node2, search], port)  # now with trial workers on both nodes
            os.kill(raylet_of(node2), signal.SIGKILL)  # SIGKILL: the node is lost mid-search, like a reclaimed spot instance
            killed_at = time.time()
            search.wait(timeout=500)
        assert search.returncode == 0, tail(search_log)
        board = read_leaderboard(exp / "leaderboard.csv")
        assert len(board) == 4, board  # every trial accounted for
        assert all(row["status"] in FINISHED for row in board), [row["status"] for row in board]
        after_kill = {f["node"] for d in (exp / "tune").glob("trial_*") for t, kind, f in events(d) if kind == "start" and t > killed_at}
        assert after_kill == {head_id}, after_kill  # every trial started after the loss ran on the surviving head
        # The trial the lost node was running was retried on the head from its last checkpoint
        # (none yet: from the start) and finished. Usually that is `running`; at 1 s per epoch it
        # may have ended just before the kill landed and another trial have started there, so the
        # lost trial is the one that failed. It may fail twice (--smoke allows 2 retries, as the
        # default does): until the head declares the node dead, a retry can still be sent there
        # (seen in CI: ActorUnavailableError on the retry, then "error" with 1 retry allowed).
        failed = [row for row in board if int(row["failures"]) >= 1]
        assert len(failed) == 1, board
        lost = failed[0]
        assert lost["status"] in FINISHED, lost
        trial_events = events(exp / "tune" / f"trial_{lost['trial_id']}")
        retries = [f for t, kind, f in trial_events if kind == "start" and t > killed_at]
        assert [f["node"] for f in retries] == [head_id], retries
        last = max((int(f["epoch"]) for t, kind, f in trial_events if kind == "epoch" and t <= killed_at), default=0)
        if lost["trial_id"] == running["trial_id"]:
            last = max(last, running["last_epoch"])
        assert max(0, last - 1) <= int(retries[0]["resume_epoch"]) <= last, (running, lost, retries)

        # ---- the node comes back; the k-fold spreads its folds over both nodes --------------------
        node2.wait(timeout=60)  # `ray start --block` exits once its raylet is gone
        node2b = start_worker_node(port, env, logs["node2b"], short_tmp("rw"))
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
        interrupt(search)
        for proc in (node2b, node2, head):
            stop(proc)
        for f in logs.values():
            f.close()


def test_search_on_a_cluster_without_workers_waits_for_one(tmp_path):
    """Right after `ray up` the cluster is only its head, which advertises CPU: 0 (cluster.yaml):
    a joined search keeps its trial resources (no shrinking to what is there), says it waits for
    workers, starts no trial until one joins, and then runs every trial on that worker."""
    data = write_camvid_subset(tmp_path / "camvid16", n_train=16, n_test=2)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = cluster_env(tmp_path)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "worker")}
    head = start_head(port, env, logs["head"], num_cpus=0)  # the head cluster.yaml gives: CPU 0
    worker = search = None
    exp = tmp_path / "results" / "autoscale"
    search_log = tmp_path / "search.log"
    try:
        wait_for_nodes(address, 1, env)
        with open(search_log, "w") as out:
            search = start_smoke_search(data, "autoscale", 2, address, tmp_path, env, out)
            deadline = time.time() + 180
            while time.time() < deadline and search.poll() is None and "trials wait for the autoscaler" not in search_log.read_text():
                time.sleep(0.5)
            assert "trials wait for the autoscaler" in search_log.read_text(), tail(search_log)
            time.sleep(15)  # Tune has had time to place a trial, were there anywhere to place it
            assert search.poll() is None, "the search ended on a cluster with no worker:\n" + tail(search_log)
            assert not set().union(*trial_nodes(exp / "tune").values()), "a trial started with no CPU in the cluster"

            worker = start_worker_node(port, env, logs["worker"], short_tmp("rw"))  # what the autoscaler would add
            wait_for_nodes(address, 2, env)
            worker_id = next(n["NodeID"] for n in alive_nodes(address, env) if "node2" in n["Resources"])
            search.wait(timeout=400)
        assert search.returncode == 0, tail(search_log)
        board = read_leaderboard(exp / "leaderboard.csv")
        assert len(board) == 2 and all(row["status"] in FINISHED for row in board), board
        assert set().union(*trial_nodes(exp / "tune").values()) == {worker_id}
    finally:
        interrupt(search)
        for proc in (worker, head):
            stop(proc)
        for f in logs.values():
            f.close()
