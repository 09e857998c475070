"""Self-describing .safetensors checkpoints: round trip, metadata, and clear refusals."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from model import ModelInfo, build_model, load_model, read_metadata, save_model
from model.checkpoint import WEIGHTS_DIR, CheckpointError, default_weights
from service.cli import main as cli
from tests.test_model import TINY

ROOT = Path(__file__).resolve().parents[1]
INFO = ModelInfo(
    name="tiny",
    class_names=["sky", "ground", "circle", "square", "triangle"],
    isthing=[False, False, True, True, True],
    version="3",
)


@pytest.fixture
def saved(tmp_path):
    model = build_model(TINY, INFO).eval()
    return model, save_model(model, tmp_path / "tiny.safetensors")


def test_round_trip_gives_identical_outputs_and_metadata(saved):
    model, path = saved
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.cfg == TINY and loaded.info == INFO
    x = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["pred_masks"], model(x)["pred_masks"], rtol=0, atol=0)
    cfg, info = read_metadata(path)
    assert cfg.input_size == (128, 128) and cfg.pixel_mean == TINY.pixel_mean and info.isthing == INFO.isthing


def test_fp16_checkpoint_is_half_the_size_and_loads_as_float32(saved, tmp_path):
    model, path = saved
    half = save_model(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * path.stat().st_size
    loaded = load_model(half)
    assert next(loaded.parameters()).dtype == torch.float32


def test_refuses_pickles_and_foreign_files(tmp_path, saved):
    pt = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match="nothing is unpickled"):
        load_model(pt)
    bare = tmp_path / "bare.safetensors"
    save_file({"a": torch.zeros(1)}, str(bare))
    with pytest.raises(CheckpointError, match="maskformer convert"):
        load_model(bare)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(junk)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_config_are_named(saved, tmp_path):
    model, path = saved
    state = {k: v for k, v in model.state_dict().items() if k != "class_embed.bias"}
    state["query_embed.weight"] = torch.zeros(3, 64)
    meta = {
        "format": "maskformer-serving",
        "format_version": "1",
        "config": json.dumps(TINY.to_dict()),
        "info": json.dumps(INFO.__dict__),
    }
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    assert "class_embed.bias" in str(err.value) and "query_embed.weight" in str(err.value)


def test_class_names_must_fit_the_model():
    with pytest.raises(ValueError, match="class names"):
        build_model(TINY, ModelInfo(name="x", class_names=["a"], isthing=[True]))


def test_info_command(saved, capsys):
    _, path = saved
    assert cli(["info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["info"]["class_names"][2] == "circle"
    assert cli(["info", str(path.with_name("nope.safetensors"))]) == 2


def test_default_weights_come_from_the_registry(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="registry.json"):
        default_weights(tmp_path)
    _, path = saved
    (tmp_path / "registry.json").write_text(json.dumps({"default": "t", "models": {"t": {"file": path.name}}}))
    assert default_weights(tmp_path) == path


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mask):
    umask(mask)  # save_file alone gives 0600: unreadable by the container's uid after a host-side convert
    path = save_model(build_model(TINY, INFO), tmp_path / "m.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_each_write_has_its_own_temp_file_and_a_failed_one_leaves_none(tmp_path, monkeypatch):
    model = build_model(TINY, INFO)
    path = save_model(model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    temps = []

    def fail_half_way(tensors, filename, metadata):
        temps.append(filename)
        Path(filename).write_bytes(b"x" * 1000)
        raise SafetensorError("No space left on device")

    monkeypatch.setattr("model.checkpoint.save_file", fail_half_way)
    for _ in range(2):
        with pytest.raises(OSError, match=f"cannot write {path}: No space left"):
            save_model(model, path)
    assert len(set(temps)) == 2 and all(Path(t).parent == tmp_path for t in temps)
    assert sorted(tmp_path.iterdir()) == [path] and path.read_bytes() == before


def test_an_unwritable_out_is_one_line_naming_it(saved, capsys):
    _, path = saved
    assert cli(["convert", "--from", "maskformer", str(path), "--out", "/proc/x.safetensors"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write /proc/x.safetensors")


@pytest.fixture
def weights_copy(tmp_path):
    """A copy of the shipped weights/ folder and its default checkpoint."""
    shutil.copytree(WEIGHTS_DIR, tmp_path / "weights")
    registry = json.loads((tmp_path / "weights" / "registry.json").read_text())
    return tmp_path / "weights", registry["models"][registry["default"]]


def corrupt(path, offset=100_000):
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_a_corrupted_default_checkpoint_is_refused_by_its_registry_digest(weights_copy):
    folder, entry = weights_copy
    corrupt(folder / entry["file"])
    env = {**os.environ, "MASKFORMER_WEIGHTS_DIR": str(folder)}
    code = "from model import load_model; load_model()"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"CheckpointError: {folder / entry['file']}: sha256 " in result.stderr
    assert f"the registry says {entry['sha256']}" in result.stderr


def test_the_digest_is_checked_again_when_the_file_changes(weights_copy):
    folder, entry = weights_copy
    path = default_weights(folder)
    corrupt(path)  # same size, new mtime: the once-per-process cache must not hide it
    with pytest.raises(CheckpointError, match="sha256"):
        default_weights(folder)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{path.stat().st_size} bytes, but the registry says {entry['bytes']}"):
        default_weights(folder)


@pytest.mark.parametrize(
    "registry, message",
    [
        ("{not json", "registry.json: not valid JSON"),
        ('{"default": "nope", "models": {"t": {"file": "t.safetensors"}}}', "default 'nope' is not one of its models"),
        ('{"default": "t", "models": {"t": {}}}', "model 't' names no file"),
        ('{"models": {}}', 'expected {"default": NAME'),
        ('{"default": "t", "models": {"t": {"file": "gone.safetensors"}}}', "no .*gone.safetensors, the registry's"),
    ],
)
def test_registry_problems_name_the_file(tmp_path, registry, message):
    (tmp_path / "registry.json").write_text(registry)
    with pytest.raises((CheckpointError, FileNotFoundError), match=message) as err:
        default_weights(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_fp16_refuses_weights_it_would_turn_into_inf(saved, tmp_path, capsys):
    model, path = saved
    with torch.no_grad():
        model.class_embed.weight[0, 0] = 1e5  # float16 tops out at 65504
    with pytest.raises(
        ValueError, match=r"class_embed.weight holds values beyond torch.float16's range \(up to 100000\)"
    ):
        save_model(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert not (tmp_path / "half.safetensors").exists()
    save_model(model, path)
    assert (
        cli(["convert", "--from", "maskformer", str(path), "--fp16", "--out", str(tmp_path / "half.safetensors")]) == 2
    )
    assert "store it in float32" in capsys.readouterr().err
