"""The container's start (docker/entrypoint): check the environment, pick the model, then serve in this process
(PID 1, so SIGTERM reaches uvicorn's drain).

The ONNX export and the TensorRT engine build happen inside `serve` while it already answers /healthz and
/readyz says 503, so probes see a live, not-ready server during a build (service/engine_cache.py).
Configuration errors exit 2 with one line that names the variable or flag, instead of a traceback. Flags
given after the image name are `serve`'s and are checked here too: the settings are parsed exactly as `serve`
parses them (service/settings.py's serve_settings: a flag wins over its variable).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.settings import ServeSettings, serve_settings

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


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def source(name: str, argv: list[str]) -> str:
    """How the setting `name` was given: its flag when argv has it (the flag wins), else its variable."""
    given = any(a == flag(name) or a.startswith(flag(name) + "=") for a in argv)
    return flag(name) if given else PREFIX + name.upper()


def check_settings(argv: list[str]) -> ServeSettings:
    """The settings `serve` will run with: the flags in argv over the environment, parsed as `serve` does."""
    try:
        return serve_settings(argv, exit_on_error=False)
    except SettingsError as err:  # an unknown flag, or a value argparse refuses
        raise ConfigError(f"{err} (the arguments after the image name are `maskformer serve` flags)") from None
    except ValidationError as err:
        problems = "; ".join(f"{source(str(e['loc'][0]), argv)}: {e['msg']}" for e in err.errors())
        raise ConfigError(problems) from None


def choose_model(environ: MutableMapping[str, str], weights_flag: Path | None = None) -> str:
    """Sets MASKFORMER_WEIGHTS or MASKFORMER_WEIGHTS_DIR in `environ` and says which model was chosen.

    Order: the --weights flag; MASKFORMER_WEIGHTS; else the model volume (its registry.json's default, or its
    only checkpoint); else the image's bundled default.
    """
    if weights_flag or environ.get("MASKFORMER_WEIGHTS"):
        name = "--weights" if weights_flag else "MASKFORMER_WEIGHTS"
        weights = Path(weights_flag or environ["MASKFORMER_WEIGHTS"])
        if not weights.is_file():
            raise ConfigError(f"{name}={weights}: no such file (is the model volume mounted?)")
        return f"{weights} ({name})"
    model_dir = Path(environ.get("MASKFORMER_MODEL_DIR", CONTAINER_VARS["MASKFORMER_MODEL_DIR"]))
    if (model_dir / "registry.json").is_file():
        environ["MASKFORMER_WEIGHTS_DIR"] = str(model_dir)
        check_default(model_dir)
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
    check_default(Path(bundled) if bundled else None)
    return f"the bundled default ({bundled or 'weights/'}); {model_dir} has no model"


def check_default(weights_dir: Path | None) -> None:
    """The registry's default checkpoint is there, with the size and digest the registry gives."""
    from model.checkpoint import default_weights  # imports torch: only once the environment is final

    try:
        default_weights(weights_dir)
    except (OSError, ValueError) as err:  # FileNotFoundError, CheckpointError: their messages name the file
        raise ConfigError(str(err)) from None


def check_cache_dir(path: Path) -> None:
    """The cache volume must be writable: exported ONNX files, engines and their locks live there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a unique name: every replica's server is PID 1, so a PID-named probe would be shared on the volume
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"cache directory {path} is not writable by uid {os.getuid()} ({err.strerror}); "
            "mount a volume this user can write, or set MASKFORMER_CACHE_DIR"
        ) from None


def port_file() -> Path:
    """Where the start writes the port it serves on, for docker/healthcheck (which computes the same path):
    a --port flag is not in the environment that `docker exec` gives the healthcheck."""
    return Path(tempfile.gettempdir()) / "maskformer.port"


def write_port(port: int) -> str:
    path = port_file()
    try:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)
    except OSError as err:
        return f"port: {port} (cannot write {path}: {err.strerror}; the HEALTHCHECK reads MASKFORMER_PORT)"
    return f"port: {port}"


def prepare(argv: list[str] | None = None) -> list[str]:
    """Checks everything a start needs, completing os.environ; returns what was decided, for the log.

    `argv`: the flags `serve` will get; they win over the variables, as in `serve`."""
    argv = argv or []
    check_names(os.environ)
    settings = check_settings(argv)
    model = choose_model(os.environ, settings.weights if source("weights", argv) == "--weights" else None)
    check_cache_dir(settings.cache_dir)
    port = write_port(settings.port)
    return [f"model: {model}", f"cache: {settings.cache_dir}", f"backend: {settings.backend}", port]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        decisions = prepare(argv)
    except ConfigError as err:
        print(f"maskformer entrypoint: error: {err}", file=sys.stderr)
        return 2
    for line in decisions:
        print(f"maskformer entrypoint: {line}", file=sys.stderr, flush=True)
    from service.cli import main as cli  # after the environment is final: model/checkpoint.py reads it on import

    return cli(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main())
