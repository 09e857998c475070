"""A short coverage-guided run of tests/fuzz_decode_atheris.py (libFuzzer via atheris), where atheris installs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[1]


def test_atheris_finds_no_crash_in_the_decoder(tmp_path):
    corpus = tmp_path / "corpus"
    args = ["-max_total_time=10", "-timeout=10", "-rss_limit_mb=3000", f"-artifact_prefix={tmp_path}/"]
    fuzzer = [sys.executable, "-m", "tests.fuzz_decode_atheris", "--seed", str(corpus), *args]
    # Through a shell that forks: on Linux a process's peak RSS survives exec, so a fuzzer exec'd straight
    # from a big pytest process would start above -rss_limit_mb and report an out-of-memory on no input.
    result = subprocess.run(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", *fuzzer],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    crashes = sorted(p.name for kind in ("crash", "timeout", "oom") for p in tmp_path.glob(f"{kind}-*"))
    assert result.returncode == 0 and not crashes, (crashes, result.stderr[-3000:])
    assert "Done" in result.stderr
