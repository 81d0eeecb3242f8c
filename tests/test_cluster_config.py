"""Offline checks of cluster.yaml (`ray up cluster.yaml`) and docs/cluster.md.

No network and no cloud: the config goes through the same two Ray functions that
`ray up` applies before it talks to AWS (ray.autoscaler._private.commands.
_bootstrap_config):

* ``prepare_config`` -- merges ray/autoscaler/aws/defaults.yaml (a local file),
  merges setup commands, checks the docker block and fills per-node-type
  min/max_workers. It never imports boto3.
* ``validate_config`` -- jsonschema against the installed Ray's ray-schema.json,
  plus the head_node_type / min_workers checks.

What `ray up` does after that (DescribeInstanceTypes to autodetect resources,
bootstrap_aws: IAM role, key pair, subnets, security groups) needs AWS and is not
exercised here; the tests block sockets and boto3 to prove it.
"""

from __future__ import annotations

import copy
import functools
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
README = REPO / "README.md"
PROJECT_SCRIPTS = ("tune/search.py", "training/final_kfold.py")

GLOBAL_COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
NODE_TYPE_COMMAND_KEYS = ("initialization_commands", "worker_setup_commands")


# --------------------------------------------------------------------------- helpers


def load_cluster_yaml() -> dict:
    assert CLUSTER_YAML.is_file(), f"{CLUSTER_YAML} is missing"
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(cfg, dict), "cluster.yaml must be a YAML mapping"
    return cfg


def ray_check(cfg: dict) -> dict:
    """What `ray up` does to the config before contacting the cloud."""
    from training.infra.compat import validate_cluster_config

    return validate_cluster_config(copy.deepcopy(cfg))


def all_commands(cfg: dict) -> list[str]:
    cmds = [c for key in GLOBAL_COMMAND_KEYS for c in cfg.get(key) or []]
    for node_type in (cfg.get("available_node_types") or {}).values():
        for key in NODE_TYPE_COMMAND_KEYS:
            cmds += node_type.get(key) or []
    return cmds


def worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network or AWS fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for mod in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError


# ------------------------------------------------ 1. Ray's own validation, offline


def test_ray_prepares_and_validates_cluster_yaml(offline):
    prepared = ray_check(load_cluster_yaml())
    assert prepared["provider"]["type"] == "aws"
    # prepare_config filled the per-type limits the autoscaler reads.
    for name, node_type in prepared["available_node_types"].items():
        assert "min_workers" in node_type and "max_workers" in node_type, name


def test_node_types_head_cpu_only_workers_gpu_spot():
    cfg = load_cluster_yaml()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not offer GPUs"
    assert head["resources"].get("CPU") == 0, "head advertises CPU: 0 so no trial is scheduled on it"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"

    workers = worker_types(cfg)
    gpu_counts = sorted(w["resources"].get("GPU", 0) for w in workers.values())
    assert 1 in gpu_counts and 8 in gpu_counts, f"need a 1-GPU and an 8-GPU worker type, got {gpu_counts}"
    for name, w in workers.items():
        assert w["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name
        assert w.get("max_workers", 0) >= 1, f"{name} can never be launched"
        assert w.get("min_workers", 0) <= w["max_workers"], name
    assert cfg.get("idle_timeout_minutes", 0) > 0
    assert cfg["provider"].get("cache_stopped_nodes") is False


@pytest.mark.parametrize("space", sorted(p.name for p in (REPO / "search_spaces").glob("*.yaml")))
def test_trial_resources_fill_every_gpu_worker_type(space):
    """search.resources packs whole trials onto each GPU worker type with no GPU share left idle
    for lack of CPUs (e.g. {cpu: 4, gpu: 0.5} on a 4-vCPU 1-GPU node runs one trial, not two)."""
    res = yaml.safe_load((REPO / "search_spaces" / space).read_text())["search"]["resources"]
    cpu, gpu = float(res["cpu"]), float(res["gpu"])
    assert gpu > 0, f"{space}: search.resources.gpu is {gpu}; the cluster's workers are GPU nodes"
    for name, w in worker_types(load_cluster_yaml()).items():
        node_cpu, node_gpu = w["resources"]["CPU"], w["resources"]["GPU"]
        by_gpu, by_cpu = int(node_gpu / gpu + 1e-9), int(node_cpu / cpu + 1e-9)
        assert by_gpu >= 1, f"{space}: a trial needs {gpu} GPU, {name} has {node_gpu}"
        assert by_cpu >= by_gpu, (
            f"{space}: {name} ({node_cpu:g} CPU, {node_gpu:g} GPU) fits {by_gpu} trials by GPU but only "
            f"{by_cpu} by CPU at search.resources {{cpu: {cpu:g}, gpu: {gpu:g}}}: GPU shares would idle"
        )


def test_every_node_type_pins_a_gpu_driver_ami():
    """Without ImageId Ray falls back to an Ubuntu 18.04 DLAMI whose driver cannot run
    the CUDA 13 torch wheels from requirements.txt."""
    cfg = load_cluster_yaml()
    for name, node_type in cfg["available_node_types"].items():
        ami = str(node_type["node_config"].get("ImageId", ""))
        assert ami.startswith(("ami-", "resolve:ssm:")), f"{name}: set node_config.ImageId ({ami!r})"
        assert ami.lower() != "latest_dlami", name


def test_docker_images_match_requirements():
    from packaging.requirements import Requirement

    cfg = load_cluster_yaml()
    docker = cfg["docker"]
    assert docker.get("container_name"), "docker.container_name is required"
    head_image = docker.get("head_image", docker.get("image"))
    worker_image = docker.get("worker_image", docker.get("image"))
    assert re.fullmatch(r"rayproject/ray(-ml)?:[\d.]+-py\d+-(cpu|gpu|cu\d+)", head_image or ""), head_image
    assert re.fullmatch(r"rayproject/ray(-ml)?:[\d.]+-py\d+-(gpu|cu\d+)", worker_image or ""), (
        f"GPU workers need a GPU image, got {worker_image!r}"
    )
    ray_req = next(
        Requirement(line.split("#")[0].strip())
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if re.match(r"\s*ray(\[|[<>=!~ ]|$)", line)
    )
    for image in (head_image, worker_image):
        version = image.split(":")[1].split("-")[0]
        assert ray_req.specifier.contains(version), (
            f"{image} ships Ray {version}, outside requirements.txt's {ray_req}: "
            "`pip install -r requirements.txt` on the nodes would replace the image's Ray"
        )


def test_start_commands_follow_the_launcher_contract():
    cfg = load_cluster_yaml()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start, (
        "without --autoscaling-config the head never launches workers"
    )
    assert "$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    head_setup = " ".join(cfg["head_setup_commands"])
    assert "boto3" in head_setup, (
        "head_setup_commands replaces Ray's AWS default (`pip install boto3`); "
        "the head's autoscaler needs boto3 to launch workers"
    )
    assert "SEGTUNE_STORAGE=/mnt/shared/" in head_setup
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in head_setup
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-r requirements.txt" in setup
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"], (
        "the shared volume must be visible inside the container"
    )


# -------------------------------------------------- 2. mounted/referenced files exist


def test_file_mount_sources_exist():
    cfg = load_cluster_yaml()
    assert cfg.get("file_mounts"), "cluster.yaml must mount the code"
    for remote, local in cfg["file_mounts"].items():
        src = Path(local).expanduser()
        src = src if src.is_absolute() else REPO / src
        assert src.exists(), f"file_mounts[{remote!r}] = {local!r}: {src} does not exist"
    assert "." in cfg["file_mounts"].values() or str(REPO) in cfg["file_mounts"].values()
    excluded = set(cfg.get("rsync_exclude") or [])
    for must in (".git", ".venv", "mlruns"):
        assert must in excluded, f"rsync_exclude should contain {must!r}"
    assert {"/results/", "results/", "results"} & excluded, "rsync_exclude should contain results/"


_REPO_FILE = re.compile(r"(?<![\w./~$-])((?:[\w-]+/)*[\w-]+\.(?:py|txt|toml|cfg|ini|ya?ml|json))\b")


def _referenced_repo_files(text: str) -> set[str]:
    return {m for m in _REPO_FILE.findall(text) if not m.startswith(("/", "~"))}


def test_files_referenced_by_commands_and_docs_exist():
    cfg = load_cluster_yaml()
    cmds = all_commands(cfg)
    referenced = set()
    for cmd in cmds:
        # Paths under absolute or home dirs are remote paths, not repo files.
        referenced |= _referenced_repo_files(re.sub(r"(?:^|(?<=[\s'\"=:]))[~/$][^\s'\"]*", " ", cmd))
        if re.search(r"pip install[^;&|]*-e \.", cmd):
            assert (REPO / "pyproject.toml").is_file() or (REPO / "setup.py").is_file(), (
                f"`pip install -e .` in {cmd!r} needs pyproject.toml or setup.py at the repo root"
            )
    assert "requirements.txt" in referenced
    if CLUSTER_DOC.is_file():
        referenced |= {inv.script for inv in invocations(CLUSTER_DOC.read_text())}
    referenced |= set(PROJECT_SCRIPTS)
    missing = sorted(p for p in referenced if not (REPO / p).is_file())
    assert not missing, (
        f"cluster.yaml / docs/cluster.md reference files missing from the repo: {missing}"
    )


# ------------------------------------------ 3. commands agree with README and argparse


class Invocation:
    def __init__(self, script: str, args: list[tuple[str, str | None]], line: str):
        self.script, self.args, self.line = script, args, line
        self.flags = [flag for flag, _ in args]

    def key(self) -> tuple[str, tuple[tuple[str, str | None], ...]]:
        """Script and its (flag, value) pairs, order-free: what "the same command" means here."""
        return self.script, tuple(sorted(self.args, key=lambda a: (a[0], a[1] or "")))

    def __repr__(self) -> str:
        return f"Invocation({self.line!r})"


_PY_CALL = re.compile(r"(?:^|[\s'\"(;&|])python[\d.]*\s+(\S+?\.py)\b(.*)")
_SHELL_STOP = re.compile(r"['\"`;|&()<>]")


def invocations(text: str) -> list[Invocation]:
    """`python <...>/search.py|final_kfold.py --flags` calls in shell text."""
    text = re.sub(r"\\\n\s*", " ", text)  # join backslash continuations
    found = []
    for line in text.splitlines():
        m = _PY_CALL.search(line)
        if not m or Path(m.group(1)).name not in {Path(s).name for s in PROJECT_SCRIPTS}:
            continue
        rest = _SHELL_STOP.split(m.group(2), maxsplit=1)[0]
        args: list[tuple[str, str | None]] = []
        for tok in rest.split():
            if tok.startswith("--"):
                flag, eq, value = tok.partition("=")
                args.append((flag, value if eq else None))
            elif args and args[-1][1] is None:
                args[-1] = (args[-1][0], tok)  # the value of the flag before it
        found.append(Invocation(m.group(1), args, line.strip()))
    return found


def code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S))


@functools.lru_cache(maxsize=None)
def help_flags(script: str) -> frozenset[str]:
    path = REPO / script
    if not path.is_file():
        pytest.fail(f"{script} does not exist yet; docs/cluster.md and the README run it")
    proc = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"`python {script} --help` exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return frozenset(re.findall(r"--[A-Za-z0-9][\w-]*", proc.stdout))


def markdown_section(markdown: str, heading: str) -> str:
    """The text under `## heading` up to the next `## ` heading ("" when there is none)."""
    m = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    return m.group(1) if m else ""


_CLUSTER_HEAD_BLOCK = re.compile(r"as they run on a cluster head[^\n]*\n+(```[^\n]*\n.*?^```)", re.M | re.S)


def readme_cluster_text() -> str:
    """The README's cluster commands: its "## Cluster" section and the block of commands
    "as they run on a cluster head"."""
    if not README.is_file():
        pytest.fail("README.md does not exist yet; docs/cluster.md must match its commands")
    text = README.read_text()
    section = markdown_section(text, "Cluster")
    assert section, "README.md has no `## Cluster` section"
    head_block = _CLUSTER_HEAD_BLOCK.search(text)
    return code_blocks(section) + "\n" + (code_blocks(head_block.group(1)) if head_block else "")


def readme_invocations() -> list[Invocation]:
    return invocations(readme_cluster_text())


def test_cluster_doc_runs_the_readme_commands():
    """Every `python tune/search.py|training/final_kfold.py ...` that docs/cluster.md or
    cluster.yaml runs is a README cluster command: same script, same flags, same values."""
    assert CLUSTER_DOC.is_file(), "docs/cluster.md is missing"
    readme = readme_invocations()
    doc = invocations(CLUSTER_DOC.read_text()) + invocations("\n".join(all_commands(load_cluster_yaml())))
    for script in PROJECT_SCRIPTS:
        assert any(i.script == script for i in readme), (
            f"README.md's cluster commands show no `python {script} ...` in a code block"
        )
        assert any(i.script == script for i in doc), f"docs/cluster.md never runs `python {script}`"

    readme_keys = {i.key() for i in readme}
    for inv in doc:
        assert inv.key() in readme_keys, (
            f"docs/cluster.md runs a command that is not one of README.md's cluster commands:\n"
            f"  {inv.line}\nREADME.md has:\n  " + "\n  ".join(i.line for i in readme if i.script == inv.script)
        )
    for inv in readme + doc:
        unknown = set(inv.flags) - help_flags(inv.script)
        assert not unknown, f"`python {inv.script} --help` has no flag(s) {sorted(unknown)}: {inv.line}"


def test_readme_cluster_section_matches_cluster_yaml():
    """The tunnels and the tracking URI in the README are the ports cluster.yaml binds."""
    section = markdown_section(README.read_text(), "Cluster")
    assert section, "README.md has no `## Cluster` section"
    cfg = load_cluster_yaml()
    cmds = " ".join(all_commands(cfg))
    mlflow_port = re.search(r"\bmlflow server\b.*?--port[ =](\d+)", cmds).group(1)
    dashboard_port = (re.search(r"--dashboard-port[ =](\d+)", cmds) or [None, "8265"])[1]
    tracking_uri = re.search(r"MLFLOW_TRACKING_URI=(\S+?)['\"]?(?:\s|$)", " ".join(cfg["head_setup_commands"])).group(1)
    block = code_blocks(section)
    for must in ("ray up cluster.yaml", "ray dashboard cluster.yaml", f"ray attach cluster.yaml -p {mlflow_port}",
                 f"--address http://127.0.0.1:{dashboard_port}", f'"MLFLOW_TRACKING_URI": "{tracking_uri}"'):
        assert must in block, f"README.md's Cluster commands lack {must!r} (cluster.yaml: MLflow :{mlflow_port}, {tracking_uri})"
    assert "ray job submit" in block and "docs/cluster.md" in section
    for word in ("setup_commands", "GCP", "Azure", "KubeRay"):
        assert word in section, f"README.md's Cluster section does not mention {word}"


def test_invocation_parser():
    text = (
        "ray exec cluster.yaml --tmux 'cd ~/segtune && MLFLOW_TRACKING_URI=http://127.0.0.1:5000 "
        "python tune/search.py --space deeplab --data=/data/trash --address auto'\n"
        "ray job submit --working-dir . -- python training/final_kfold.py \\\n  --data /data/trash\n"
        "python other.py --x\n"
    )
    got = [(i.script, i.args) for i in invocations(text)]
    assert got == [
        ("tune/search.py", [("--space", "deeplab"), ("--data", "/data/trash"), ("--address", "auto")]),
        ("training/final_kfold.py", [("--data", "/data/trash")]),
    ]
    a, b = invocations("python tune/search.py --address auto --space deeplab\npython tune/search.py --space=deeplab --address auto")
    assert a.key() == b.key()  # order and `=` do not matter
    c, d = invocations("python tune/search.py --space deeplab --smoke\npython tune/search.py --space unet --smoke")
    assert c.key() != d.key() and c.args[-1] == ("--smoke", None)


def test_markdown_section():
    text = "# t\n## MLflow\nm\n## Cluster\nc1\n```bash\nray up cluster.yaml\n```\n## Measured figures\nx\n"
    assert markdown_section(text, "Cluster") == "c1\n```bash\nray up cluster.yaml\n```\n"
    assert markdown_section(text, "Clusters") == ""


# ---------------------------------------------------------- 4. invalid configs fail


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(max_workers="lots"), ["max_workers", "'lots' is not of type 'integer'"]),
        (lambda c: c.update(max_worker=4), ["Additional properties are not allowed", "'max_worker'"]),
        (
            lambda c: c["available_node_types"]["gpu_1x"].update(InstanceType="g5.xlarge"),
            ["'InstanceType' was unexpected", "gpu_1x"],
        ),
        (
            lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5),
            ["0.5 is not of type 'integer'", "GPU"],
        ),
        (lambda c: c["docker"].update(shm_size="8g"), ["'shm_size' was unexpected", "docker"]),
    ],
    ids=["max_workers-not-int", "unknown-top-level-key", "key-outside-node_config", "fractional-gpu",
         "unknown-docker-key"],
)
def test_ray_rejects_invalid_fields_by_name(offline, mutate, expected):
    import jsonschema

    cfg = load_cluster_yaml()
    assert "gpu_1x" in cfg["available_node_types"], "test assumes a worker type named gpu_1x"
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError) as err:
        ray_check(cfg)
    message = str(err.value)
    for text in expected:
        assert text in message, f"{text!r} not in Ray's error:\n{message}"


def test_head_node_type_must_exist(offline):
    cfg = load_cluster_yaml()
    cfg["head_node_type"] = "no_such_type"
    with pytest.raises((ValueError, KeyError), match="head_node_type|no_such_type"):
        ray_check(cfg)


# ------------------------------------------------------- 5. no secrets, loopback binds

# Checked in every git-tracked text file.
_REPO_SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS key field with a value": re.compile(
        r"aws_(access_key_id|secret_access_key|session_token)['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}", re.I
    ),
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    "credentials in a URI": re.compile(r"://[^/\s:@'\"<]+:(?![$<{*])[^/\s@'\"<]+@"),
}
# cluster.yaml and docs/cluster.md: also no AWS key fields at all and no literal passwords/tokens.
_SECRET_PATTERNS = {
    **_REPO_SECRET_PATTERNS,
    "AWS key field": re.compile(r"aws_(access_key_id|secret_access_key|session_token)", re.I),
    "literal password/secret/token": re.compile(
        r"\b[\w-]*(password|passwd|secret|token)[\w-]*\s*[:=]\s*['\"]?(?![$<{'\"\s])\S+", re.I
    ),
}


def secret_hits(text: str, patterns: dict[str, re.Pattern]) -> list[str]:
    return [f"{name}: {m.group(0)!r}" for name, pattern in patterns.items() for m in pattern.finditer(text)]


def tracked_text_files() -> list[Path]:
    """Every file `git ls-files` lists that is text (no NUL byte, UTF-8)."""
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"`git ls-files` failed in {REPO}: {proc.stderr.strip()}")
    files = []
    for name in filter(None, proc.stdout.split("\0")):
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


@pytest.mark.parametrize("path", [CLUSTER_YAML, CLUSTER_DOC], ids=lambda p: p.name)
def test_no_secrets(path):
    assert path.is_file(), f"{path} is missing"
    hits = secret_hits(path.read_text(), _SECRET_PATTERNS)
    assert not hits, f"{path.name} looks like it contains credentials: {hits}"


def test_no_secrets_in_any_tracked_file():
    files = tracked_text_files()
    assert CLUSTER_YAML in files and Path(__file__).resolve() in files, "git ls-files misses the repo's own files"
    hits = {str(p.relative_to(REPO)): h for p in files if (h := secret_hits(p.read_text("utf-8"), _REPO_SECRET_PATTERNS))}
    assert not hits, f"tracked files look like they contain credentials: {hits}"


def test_secret_patterns_catch_credentials():
    """The scanners find what they are for (built here so this file holds no such strings)."""
    key_id = "AKIA" + "Q" * 16
    samples = {
        "AWS access key id": f"aws configure set aws_access_key_id {key_id}",
        "AWS key field with a value": "aws_secret_access_key = " + "a1B2/c3D4+e5F6g7H8i9" * 2,
        "private key": "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=",
        "credentials in a URI": "--backend-store-uri postgresql://mlflow:" + "hunter2" + "@db:5432/mlflow",
    }
    for name, text in samples.items():
        assert any(h.startswith(name + ":") for h in secret_hits(text, _REPO_SECRET_PATTERNS)), (name, text)
    harmless = ("postgresql://mlflow@<rds-host>:5432/mlflow with the password in ~/.pgpass; "
                "postgresql://mlflow:${PGPASSWORD}@db/mlflow; aws_access_key_id comes from aws configure")
    assert not secret_hits(harmless, _REPO_SECRET_PATTERNS), secret_hits(harmless, _REPO_SECRET_PATTERNS)


def test_no_key_names_or_private_keys_in_config():
    cfg = load_cluster_yaml()
    assert "ssh_private_key" not in (cfg.get("auth") or {})
    assert "credentials" not in str(cfg.get("provider")).lower()
    for name, node_type in cfg["available_node_types"].items():
        assert "KeyName" not in node_type["node_config"], f"{name}: leave KeyName to Ray"


def test_dashboard_and_mlflow_bind_to_loopback():
    cfg = load_cluster_yaml()
    cmds = all_commands(cfg)
    assert not [c for c in cmds if "0.0.0.0" in c], "no command may bind to 0.0.0.0"

    head_start = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert head_start and all("--dashboard-host=127.0.0.1" in c for c in head_start)

    mlflow = [c for c in cmds if re.search(r"\bmlflow server\b", c)]
    assert mlflow, "cluster.yaml should start the MLflow tracking server on the head"
    for cmd in mlflow:
        hosts = re.findall(r"(?:--host|-h)[ =](\S+)", cmd)
        assert hosts == ["127.0.0.1"], f"MLflow must bind to 127.0.0.1 only: {cmd}"
        assert "--port 5000" in cmd or "--port=5000" in cmd
        assert "--serve-artifacts" in cmd and "--backend-store-uri" in cmd

    # Nothing opened to the outside beyond Ray's default SSH rule.
    for rule in (cfg["provider"].get("security_group") or {}).get("IpPermissions", []):
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 0) + 1))
        assert not ports & {5000, 6379, 8265}, f"security group opens a service port: {rule}"
    docker = cfg.get("docker") or {}
    run_options = " ".join(
        str(o) for key in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(key, [])
    )
    assert not re.search(r"(^|\s)(-p|--publish)[\s=]", run_options), "containers publish no ports"
