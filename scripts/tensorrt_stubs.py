"""Copy the installed tensorrt-stubs into DIR in a form mypy can read.

The published stubs (10.13) are generated with two syntax errors: a parameter named `in` and parameters
without defaults after ones with defaults. Both are mended here; the types are left as they are.
Usage: python scripts/tensorrt_stubs.py DIR, then MYPYPATH=DIR mypy export
"""

import re
import shutil
import sys
import sysconfig
from pathlib import Path


def mend(line: str) -> str:
    line = re.sub(r"([(,] )in: ", r"\1in_: ", line)
    m = re.match(r"^(\s*def \w+\()(.*)(\) -> .*:)$", line)
    if not m:
        return line
    params, seen_default = [], False
    for param in (p.strip() for p in re.split(r",(?![^\[]*\])", m[2])):
        if "=" in param:
            seen_default = True
        elif seen_default and param and not param.startswith("*"):
            param += " = ..."
        params.append(param)
    return m[1] + ", ".join(params) + m[3]


def main(out: Path) -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        print("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)", file=sys.stderr)
        return 1
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.rmtree(out / package, ignore_errors=True)
        shutil.copytree(site / package, out / package)
    stub = out / "tensorrt_bindings" / "tensorrt.pyi"
    stub.write_text("\n".join(mend(line) for line in stub.read_text().split("\n")))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
