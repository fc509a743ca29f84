"""magicinit.tools.plots.plot_filters and ``--plot-filters``: which filter is drawn where, in which colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from magicinit import MagicInitError
from magicinit.tools.cli import main
from magicinit.tools.nets import build_model
from magicinit.tools.plots import FILTER_CELL_PIXELS, first_convolution, plot_filters

pytest.importorskip("matplotlib")
PIL_IMAGE = pytest.importorskip("PIL.Image")


def pixels(path: Path) -> np.ndarray:
    """The picture as ``(height, width, 3)`` integers 0..255."""
    with PIL_IMAGE.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def mask(picture: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Where ``picture`` is ``colour`` (each of red, green, blue 255 or 0), give or take antialiasing."""
    return np.all(np.abs(picture - np.array(colour)) < 40, axis=-1)


def box(where: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the true pixels."""
    rows, cols = np.nonzero(where)
    assert rows.size, "colour not found"
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def runs(flags: np.ndarray) -> int:
    """How many separate runs of true values ``flags`` has."""
    return int(np.sum(np.diff(np.concatenate([[0], flags.astype(int)])) == 1))


def blue_filters_with_one_red(count: int, red: int) -> torch.Tensor:
    """``count`` 5x5 RGB filters, all +1 in blue, but filter ``red``: 7 in red, shifted by -2 (min-max: pure red)."""
    weights = torch.zeros(count, 3, 5, 5)
    weights[:, 2] = 1.0
    weights[red] = 0.0
    weights[red, 0] = 7.0
    weights[red] -= 2.0
    return weights


def test_each_filter_is_drawn_in_its_cell_normalized_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "filters.png"
    plot_filters(blue_filters_with_one_red(8, red=5), path, columns=4)  # 2 rows of 4; filter 5: row 1, column 1
    picture = pixels(path)
    zoom = round(FILTER_CELL_PIXELS / 5)  # screen pixels per weight; one blank weight between filters
    top, left, height, width = box(mask(picture, (0, 0, 255)))
    assert (height, width) == pytest.approx((11 * zoom, 23 * zoom), abs=2)  # the whole grid: 2 x 5 + 1, 4 x 5 + 3
    red_top, red_left, red_height, red_width = box(mask(picture, (255, 0, 0)))
    assert (red_height, red_width) == pytest.approx((5 * zoom, 5 * zoom), abs=2)
    assert (red_top - top, red_left - left) == pytest.approx((6 * zoom, 6 * zoom), abs=2)


def test_one_panel_per_entry_in_order_and_gray_for_one_channel(tmp_path: Path) -> None:
    path = tmp_path / "filters.png"
    gray = torch.zeros(3, 1, 5, 5)
    gray[:, 0, :, 2:] = 1.0  # right three columns white, left two black
    panels = {"a": blue_filters_with_one_red(4, red=0), "b": blue_filters_with_one_red(4, red=3), "gray": gray}
    plot_filters(panels, path, title="three panels")
    picture = pixels(path)
    red = mask(picture, (255, 0, 0))
    assert runs(red.any(axis=1)) == 2  # a red cell in each of the two RGB panels, one above the other
    red_rows = np.nonzero(red.any(axis=1))[0]
    upper = red[: red_rows[0] + 1].any(axis=0)
    lower = red[red_rows[-1] :].any(axis=0)
    assert np.nonzero(upper)[0].mean() < np.nonzero(lower)[0].mean()  # panel a's red filter is first, b's last
    zoom = round(FILTER_CELL_PIXELS / 5)
    solid_black = sliding_window_view(mask(picture, (0, 0, 0)), (zoom, zoom)).all(axis=(2, 3))  # not text
    assert np.nonzero(solid_black.any(axis=1))[0].min() > red_rows.max()  # the gray panel is last
    assert runs(solid_black.any(axis=0)) == 3  # its three filters' black left parts, side by side


def test_only_the_first_max_filters_and_a_model_s_first_convolution(tmp_path: Path) -> None:
    path = tmp_path / "filters.png"
    plot_filters(blue_filters_with_one_red(10, red=5), path, max_filters=4)
    assert not mask(pixels(path), (255, 0, 0)).any()
    model = nn.Sequential(nn.ConvTranspose2d(3, 3, 3), nn.Conv2d(3, 6, 5), nn.ReLU(), nn.Conv2d(6, 3, 3))
    with torch.no_grad():
        model[1].weight.copy_(blue_filters_with_one_red(6, red=2))
    assert first_convolution(model) == ("1", model[1])
    plot_filters({"net": model}, path)
    assert mask(pixels(path), (255, 0, 0)).any()


def test_filters_that_cannot_be_drawn_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "filters.png"
    with pytest.raises(MagicInitError, match=r"filters of shape \(4, 5, 3, 3\).*1 \(gray\) or 3 \(RGB\)"):
        plot_filters(torch.zeros(4, 5, 3, 3), path)
    with pytest.raises(MagicInitError, match="no 2-d convolution"):
        plot_filters(nn.Sequential(nn.Linear(3, 4)), path)
    with pytest.raises(MagicInitError, match="max_filters=0"):
        plot_filters(torch.zeros(4, 3, 3, 3), path, max_filters=0)
    assert not path.exists()


@pytest.fixture
def images_npy(tmp_path: Path) -> Path:
    path = tmp_path / "images.npy"
    np.save(path, (np.random.default_rng(0).random((24, 3, 10, 10)) * 255).astype(np.uint8))
    return path


SMALL = ["--model-args", '{"depth": 3, "width": 4}', "--rate-precision", "0.3", "--rate-max-rounds", "2"]


def test_the_command_line_draws_the_first_convolution_after_init(images_npy: Path, tmp_path: Path) -> None:
    weights, drawn, expected = tmp_path / "w.pt", tmp_path / "filters.png", tmp_path / "expected.png"
    command = ["init", "plain-cnn", *SMALL, "--data", str(images_npy), "--out", str(weights), "--quiet"]
    assert main([*command, "--plot-filters", str(drawn)]) == 0
    model = build_model("plain-cnn", depth=3, width=4)
    before = model[0].weight.detach().clone()
    model.load_state_dict(torch.load(weights, weights_only=True))
    plot_filters(model, expected, title="magicinit init plain-cnn")
    assert np.array_equal(pixels(drawn), pixels(expected))  # the initialized filters, as plot_filters draws them
    plot_filters(before, expected, title="magicinit init plain-cnn")
    assert not np.array_equal(pixels(drawn), pixels(expected))


def test_the_command_line_checks_the_filters_picture_as_every_output(
    images_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drawn = tmp_path / "filters.png"
    diagnose = ["diagnose", "plain-cnn", *SMALL, "--data", str(images_npy)]
    assert main([*diagnose, "--quiet", "--plot-filters", str(drawn)]) == 0
    assert pixels(drawn).shape[0] > 50
    assert main([*diagnose, "--plot", str(drawn), "--plot-filters", str(drawn)]) == 2
    assert "--plot and --plot-filters name the same file" in capsys.readouterr().err
    assert main([*diagnose, "--plot-filters", str(tmp_path / "filters.xyz")]) == 2
    assert "the file type must be one of" in capsys.readouterr().err
    folder = tmp_path / "images"
    folder.mkdir()
    PIL_IMAGE.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "0.png")
    in_data = ["diagnose", "plain-cnn", *SMALL, "--data", str(folder), "--input-size", "8"]
    assert main([*in_data, "--plot-filters", str(folder / "filters.png")]) == 2
    assert "is an image in the --data folder" in capsys.readouterr().err


def test_the_command_line_refuses_filters_of_a_model_without_convolution(
    images_npy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mlp_factory.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(300, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    command = ["diagnose", "mlp_factory:build", *SMALL[2:], "--data", str(images_npy), "--plot-filters", "m.png"]
    assert main(command) == 2
    assert "--plot-filters m.png: Sequential has no 2-d convolution" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()
