"""The TensorRT engine cache on a volume that replicas share: reuse, rebuild, and one builder at a time.

An engine runs only on the TensorRT version and GPU it was built for, so every engine has a JSON sidecar
(export/tensorrt.py) and is reused only when the sidecar matches this node and this ONNX. A missing match is
built under an exclusive file lock; a replica that waited on the lock looks again before building, so two
replicas starting together build once. Nothing here imports TensorRT: the build is a callable.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from export.tensorrt import EngineSidecar, engine_matches, sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """What an engine must have been built for: this node's TensorRT and GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    @property
    def tag(self) -> str:
        """A file-name part per node kind: GPU models with one compute capability share a cache volume."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower().removeprefix("nvidia ")).strip("-")
        return f"{gpu}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt_version}"


@dataclass(frozen=True)
class Want:
    onnx: Path
    onnx_sha256: str
    precision: str
    max_batch_size: int

    @classmethod
    def of(cls, onnx: Path, precision: str, max_batch_size: int) -> Want:
        return cls(onnx, sha256(onnx), precision, max_batch_size)


def mismatch(sidecar: EngineSidecar, node: Node, want: Want) -> str | None:
    """Why an engine described by `sidecar` cannot serve here, or None when it can."""
    ok, why = engine_matches(sidecar, node.tensorrt_version, node.compute_capability, want.onnx_sha256)
    if not ok:
        return why
    # Same compute capability is not enough: TensorRT tunes kernels per GPU model and warns across models.
    if sidecar.gpu_name != node.gpu_name:
        return f"built on {sidecar.gpu_name}, this GPU is {node.gpu_name}"
    if sidecar.precision != want.precision:
        return f"precision {sidecar.precision}, wanted {want.precision}"
    if sidecar.profile.get("max", 0) < want.max_batch_size:
        return f"profile max batch {sidecar.profile.get('max')}, wanted {want.max_batch_size}"
    return None


def engine_path(cache_dir: Path, node: Node, want: Want) -> Path:
    """Where this node builds its engine: one name per ONNX, precision, batch, GPU model and TensorRT."""
    return cache_dir / f"{want.onnx.stem}-{want.precision}-b{want.max_batch_size}-{node.tag}.engine"


def find_engine(cache_dir: Path, node: Node, want: Want) -> tuple[Path | None, list[str]]:
    """A cached engine that serves here (the exact name first), and why each other candidate was passed over."""
    preferred = engine_path(cache_dir, node, want)
    candidates = sorted(cache_dir.glob(f"{want.onnx.stem}-*.engine"), key=lambda p: p != preferred)
    rejected = []
    for engine in candidates:
        try:
            sidecar = EngineSidecar.read(engine)
        except FileNotFoundError:
            rejected.append(f"{engine.name}: no sidecar (a build that did not finish)")
            continue
        except (ValueError, TypeError) as err:
            rejected.append(f"{engine.name}: unreadable sidecar ({err})")
            continue
        why = mismatch(sidecar, node, want)
        if why is None:
            return engine, rejected
        rejected.append(f"{engine.name}: {why}")
    return None, rejected


@contextmanager
def file_lock(path: Path, timeout_s: float | None = None, poll_s: float = 0.5) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed). The kernel drops it if the holder dies, so a killed
    builder never leaves a stale lock behind. Raises TimeoutError after `timeout_s` (None: wait forever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        start, announced = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not announced:
                log.info("waiting for %s: another process (replica) holds it", path)
                announced = True
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f} s (another replica still building?)")
            time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


Build = Callable[[Path, Path], object]  # (onnx, engine path to write, with its sidecar) -> anything


def ensure_engine(cache_dir: Path, node: Node, want: Want, build: Build, lock_timeout_s: float | None = None) -> Path:
    """The engine to serve: a matching cached one, else one built now (at most one builder per engine)."""
    engine, rejected = find_engine(cache_dir, node, want)
    if engine:
        log.info("engine cache: reusing %s", engine)
        return engine
    target = engine_path(cache_dir, node, want)
    with file_lock(target.with_name(target.name + ".lock"), lock_timeout_s):
        engine, rejected = find_engine(cache_dir, node, want)  # built by the replica we waited for?
        if engine:
            log.info("engine cache: another replica built %s while this one waited", engine)
            return engine
        log.info(
            "engine cache: building %s for %s (%s); minutes, once per GPU model and TensorRT version",
            target,
            node.gpu_name,
            "; ".join(rejected) or "no cached engine",
        )
        # Build beside the target and rename: readers never see half an engine; the sidecar lands last.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # not *.engine: never a candidate
        try:
            build(want.onnx, tmp)
            os.replace(tmp, target)
            os.replace(f"{tmp}.json", f"{target}.json")
        finally:
            for leftover in (tmp, Path(f"{tmp}.json")):
                leftover.unlink(missing_ok=True)
    return target
