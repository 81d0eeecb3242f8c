"""Ray for every stage: join a cluster or start a local instance on 127.0.0.1, one resource policy, errors as one line."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from training.errors import SegtuneError
from training.infra import compat

Log = Callable[[str], None]


@dataclass
class RaySession:
    """The Ray this process uses; `started`: we started a local one (and shut it down)."""

    started: bool
    address: str | None

    @property
    def local(self) -> bool:
        """A machine of its own: nothing can join, so requests must fit what is here."""
        return self.address is None

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


@contextmanager
def held_interrupts() -> Iterator[list]:
    """Ctrl-C inside the block is recorded, not raised: raised in the middle of ray.init, while
    it forks Ray's processes, it can leave a lock (logging's) held and hang the exit."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def connect(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None, log: Log = print,
            preload: tuple[str, ...] = (), workers: int | None = None) -> RaySession:
    """Join `address` (or RAY_ADDRESS), else start a local Ray bound to 127.0.0.1 only.

    preload, workers: a local Ray's idle workers, started as it comes up, import `preload`
    before taking work; `workers` of them (default: one per CPU). See compat.local_init_kwargs
    and compat.raylet_prestarts.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        compat.keep_local_ray_on_loopback()  # before `import ray` where possible
    import ray

    compat.check_ray_version()
    if ray.is_initialized():
        return RaySession(started=False, address=address)
    if address:
        ray.init(address=address, log_to_driver=True)
        log(f"ray: joined the cluster at {address}")
        return RaySession(started=False, address=address)
    with held_interrupts() as interrupted, compat.raylet_prestarts(workers if preload else None):
        ray.init(**compat.local_init_kwargs(num_cpus or os.cpu_count(), temp_dir, preload, workers))
    if interrupted:
        ray.shutdown()
        raise KeyboardInterrupt
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise SegtuneError(f"ray: the local instance bound to {node_ip}, not 127.0.0.1 (is {compat.LOOPBACK_ENV}=1 set?)")
    log(f"ray: local instance on 127.0.0.1 ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
    return RaySession(started=True, address=None)


def fit_resources(cpu: float, gpu: float, session: RaySession, log: Log, what: str = "trials") -> tuple[float, float]:
    """(cpu, gpu) per task or trial: the one resource policy of every stage.

    On a local Ray a request no node can ever meet would wait forever, so it is shrunk to the
    largest node (no GPU: CPU only), with a note. A joined cluster keeps the request as
    written: right after `ray up` it is only the head, and the autoscaler adds the workers
    that fit it.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    has_gpu = any(n.get("GPU", 0.0) >= min(gpu, 1.0) for n in nodes) if gpu else True
    if not session.local:
        if cpu > max_cpu or not has_gpu:
            log(f"note: no Ray node has {cpu:g} CPU + {gpu:g} GPU free yet; {what} wait for the autoscaler to add workers")
        return cpu, gpu
    fitted = (min(cpu, max_cpu) if max_cpu else cpu, gpu if has_gpu else 0.0)
    if fitted != (cpu, gpu):
        log(f"note: this machine cannot give {what} {cpu:g} CPU + {gpu:g} GPU; running them with {fitted[0]:g} CPU + {fitted[1]:g} GPU")
    return fitted


def error_line(err: BaseException) -> str:
    """What a failed task or trial raised, as one line: the user error's message, or `Type: first line`."""
    cause = getattr(err, "cause", None) or err
    name = type(cause).__name__
    if name in ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError", "OwnerDiedError"):
        return f"{name}: the worker process died"
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if isinstance(cause, SegtuneError):
        return lines[-1] if lines else name
    message = lines[-1] if name in ("TuneError", "RayTaskError") and lines else (lines[0] if lines else "")
    if name in ("TuneError", "RayTaskError") and ":" in message:
        return message[:300]
    return f"{name}: {message}"[:300]


def put_once(cache: dict[int, Any], obj: Any):
    """The object store reference of `obj`, put once however many tasks take it."""
    import ray

    if id(obj) not in cache:
        cache[id(obj)] = (obj, ray.put(obj))
    return cache[id(obj)][1]
