"""service/container.py's start checks, in-process: flags after the image name are resolved as `serve` resolves
them (a flag wins over its variable), and the port actually served is where docker/healthcheck reads it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from service import container
from service.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The image's environment with paths under tmp_path; prepare() may add MASKFORMER_WEIGHTS(_DIR), which
    monkeypatch removes afterwards because each name is registered here first."""
    for name in [k for k in os.environ if k.startswith("MASKFORMER_")] + ["MASKFORMER_WEIGHTS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASKFORMER_WEIGHTS_DIR", str(ROOT / "weights"))
    monkeypatch.setenv("MASKFORMER_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("MASKFORMER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    (tmp_path / "tmp").mkdir()
    (tmp_path / "models").mkdir()
    return tmp_path


def checkpoints(tmp: Path, *names: str) -> list[Path]:
    paths = [tmp / "models" / name for name in names]
    for path in paths:
        path.write_bytes(b"")
    return paths


def test_the_weights_flag_settles_a_model_volume_with_several_checkpoints(env):
    a, _ = checkpoints(env, "a.safetensors", "b.safetensors")
    with pytest.raises(container.ConfigError, match="several checkpoints"):
        container.prepare([])
    decisions = container.prepare(["--weights", str(a)])
    assert f"model: {a} (--weights)" in decisions
    assert container.prepare([f"--weights={a}"])[0] == f"model: {a} (--weights)"


def test_the_weights_flag_wins_over_the_variable_and_must_exist(env, monkeypatch):
    a, b = checkpoints(env, "a.safetensors", "b.safetensors")
    monkeypatch.setenv("MASKFORMER_WEIGHTS", str(a))
    assert container.prepare(["--weights", str(b)])[0] == f"model: {b} (--weights)"
    with pytest.raises(container.ConfigError, match=r"--weights=/nowhere/c.safetensors: no such file"):
        container.prepare(["--weights", "/nowhere/c.safetensors"])


def test_the_cache_dir_flag_is_checked_for_writing(env):
    with pytest.raises(container.ConfigError, match="cache directory /proc/cache is not writable"):
        container.prepare(["--cache-dir", "/proc/cache"])
    assert f"cache: {env / 'other'}" in container.prepare(["--cache-dir", str(env / "other")])
    assert (env / "other").is_dir()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "eighty"], "--port: Input should be a valid integer"),
        (["--max-batch-size=0"], "--max-batch-size: Input should be greater than or equal to 1"),
        (["--max-batchsize", "4"], "unrecognized arguments: --max-batchsize 4"),
        ([], "MASKFORMER_PORT: Input should be a valid integer"),  # no flag: the variable is named
        (["--log-level", "verbose"], "--log-level: Input should be 'critical', 'error', 'warning', 'info' or 'debug'"),
        (["--api-key="], "--api-key: Value error, is empty, which would turn authentication off"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(env, monkeypatch, argv, message):
    monkeypatch.setenv("MASKFORMER_PORT", "eighty")
    if argv[:1] != []:
        monkeypatch.setenv("MASKFORMER_PORT", "8000")
    with pytest.raises(container.ConfigError) as err:
        container.prepare(argv)
    assert message in str(err.value)


def test_an_empty_api_key_variable_is_refused_and_log_levels_ignore_case(env, monkeypatch):
    monkeypatch.setenv("MASKFORMER_PORT", "8000")
    monkeypatch.setenv("MASKFORMER_API_KEY", "")  # an unset ${API_KEY} in Compose
    with pytest.raises(container.ConfigError, match="MASKFORMER_API_KEY: Value error, is empty"):
        container.prepare([])
    monkeypatch.delenv("MASKFORMER_API_KEY")
    monkeypatch.setenv("MASKFORMER_LOG_LEVEL", "WARNING")
    assert container.check_settings([]).log_level == "warning"


def test_the_cache_probe_is_not_named_by_pid(env, monkeypatch):
    # Every replica's server is PID 1: another one's probe of the same name must not get in the way.
    monkeypatch.setattr("os.getpid", lambda: 1)
    (env / "cache" / ".write-test.1").mkdir(parents=True)
    container.check_cache_dir(env / "cache")
    assert [p.name for p in (env / "cache").iterdir()] == [".write-test.1"]


def test_a_damaged_default_on_the_model_volume_is_one_line(env, monkeypatch):
    import shutil

    for f in (ROOT / "weights").iterdir():
        if f.suffix in (".json", ".safetensors"):
            shutil.copy(f, env / "models" / f.name)
    monkeypatch.setenv("MASKFORMER_PORT", "8000")
    assert "model: the default of" in container.prepare([])[0]
    checkpoint = next((env / "models").glob("*.safetensors"))
    with checkpoint.open("r+b") as f:
        f.seek(4096)
        f.write(b"\x7c" * 8)
    with pytest.raises(container.ConfigError, match=r"shapes-r10.safetensors: sha256 \w+, but the registry says"):
        container.prepare([])
    checkpoint.unlink()
    with pytest.raises(container.ConfigError, match="the registry's default checkpoint"):
        container.prepare([])


def test_the_port_flag_is_written_where_the_healthcheck_reads_it(env, monkeypatch):
    monkeypatch.setenv("MASKFORMER_PORT", "8000")
    assert "port: 9000" in container.prepare(["--port", "9000"])
    assert container.port_file() == env / "tmp" / "maskformer.port"
    assert container.port_file().read_text() == "9000\n"
    assert "port: 8000" in container.prepare([])  # a restart without the flag: the variable's port
    assert container.port_file().read_text() == "8000\n"


def test_the_healthcheck_probes_the_port_the_start_wrote(env, monkeypatch):
    # Nothing listens on port 1 here: the healthcheck's failure names the URL it probed.
    def probed(environ: dict[str, str]) -> str:
        result = subprocess.run([str(ROOT / "docker" / "healthcheck")], env=environ, capture_output=True, text=True)
        assert result.returncode == 1, result
        return result.stdout

    base = {"PATH": os.environ["PATH"], "TMPDIR": str(env / "tmp"), "MASKFORMER_PORT": "8000"}
    assert "http://127.0.0.1:8000/healthz" in probed(base)  # no port file: the variable
    proxied = probed({**base, "http_proxy": "http://proxy.invalid:3128", "HTTP_PROXY": "http://proxy.invalid:3128"})
    assert "Connection refused" in proxied and "proxy.invalid" not in proxied  # straight to loopback
    monkeypatch.setenv("MASKFORMER_PORT", "8000")
    container.prepare(["--port", "1"])
    assert "http://127.0.0.1:1/healthz" in probed(base)  # the flag's port, though the variable says 8000


def test_serve_and_the_container_parse_flags_alike(monkeypatch):
    monkeypatch.setenv("MASKFORMER_MAX_BATCH_SIZE", "4")
    settings = container.check_settings(["--port", "9000", "--no-warmup"])
    assert isinstance(settings, ServeSettings)
    assert (settings.port, settings.warmup, settings.max_batch_size) == (9000, False, 4)
