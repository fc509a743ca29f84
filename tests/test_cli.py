"""The ``magicinit`` command, end to end in subprocesses, and its data readers."""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import magicinit
from magicinit.tools.cli import load_model
from magicinit.tools.demo import DemoSettings, TrainingRun, verdict
from magicinit.tools.nets import ZOO, build_model
from magicinit.tools.readers import load_images, read_idx

SMALL = ["--model-args", '{"depth": 4, "width": 4}', "--rate-precision", "0.2", "--rate-max-rounds", "2"]


def run_cli(*args: str | Path, cwd: Path | None = None, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m magicinit ARGS`` (or ``python -c CODE ARGS``), bounded in time."""
    command = [sys.executable, *(["-c", code] if code else ["-m", "magicinit"]), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def images_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, (np.random.default_rng(0).random((40, 12, 12, 3)) * 255).astype(np.uint8))  # channels last
    return path


def without_times(data: dict) -> dict:
    return {key: value for key, value in data.items() if key not in ("seconds", "between_seconds")}


def assert_close_json(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_close_json(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_json(x, y)
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (a, b)
    else:
        assert a == b


@pytest.mark.slow
def test_init_writes_weights_json_and_png_that_match_the_library(images_npy: Path, tmp_path: Path) -> None:
    out, report_path, plot = tmp_path / "w.pt", tmp_path / "r.json", tmp_path / "p.png"
    result = run_cli(
        "init",
        "plain-cnn",
        *SMALL,
        "--data",
        images_npy,
        "--out",
        out,
        "--report",
        report_path,
        "--plot",
        plot,
        "--beta",
        "0.1",
    )
    assert result.returncode == 0, result.stderr
    assert "initialized" in result.stdout and f"wrote {out}" in result.stdout
    model = build_model("plain-cnn", depth=4, width=4)
    model.load_state_dict(torch.load(out, weights_only=True))
    images = load_images(str(images_npy))
    assert images.shape == (40, 3, 12, 12)
    reference = build_model("plain-cnn", depth=4, width=4)
    expected = magicinit.init_(reference, images, seed=0, beta=0.1, rate_precision=0.2, rate_max_rounds=2)
    assert_close_json(without_times(json.loads(report_path.read_text())), without_times(expected.to_dict()))
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, rtol=1e-4, atol=1e-6), key
    from PIL import Image

    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


@pytest.mark.slow
def test_rescale_keeps_the_function_and_diagnose_matches_the_library(images_npy: Path, tmp_path: Path) -> None:
    trained, rescaled, diag_json = tmp_path / "trained.safetensors", tmp_path / "rescaled.pt", tmp_path / "d.json"
    assert run_cli("init", "plain-cnn", *SMALL, "--data", images_npy, "--out", trained, "--quiet").returncode == 0
    result = run_cli("rescale", "plain-cnn", *SMALL, "--weights", trained, "--data", images_npy, "--out", rescaled)
    assert result.returncode == 0, result.stderr
    before, after = build_model("plain-cnn", depth=4, width=4), build_model("plain-cnn", depth=4, width=4)
    from safetensors.torch import load_file

    before.load_state_dict(load_file(trained))
    after.load_state_dict(torch.load(rescaled, weights_only=True))
    images = load_images(str(images_npy))
    with torch.no_grad():
        assert torch.allclose(after(images), before(images), rtol=1e-4, atol=1e-5)
    result = run_cli(
        "diagnose", "plain-cnn", *SMALL, "--weights", rescaled, "--data", images_npy, "--report", diag_json
    )
    assert result.returncode == 0, result.stderr
    assert "output CV" in result.stdout
    expected = magicinit.diagnose(after, images, rate_precision=0.2, rate_max_rounds=2)
    assert_close_json(json.loads(diag_json.read_text()), expected.to_dict())


def test_quiet_prints_nothing(images_npy: Path, tmp_path: Path) -> None:
    result = run_cli("init", "plain-cnn", *SMALL, "--data", images_npy, "--out", tmp_path / "w.pt", "--quiet")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


@pytest.mark.slow
def test_factory_model_and_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def tiny(classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, classes))\n"
    )
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((20 + i, 24, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    result = run_cli(
        "init",
        "my_models:tiny",
        "--model-args",
        '{"classes": 5}',
        "--data",
        tmp_path / "images",
        "--input-size",
        "16",
        "--out",
        tmp_path / "w.pt",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert state["3.weight"].shape == (5, 4 * 14 * 14)  # grayscale: the model's first conv takes 1 channel


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,code,message",
    [
        (["init", "no-such-net", "--data", "smooth", "--out", "w.pt"], 2, "not a built-in"),
        (["init", "plain-cnn", "--out", "w.pt"], 2, "--data"),
        (["init", "plain-cnn", "--data", "smooth", "--out", "w.pt", "--model-args", "[1]"], 2, "JSON object"),
        (["init", "plain-cnn", "--data", "smooth", "--out", "w.pt", "--sampler", "magic"], 2, "invalid choice"),
        (["init", "nomodule_here:net", "--data", "smooth", "--out", "w.pt"], 2, "cannot be imported"),
        (["init", "plain-cnn", "--data", "missing.npy", "--out", "w.pt"], 1, "'missing.npy': no such file"),
        (["diagnose", "plain-cnn", "--data", "smooth", "--weights", "missing.pt"], 1, "weights 'missing.pt'"),
        (["init", "vgg", "--model-args", '{"depth": 3}', "--data", "smooth", "--out", "w.pt"], 1, "depth=3"),
    ],
)
def test_errors_give_exit_code_and_one_line(args: list[str], code: int, message: str, tmp_path: Path) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w.pt").exists()


@pytest.mark.slow
def test_unreadable_data_file_is_named_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip file")
    result = run_cli("init", "plain-cnn", "--data", bad, "--out", tmp_path / "w.pt")
    assert result.returncode == 1
    assert result.stderr.startswith(f"magicinit: error: data file '{bad}' cannot be read")
    debug = run_cli("init", "plain-cnn", "--data", bad, "--out", tmp_path / "w.pt", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_a_model_that_rejects_the_data_fails_cleanly(images_npy: Path, tmp_path: Path) -> None:
    result = run_cli(
        "init", "plain-cnn", "--model-args", '{"in_channels": 1}', "--data", images_npy, "--out", tmp_path / "w.pt"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_missing_matplotlib_is_a_clear_message(images_npy: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; from magicinit.tools.cli import main; raise SystemExit(main())"
    )
    result = run_cli(
        "init",
        "plain-cnn",
        *SMALL,
        "--data",
        images_npy,
        "--out",
        tmp_path / "w.pt",
        "--plot",
        tmp_path / "p.png",
        code=code,
    )
    assert result.returncode == 1
    assert "needs matplotlib: pip install 'magicinit[plot]'" in result.stderr
    assert not (tmp_path / "w.pt").exists()  # checked before any work


def test_demo_trains_and_writes_figures(tmp_path: Path) -> None:
    result = run_cli(
        "demo", "--depth", "4", "--epochs", "1", "--learning-rates", "0.01", "--seeds", "2", "--out-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("init "))) :][2:5]
    # the init, the mean accuracy over the seeds and its range at the one rate, the runs >= 50 %, those diverged;
    # torch's default init: one seed
    assert re.fullmatch(r"torch default +\d+\.\d +\d/1 +\d/1", table[0]), table[0]
    for row, init in zip(table[1:], ("kaiming normal", "magicinit")):
        assert re.fullmatch(rf"{init} +\d+\.\d \(\d+\.\d-\d+\.\d\) +\d/2 +\d/2", row), row
    verdict = lines[lines.index(next(line for line in lines if line.startswith("Verdict"))) :][:3]
    assert verdict[0] == "Verdict, from the ranges over the seeds (all runs of one init at one rate), magicinit:"
    for line, other in zip(verdict[1:], ("torch default", "kaiming normal")):
        assert re.fullmatch(
            rf"- against {other}: (above at every learning rate|(overlapping|below) at lr 0\.01); "
            rf"at each one's best learning rate, (magicinit ahead|a tie|{other} ahead)\.",
            line,
        ), line
    for name in ("loss_curves.png", "layer_statistics.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_verdict_compares_ranges_over_seeds() -> None:
    def runs(init: str, rate: float, *accuracies: float) -> list[TrainingRun]:
        return [
            TrainingRun(init, rate, seed, losses=[1.0] if accuracy == accuracy else [math.nan], test_accuracy=accuracy)
            for seed, accuracy in enumerate(accuracies)
        ]

    settings = DemoSettings(learning_rates=(0.001, 0.01, 0.1))
    grid = [
        *runs("torch default", 0.001, 0.1),
        *runs("torch default", 0.01, 0.1),
        *runs("torch default", 0.1, math.nan),  # diverged: counts as 0
        *runs("kaiming normal", 0.001, 0.5, 0.6, 0.55),
        *runs("kaiming normal", 0.01, 0.91, 0.95, 0.93),  # its best rate: overlaps magicinit's best
        *runs("kaiming normal", 0.1, 0.6, 0.7, 0.8),
        *runs("magicinit", 0.001, 0.9, 0.92, 0.91),
        *runs("magicinit", 0.01, 0.94, 0.96, 0.95),
        *runs("magicinit", 0.1, 0.1, 0.2, math.nan),
    ]
    assert verdict(grid, settings).splitlines() == [
        "Verdict, from the ranges over the seeds (all runs of one init at one rate), magicinit:",
        "- against torch default: above at lr 0.001, 0.01; overlapping at lr 0.1; "
        "at each one's best learning rate, magicinit ahead.",
        "- against kaiming normal: above at lr 0.001; overlapping at lr 0.01; below at lr 0.1; "
        "at each one's best learning rate, a tie.",
    ]


@pytest.mark.slow
def test_the_demo_gives_the_same_table_in_every_process(tmp_path: Path) -> None:
    # torch seeds its global generator differently in every process: every draw of the demo is seeded
    outputs = []
    for _run in range(2):
        result = run_cli(
            "demo", "--depth", "6", "--epochs", "1", "--learning-rates", "0.01", "0.03", "--seeds", "2", "--no-plots"
        )
        assert result.returncode == 0, result.stderr
        text = result.stdout
        outputs.append(text[text.index("\ninit ") : text.rindex(" runs in ")])  # the table and the verdict
    assert "Verdict" in outputs[0]
    assert outputs[0] == outputs[1]


def test_data_readers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 9, 7), dtype=np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as file:
        file.write(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 10, 9, 7) + images.tobytes())
    assert torch.equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), torch.from_numpy(images))
    floats = rng.standard_normal((4, 3)).astype(">f4")
    (tmp_path / "f-idx2").write_bytes(struct.pack(">BBBB2I", 0, 0, 0x0D, 2, 4, 3) + floats.tobytes())
    assert torch.allclose(read_idx(tmp_path / "f-idx2"), torch.from_numpy(floats.astype(np.float32)))
    loaded = load_images(str(tmp_path / "t10k-images-idx3-ubyte.gz"), standardize=False)
    assert loaded.shape == (10, 1, 9, 7) and torch.allclose(loaded[:, 0], torch.from_numpy(images) / 255.0)

    np.savez(tmp_path / "a.npz", first=np.zeros((3, 2)), second=np.ones((5, 4), dtype=np.float32))
    assert load_images(str(tmp_path / "a.npz"), key="second", standardize=False).shape == (5, 4)
    torch.save({"labels": torch.arange(6), "x": torch.randn(6, 2, 5)}, tmp_path / "d.pt")
    values = load_images(str(tmp_path / "d.pt"), key="x")
    assert values.shape == (6, 2, 5)
    assert torch.allclose(values.mean(dim=(0, 2)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(values.std(dim=(0, 2), correction=0), torch.ones(2), atol=1e-5)
    assert load_images("smooth", samples=7, input_size=16).shape == (7, 3, 16, 16)
    assert load_images("digits", samples=50).shape == (50, 1, 8, 8)
    with pytest.raises(magicinit.MagicInitError, match="no array 'third'"):
        load_images(str(tmp_path / "a.npz"), key="third")
    (tmp_path / "bad-idx").write_bytes(struct.pack(">BBBB1I", 0, 0, 0x08, 1, 100) + b"\x00" * 10)
    with pytest.raises(magicinit.MagicInitError, match="the header says"):
        read_idx(tmp_path / "bad-idx")


def test_every_zoo_model_builds_and_initializes() -> None:
    x = torch.randn(4, 1, 64, 64)
    for name in ZOO:
        args = {"in_channels": 1, "classes": 3}
        if name != "plain-cnn":
            args["width"] = 0.0625
        model = load_model(name, args)
        report = magicinit.init_(model, x, seed=0, between=False)
        assert all(entry.status == "initialized" for entry in report.layers), name
        with torch.no_grad():
            assert torch.isfinite(model(x)).all(), name


def test_torchvision_models_by_name() -> None:
    pytest.importorskip("torchvision")
    model = load_model("torchvision:resnet18", {"num_classes": 4})
    assert model.fc.out_features == 4


@pytest.mark.slow
def test_timm_models_by_name_on_the_command_line(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    result = run_cli(
        "init",
        "timm:vit_tiny_patch16_224",
        "--model-args",
        '{"img_size": 32, "num_classes": 5}',
        "--data",
        "x.npy",
        "--out",
        "w.pt",
        "--report",
        "r.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert sum(layer["status"] == "initialized" for layer in report["layers"]) > 20  # qkv, proj, fc1, fc2, ...
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert weights["head.weight"].shape == (5, 192)
    # a timm CNN: Part 2 rescales across its batch norms when asked, with norms from site activations
    model = load_model("timm:resnet18", {"num_classes": 4})
    assert model.fc.out_features == 4
    report = magicinit.init_(model, torch.randn(16, 3, 32, 32), seed=0, rate_precision=0.2, across_normalization=True)
    assert report.rate_spread_after < report.rate_spread_before
    assert any("(chunks of 1 samples; from site activations)" in note for note in report.notes), report.notes


@pytest.mark.slow
def test_an_unknown_timm_model_is_a_usage_error() -> None:
    pytest.importorskip("timm")
    result = run_cli("diagnose", "timm:no_such_net", "--data", "x.npy")
    assert result.returncode == 2 and "timm has no model 'no_such_net'" in result.stderr


@pytest.mark.slow
def test_same_command_same_weights_even_for_layers_left_at_default(images_npy: Path, tmp_path: Path) -> None:
    for name in ("a.pt", "b.pt"):
        result = run_cli(
            "init",
            "plain-cnn",
            *SMALL,
            "--data",
            images_npy,
            "--skip",
            "0",
            "--no-between",
            "--out",
            tmp_path / name,
            "--quiet",
        )
        assert result.returncode == 0, result.stderr
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("a.pt", "b.pt"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_tied_weights_round_trip_through_safetensors(tmp_path: Path) -> None:
    (tmp_path / "tied.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Tied(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)\n"
        "        self.b.weight = self.a.weight\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.relu(self.a(x)))\n"
    )
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32))
    common = ["tied:Tied", "--data", "x.npy", *SMALL[2:]]
    assert run_cli("init", *common, "--out", "t.safetensors", cwd=tmp_path).returncode == 0
    result = run_cli("diagnose", *common, "--weights", "t.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--out", "."], "--out .: is a folder"),
        (["--out", "no/such/dir/w.pt"], "does not exist"),
        (["--out", "w.pt", "--plot", "p.xyz"], "the file type must be one of"),
        (["--out", "w.pt", "--report", "nodir/r.json"], "--report nodir/r.json"),
        (["--out", "w.pt", "--rate-max-rounds", "1"], "--rate-max-rounds: 1: must be an integer of at least 2"),
        (["--out", "w.pt", "--rate-precision", "nan"], "--rate-precision"),
        (["--out", "w.pt", "--beta", "inf"], "--beta"),
        (["--out", "w.pt", "--scale-tolerance", "2"], "--scale-tolerance: 2: must be a number in [0, 1)"),
        (["--out", "w.pt", "--scale-mode", "fast"], "--scale-mode: fast: must be one of 'exact', 'approximate'"),
    ],
)
def test_bad_outputs_and_option_values_are_usage_errors_before_any_work(
    extra: list[str], message: str, tmp_path: Path
) -> None:
    result = run_cli("init", "plain-cnn", "--data", "smooth", *extra, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_factory_that_raises_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def net():\n    raise ValueError('boom')\n")
    result = run_cli("init", "broken:net", "--data", "smooth", "--out", "w.pt", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "magicinit: error: model 'broken:net': the factory raised ValueError: boom"


def test_array_types_are_read_faithfully(tmp_path: Path) -> None:
    values = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    np.save(tmp_path / "big_endian.npy", values.astype(">f4"))
    assert torch.equal(load_images(str(tmp_path / "big_endian.npy"), standardize=False), torch.from_numpy(values))
    np.save(tmp_path / "int64.npy", np.full((4, 2), 200, dtype=np.int64))
    assert torch.equal(load_images(str(tmp_path / "int64.npy"), standardize=False), torch.full((4, 2), 200.0))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(magicinit.MagicInitError, match=r"empty\.npy.*no samples"):
        load_images(str(tmp_path / "empty.npy"))
    with pytest.raises(magicinit.MagicInitError, match="--input-size applies to images"):
        load_images(str(tmp_path / "int64.npy"), input_size=8)
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(magicinit.MagicInitError, match=r"cut\.npz' cannot be read"):
        load_images(str(tmp_path / "cut.npz"))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "deep"
    folder.mkdir()
    for i in range(3):
        ramp = (np.linspace(0, 65535, 64).reshape(8, 8) * (i + 1) / 3).astype(np.uint16)
        Image.fromarray(ramp).save(folder / f"{i}.png")
    images = load_images(str(folder), input_size=8, channels=1, standardize=False)
    assert images.shape == (3, 1, 8, 8)
    assert images.min() < 0.05 and images.max() > 0.95 and images.std() > 0.2


@pytest.mark.slow
def test_cli_scale_mode_reaches_the_report(tmp_path: Path) -> None:
    result = run_cli(
        "init",
        "plain-cnn",
        "--data",
        "smooth",
        *SMALL,
        "--out",
        "w.pt",
        "--report",
        "r.json",
        "--scale-mode",
        "approximate",
        "--scale-tolerance",
        "0.02",
        "--verify-rates",
        "--across-normalization",
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert settings["scale_mode"] == "approximate" and settings["scale_tolerance"] == 0.02
    assert settings["verify_rates"] is True and settings["across_normalization"] is True


# --- an output never replaces an input (issue 26) ---------------------------------------------------------------


TINY_FACTORY = (
    "from collections import OrderedDict\n"
    "from torch import nn\n"
    "def tiny():\n"
    "    return nn.Sequential(OrderedDict(features=nn.Conv2d(3, 4, 3), act=nn.ReLU(), flat=nn.Flatten(),\n"
    "                                     classifier=nn.Linear(4 * 6 * 6, 3)))\n"
)


@pytest.fixture
def inputs_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The working directory ``tmp_path`` with inputs: weights, data (a file and a folder of images) and a
    model factory's module; reading any data or building any model fails the test."""
    from PIL import Image

    from magicinit.tools import cli

    monkeypatch.chdir(tmp_path)
    torch.save(build_model("plain-cnn", depth=4, width=4).state_dict(), "trained.pt")
    np.save("x.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    (tmp_path / "images" / "nested").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save("images/nested/0.png")
    (tmp_path / "my_models.py").write_text(TINY_FACTORY)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("read or built before the usage error")

    monkeypatch.setattr(cli, "load_images", refuse)
    monkeypatch.setattr(cli, "load_model", refuse)
    return tmp_path


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links followed) by its path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "args,message",
    [
        (
            [
                "rescale",
                "plain-cnn",
                "--weights",
                "trained.pt",
                "--data",
                "x.npy",
                "--out",
                "w.pt",
                "--report",
                "trained.pt",
            ],
            "--report trained.pt: is the file --weights reads (trained.pt)",
        ),
        (["init", "plain-cnn", "--data", "x.npy", "--out", "x.npy"], "--out x.npy: is the file --data reads (x.npy)"),
        (
            ["init", "plain-cnn", "--data", "x.npy", "--out", "w.pt", "--report", "./images/../x.npy"],
            "--report images/../x.npy: is the file --data reads (x.npy)",
        ),
        (
            ["diagnose", "plain-cnn", "--weights", "trained.pt", "--data", "smooth", "--report", "link.json"],
            "--report link.json: is the file --weights reads (trained.pt)",
        ),
        (
            ["init", "plain-cnn", "--data", "x.npy", "--out", "hard.pt"],
            "--out hard.pt: is the file --data reads (x.npy)",
        ),
        (
            ["init", "my_models:tiny", "--data", "x.npy", "--out", "my_models.py"],
            "--out my_models.py: is the file MODEL 'my_models:tiny' reads (my_models.py)",
        ),
        (
            ["diagnose", "plain-cnn", "--data", "images", "--input-size", "8", "--plot", "images/nested/p.png"],
            "--plot images/nested/p.png: is an image in the --data folder images",
        ),
        (
            ["diagnose", "plain-cnn", "--data", "images", "--input-size", "8", "--plot", "outside.PNG"],
            "--plot outside.PNG: is an image in the --data folder images",
        ),
    ],
)
def test_an_output_that_is_an_input_is_a_usage_error_before_anything_is_read(
    inputs_here: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from magicinit.tools.cli import main

    (inputs_here / "link.json").symlink_to(inputs_here / "trained.pt")
    (inputs_here / "hard.pt").hardlink_to(inputs_here / "x.npy")
    (inputs_here / "outside.PNG").write_bytes(b"an existing image that the data folder links to")
    (inputs_here / "images" / "link.png").symlink_to(inputs_here / "outside.PNG")
    before = file_bytes(inputs_here)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert file_bytes(inputs_here) == before


def test_outputs_beside_the_inputs_are_allowed(
    inputs_here: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from magicinit.tools import cli

    monkeypatch.setitem(cli.COMMANDS, "init", lambda args: None)  # the checks before any work, and no work
    for args in (
        ["init", "my_models:tiny", "--weights", "trained.pt", "--data", "x.npy", "--out", "w.pt", "--report", "r.json"],
        ["init", "plain-cnn", "--data", "images", "--input-size", "8", "--out", "images/w.pt", "--plot", "p.png"],
        ["init", "plain-cnn", "--data", "smooth", "--out", "smooth.pt", "--report", "my_models.json"],
    ):
        assert cli.main(args) == 0, capsys.readouterr().err


def test_an_unknown_skip_name_is_a_usage_error_before_the_data_is_read(
    inputs_here: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from magicinit.tools import cli

    monkeypatch.setattr(cli, "load_model", load_model)  # the model is built; the data must not be read
    code = cli.main(
        ["init", "my_models:tiny", "--data", "x.npy", "--skip", "features", "--skip", "clasifier", "--out", "w.pt"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "--skip 'clasifier': the model has no module or parameter of that name; close: 'classifier'" in error
    assert len(error.strip().splitlines()) == 1
    code = cli.main(["diagnose", "plain-cnn", "--data", "x.npy", "--skip", "99"])  # its channels come from the data
    assert code == 2 and "--skip '99'" in capsys.readouterr().err
    assert not (inputs_here / "w.pt").exists()


def test_quiet_leaves_out_the_eps_warning_which_otherwise_prints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from magicinit.tools.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "normed.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),\n"
        "                         nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))\n"
    )
    args = ["init", "normed:net", "--data", "smooth", "--input-size", "8", "--samples", "16", "--out", "w.pt"]
    args += ["--rate-precision", "0.2", "--rate-max-rounds", "2", "--across-normalization"]
    assert main(args) == 0
    assert "warning: 2 normalization layer(s) need their new eps" in capsys.readouterr().err
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def image_folder_and_tars(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A folder of images (PNG and JPEG, RGB and grayscale, several sizes, nested, a non-image file) and tar
    archives of it (plain and compressed, members named ``./...``), all made here."""
    import tarfile

    from PIL import Image

    folder = tmp_path / "images"
    (folder / "b" / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.new("RGB", (12, 10), (255, 0, 51)).save(folder / "flat.png")  # known content
    for index in range(4):
        pixels = (rng.random((10 + index, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "b" / f"{index}.png")
        Image.fromarray(pixels).save(folder / "b" / "c" / f"{index}.jpg", quality=90)
    Image.fromarray((rng.random((9, 9)) * 255).astype(np.uint8)).save(folder / "b-gray.png")  # after b/ by parts
    (folder / "notes.txt").write_text("not an image")
    tars = {}
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar.bz2", "w:bz2")):
        tars[suffix] = tmp_path / f"shard{suffix}"
        with tarfile.open(tars[suffix], mode) as tar:
            tar.add(folder, arcname=".")
    return folder, tars


def test_a_tar_of_images_reads_as_the_folder_it_holds(tmp_path: Path) -> None:
    folder, tars = image_folder_and_tars(tmp_path)
    for options in (
        {"input_size": 8},
        {"input_size": 6, "samples": 5, "seed": 3},  # the same random subset of the same sorted names
        {"input_size": 8, "channels": 1, "standardize": False},
    ):
        from_folder = load_images(str(folder), **options)
        assert from_folder.shape[0] == options.get("samples", 10)
        for tar in tars.values():
            assert torch.equal(load_images(str(tar), **options), from_folder), (tar, options)
    flat = load_images(str(tars[".tar"]), input_size=4, standardize=False)[-1]  # flat.png sorts last
    assert torch.allclose(flat, torch.tensor([1.0, 0.0, 0.2])[:, None, None].expand(3, 4, 4))


def test_a_tar_given_to_the_command_line_gives_the_weights_a_folder_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from magicinit.tools.cli import main

    folder, tars = image_folder_and_tars(tmp_path)
    monkeypatch.chdir(tmp_path)
    weights = {}
    for data in (folder, tars[".tar.gz"]):
        out = tmp_path / f"{data.name}.pt"
        args = ["init", "plain-cnn", *SMALL, "--data", str(data), "--input-size", "8", "--out", str(out), "--quiet"]
        assert main(args) == 0
        weights[data] = torch.load(out, weights_only=True)
    from_folder, from_tar = weights.values()
    assert from_folder.keys() == from_tar.keys()
    assert all(torch.equal(from_folder[name], from_tar[name]) for name in from_folder)


def test_tar_archives_that_cannot_be_read_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import re
    import tarfile

    from magicinit.tools.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("no images here")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        tar.add(text, arcname="notes.txt")
    broken = tmp_path / "broken.tar"
    (tmp_path / "bad.png").write_bytes(b"not a PNG")
    with tarfile.open(broken, "w") as tar:
        tar.add(tmp_path / "bad.png", arcname="./shard/bad.png")
    cut = tmp_path / "cut.tar.gz"
    _, tars = image_folder_and_tars(tmp_path)
    cut.write_bytes(tars[".tar.gz"].read_bytes()[:300])
    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"not a tar archive at all")
    for path, message in (
        (empty, f"data archive '{empty}' has no images"),
        (broken, f"image 'shard/bad.png' in '{broken}' cannot be read"),
        (cut, f"data archive '{cut}' cannot be read as a tar archive"),
        (garbage, f"data archive '{garbage}' cannot be read as a tar archive"),
    ):
        with pytest.raises(magicinit.MagicInitError, match=re.escape(message)):
            load_images(str(path), input_size=8)
    with pytest.raises(magicinit.MagicInitError, match="give the images' size with --input-size"):
        load_images(str(tars[".tar"]))
    assert main(["diagnose", "plain-cnn", "--data", str(broken), "--input-size", "8"]) == 1
    error = capsys.readouterr().err
    assert f"image 'shard/bad.png' in '{broken}' cannot be read" in error and len(error.strip().splitlines()) == 1


def test_an_output_that_names_the_data_tar_is_a_usage_error(
    inputs_here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tarfile

    from magicinit.tools.cli import main

    with tarfile.open("shard.tar.gz", "w:gz") as tar:
        tar.add("images", arcname=".")
    (inputs_here / "shard-link.json").symlink_to(inputs_here / "shard.tar.gz")
    before = file_bytes(inputs_here)
    for args, message in (
        (["--out", "shard.tar.gz"], "--out shard.tar.gz: is the file --data reads (shard.tar.gz)"),
        (["--out", "w.pt", "--report", "shard-link.json"], "--report shard-link.json: is the file --data reads"),
    ):
        assert main(["init", "plain-cnn", "--data", "shard.tar.gz", "--input-size", "8", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and message in captured.err, captured.err
    assert file_bytes(inputs_here) == before
