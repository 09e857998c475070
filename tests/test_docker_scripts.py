"""The image's install and start scripts, run here on the CPU: docker/install.sh into a fresh virtual
environment, then docker/entrypoint serving the bundled default model until it answers POST /segment.

The fresh environment sees this one's packages through a .pth file, so install.sh's dependency phase finds
them satisfied (no torch download) while its app phase really installs the package, which then runs from
outside the source tree, as in the image.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.images import encode, rgb
from tests.test_serve_process import free_port
from tests.test_serve_security import constraint_pins, off_pin

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "docker" / "install.sh", ROOT / "docker" / "entrypoint"]
HEALTHCHECK = ROOT / "docker" / "healthcheck"


def healthcheck(port: int, tmpdir: Path | None = None) -> int:
    """The HEALTHCHECK as `docker exec` runs it: the image's environment (MASKFORMER_PORT=port), not the flags."""
    env = {**os.environ, "MASKFORMER_PORT": str(port), **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    return subprocess.run([str(HEALTHCHECK)], env=env, capture_output=True, timeout=10).returncode


SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install -e '.[dev]')")
def test_scripts_pass_shellcheck():
    """The image's scripts, and the set-up, compatibility and CI scripts beside them."""
    others = [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]
    result = subprocess.run([str(SHELLCHECK), *map(str, SCRIPTS + others)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install -e '.[dev]')")
def test_shellcheck_fails_on_a_planted_violation(tmp_path):
    planted = tmp_path / "entrypoint"
    planted.write_text(SCRIPTS[1].read_text().replace('exec python -m service.container "$@"', "exec python $@"))
    result = subprocess.run([str(SHELLCHECK), str(planted)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2068" in result.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    if off := off_pin(constraint_pins()):  # scripts/compat.sh's venv, say
        pytest.skip(f"the image installs constraints.txt's pins, which this venv does not hold: {'; '.join(off)}")
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    (pth,) = venv.glob("lib/python*/site-packages")
    (pth / "zz_test_venv.pth").write_text(site.getsitepackages()[0] + "\n")
    # the venv's own older setuptools would shadow this one's and make the dependency phase download
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    for phase in (["deps", str(venv), ""], ["app", str(venv)]):
        start = time.monotonic()
        result = subprocess.run([str(SCRIPTS[0]), *phase], capture_output=True, text=True, cwd="/")
        assert result.returncode == 0, result.stdout + result.stderr
        if phase[0] == "deps":  # everything already satisfied: nothing downloaded or installed
            assert "Successfully installed" not in result.stdout, result.stdout
        print(f"install.sh {phase[0]}: {time.monotonic() - start:.1f} s")
    return venv


def run_entrypoint(venv: Path, tmp: Path, env: dict[str, str], *args: str, **kwargs) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MASKFORMER_") and k != "PYTHONPATH"}
    image_env = {  # what the Dockerfile sets, with paths under tmp instead of /cache, /models, /opt
        "PATH": f"{venv / 'bin'}:{base['PATH']}",
        "MASKFORMER_WEIGHTS_DIR": str(ROOT / "weights"),
        "MASKFORMER_MODEL_DIR": str(tmp / "models"),
        "MASKFORMER_CACHE_DIR": str(tmp / "cache"),
        "MASKFORMER_HOST": "127.0.0.1",
        "MASKFORMER_THREADS": "1",
        "TMPDIR": str(tmp / "tmp"),  # where the start writes the served port for the healthcheck
    }
    (tmp / "tmp").mkdir(exist_ok=True)
    # cwd outside the source tree: `python -m` would otherwise import the checkout, not the installed copy
    return subprocess.Popen([str(SCRIPTS[1]), *args], env={**base, **image_env, **env}, cwd=tmp, text=True, **kwargs)


def test_entrypoint_serves_the_bundled_model_on_cpu(venv, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    image_port = free_port()  # MASKFORMER_PORT says this; the --port flag wins, and the healthcheck follows it
    env = {"MASKFORMER_PORT": str(image_port)}
    # arguments after the image name are serve's flags
    args = ["--port", str(port), "--max-batch-size", "2"]
    with open(tmp_path / "entrypoint.log", "w") as log:
        proc = run_entrypoint(venv, tmp_path, env, *args, stdout=log, stderr=subprocess.STDOUT)
    seen_loading = False
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()
            assert time.monotonic() < deadline, "not ready in 120 s"
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    assert ready.json()["warm_batch_sizes"] == [1, 2]
                    break
                seen_loading |= httpx.get(f"{url}/healthz", timeout=2).status_code == 200  # alive, not ready
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert seen_loading, "never saw /healthz 200 with /readyz 503 during the ONNX export"
        assert healthcheck(image_port, tmp_path / "tmp") == 0
        assert healthcheck(image_port) == 1  # without the port file it would probe MASKFORMER_PORT: nothing there
        r = httpx.post(f"{url}/segment", files={"image": ("x.png", encode(rgb(60, 80), "PNG"))}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == "shapes-r10" and (body["width"], body["height"]) == (80, 60)
        assert body["segments"]
        # exec: the entrypoint's PID is now the server, from the installed copy, and it gets SIGTERM
        assert "service.container" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert httpx.get(f"{url}/v1/model").json()["backend"] == "onnxruntime"
        assert list((tmp_path / "cache").glob("*.onnx"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its drain
        assert healthcheck(image_port, tmp_path / "tmp") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "entrypoint.log").read_text()
    assert "maskformer entrypoint: model: the bundled default" in text
    assert f"maskformer entrypoint: port: {port}\n" in text
    assert str(venv) in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import service; print(service.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
    ).stdout  # fmt: skip


def test_install_refuses_an_unknown_extra(venv):
    result = subprocess.run([str(SCRIPTS[0]), "deps", str(venv), "gpu,cuda"], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown extra(s) ['cuda']" in result.stderr


def test_install_gpu_needs_the_base_images_tensorrt(venv):
    # No TensorRT here (at most its type stubs): the gpu extra fails before pip installs anything, rather than
    # pulling the newest TensorRT from the package index.
    result = subprocess.run([str(SCRIPTS[0]), "deps", str(venv), "gpu"], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the gpu extra needs TensorRT >= 10 from the base image" in result.stderr
    assert result.stdout == "", result.stdout  # pip never ran


def two_checkpoints(tmp: Path) -> dict[str, str]:
    (tmp / "models").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp / "models" / name).write_bytes(b"")
    return {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MASKFORMER_MAX_BATCHSIZE": "16"}, "unknown variable(s) MASKFORMER_MAX_BATCHSIZE"),
        ({"MASKFORMER_PORT": "eighty"}, "MASKFORMER_PORT: Input should be a valid integer"),
        (
            {"MASKFORMER_SERVICE_HOST": "10.0.0.7", "MASKFORMER_PORT": "tcp://10.0.0.7:80"},
            "set enableServiceLinks: false in the pod spec",
        ),
        ({"MASKFORMER_MAX_BATCH_SIZE": "0"}, "MASKFORMER_MAX_BATCH_SIZE: Input should be greater than or equal to 1"),
        ({"MASKFORMER_WEIGHTS": "/models/missing.safetensors"}, "no such file (is the model volume mounted?)"),
        ({"MASKFORMER_CACHE_DIR": "/proc/cache"}, "cache directory /proc/cache is not writable"),
        ({"MASKFORMER_WEIGHTS_DIR": "/nonexistent"}, "MASKFORMER_WEIGHTS_DIR=/nonexistent has no registry.json"),
        (two_checkpoints, "holds several checkpoints (a.safetensors, b.safetensors); set MASKFORMER_WEIGHTS"),
    ],
)
def test_entrypoint_refuses_bad_configuration_with_one_line(venv, tmp_path, env, message):
    env = env(tmp_path) if callable(env) else env
    proc = run_entrypoint(venv, tmp_path, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert err.startswith("maskformer entrypoint: error: ") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-dir", "/proc/cache"], "cache directory /proc/cache is not writable"),
        (["--port", "eighty"], "--port: Input should be a valid integer"),
        (["--weights", "/models/missing.safetensors"], "--weights=/models/missing.safetensors: no such file"),
        (["--max-batchsize", "4"], "unrecognized arguments: --max-batchsize 4"),
    ],
)
def test_entrypoint_checks_serve_flags_too(venv, tmp_path, args, message):
    proc = run_entrypoint(venv, tmp_path, {}, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert err.startswith("maskformer entrypoint: error: ") and message in err, err
    assert "Traceback" not in err
