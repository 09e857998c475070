"""The container's start (docker/entrypoint): check the environment, pick the model, then serve in this process
(PID 1, so SIGTERM reaches uvicorn's drain).

The ONNX export and the TensorRT engine build happen inside `serve` while it already answers /healthz and
/readyz says 503, so probes see a live, not-ready server during a build (service/engine_cache.py).
Configuration errors exit 2 with one line that names the variable, instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from pydantic import ValidationError

from service.settings import ServeSettings

PREFIX = "MASKFORMER_"
# The container's own variables, beside ServeSettings' (name: default).
CONTAINER_VARS = {
    "MASKFORMER_MODEL_DIR": "/models",  # a mounted model volume: registry.json, or one .safetensors
    "MASKFORMER_WEIGHTS_DIR": "(the bundled weights/)",  # read by model/checkpoint.py: the default model's registry
}


class ConfigError(ValueError):
    pass


def setting_vars() -> set[str]:
    return {PREFIX + name.upper() for name in ServeSettings.model_fields}


def check_names(environ: Mapping[str, str]) -> None:
    """A misspelt MASKFORMER_* variable would be ignored silently; refuse it instead."""
    known = setting_vars() | set(CONTAINER_VARS)
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in known)
    if "MASKFORMER_SERVICE_HOST" in environ:  # Kubernetes' service links for a Service named maskformer
        raise ConfigError(
            f"Kubernetes service-link variables ({', '.join(unknown)}) collide with the settings "
            "(MASKFORMER_PORT=tcp://...); set enableServiceLinks: false in the pod spec"
        )
    if unknown:
        raise ConfigError(f"unknown variable(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def check_settings() -> ServeSettings:
    # the environment's values; flags given to the entrypoint are checked by serve itself
    try:
        return ServeSettings()  # type: ignore[call-arg]
    except ValidationError as err:
        problems = "; ".join(f"{PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        raise ConfigError(problems) from None


def choose_model(environ: MutableMapping[str, str]) -> str:
    """Sets MASKFORMER_WEIGHTS or MASKFORMER_WEIGHTS_DIR in `environ` and says which model was chosen.

    Order: MASKFORMER_WEIGHTS; else the model volume (its registry.json's default, or its only checkpoint);
    else the image's bundled default.
    """
    if environ.get("MASKFORMER_WEIGHTS"):
        weights = Path(environ["MASKFORMER_WEIGHTS"])
        if not weights.is_file():
            raise ConfigError(f"MASKFORMER_WEIGHTS={weights}: no such file (is the model volume mounted?)")
        return f"{weights} (MASKFORMER_WEIGHTS)"
    model_dir = Path(environ.get("MASKFORMER_MODEL_DIR", CONTAINER_VARS["MASKFORMER_MODEL_DIR"]))
    if (model_dir / "registry.json").is_file():
        environ["MASKFORMER_WEIGHTS_DIR"] = str(model_dir)
        return f"the default of {model_dir / 'registry.json'} (model volume)"
    checkpoints = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if len(checkpoints) > 1:
        names = ", ".join(p.name for p in checkpoints)
        raise ConfigError(f"{model_dir} holds several checkpoints ({names}); set MASKFORMER_WEIGHTS to one of them")
    if checkpoints:
        environ["MASKFORMER_WEIGHTS"] = str(checkpoints[0])
        return f"{checkpoints[0]} (model volume)"
    bundled = environ.get("MASKFORMER_WEIGHTS_DIR")
    if bundled and not (Path(bundled) / "registry.json").is_file():
        raise ConfigError(f"MASKFORMER_WEIGHTS_DIR={bundled} has no registry.json, and {model_dir} has no model")
    return f"the bundled default ({bundled or 'weights/'}); {model_dir} has no model"


def check_cache_dir(path: Path) -> None:
    """The cache volume must be writable: exported ONNX files, engines and their locks live there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cache directory {path} is not writable by uid {os.getuid()} ({err.strerror}); "
            "mount a volume this user can write, or set MASKFORMER_CACHE_DIR"
        ) from None


def prepare() -> list[str]:
    """Checks everything a start needs, completing os.environ; returns what was decided, for the log."""
    check_names(os.environ)
    model = choose_model(os.environ)
    settings = check_settings()
    check_cache_dir(settings.cache_dir)
    return [f"model: {model}", f"cache: {settings.cache_dir}", f"backend: {settings.backend}"]


def main(argv: list[str] | None = None) -> int:
    try:
        decisions = prepare()
    except ConfigError as err:
        print(f"maskformer entrypoint: error: {err}", file=sys.stderr)
        return 2
    for line in decisions:
        print(f"maskformer entrypoint: {line}", file=sys.stderr, flush=True)
    from service.cli import main as cli  # after the environment is final: model/checkpoint.py reads it on import

    return cli(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
