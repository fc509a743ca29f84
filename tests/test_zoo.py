"""torchvision's classifiers: initialized without error, a valid report, finite outputs; and bench/zoo.py's
tables and time columns on one tiny model (they add up to init_ / forward), its families and its Hugging Face
section where transformers is missing.

torchvision is in the test extra (constraints.txt pins it); these tests are
skipped, with a reason, where it is missing. README ("The torchvision model
zoo") tabulates what each model gets; ``bench/zoo.py`` regenerates that table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import magicinit
from conftest import AFFINE, channel_stats, first_call_outputs, plain_cnn
from magicinit.tools.cli import load_model
from magicinit.tools.nets import TORCHVISION_CLASSIFIERS

pytest.importorskip("torchvision")

FAST = {"squeezenet1_1"}  # the one classifier of the fast lane (-m "not slow"): the others take 5-70 s each


def build(name: str) -> nn.Module:
    """The model as the command line's ``torchvision:NAME`` builds it (no pretrained weights), seeded."""
    torch.manual_seed(0)
    return load_model(f"torchvision:{name}", {})


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")
@pytest.mark.usefixtures("one_thread")  # efficientnet_b0's channel stds depend on the float32 order (below)
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[] if name in FAST else pytest.mark.slow) for name in TORCHVISION_CLASSIFIERS]
)
def test_torchvision_classifier_is_initialized_with_a_valid_report(name: str) -> None:
    model = build(name)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    affine = [n for n, m in model.named_modules() if isinstance(m, AFFINE)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rescaling would change the output", no other warning
        # across_normalization: Part 2 through every batch/layer norm, the hardest graph to get right
        report = magicinit.init_(model, x, seed=0, rate_precision=0.2, across_normalization=True)

    assert [layer.name for layer in report.layers] == affine
    assert report.rate_spread_before is not None and report.rate_spread_after is not None
    # efficientnet_b0's float32 forward amplifies rounding (see below): a rescaling exact in
    # float64 (its twin check passed, or a warning would have failed this test) moves it by ~4e-3
    assert report.output_change is not None and report.output_change < (1e-2 if name == "efficientnet_b0" else 1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model.eval()(x)).all()
    outputs = first_call_outputs(model, x)
    modules = dict(model.named_modules())
    for layer in report.layers:
        if layer.status == "never called":  # googlenet's auxiliary heads run in training mode only
            assert name == "googlenet" and ".aux" in f".{layer.name}" and layer.name not in outputs
            continue
        assert layer.status == "initialized", (layer.name, layer.status, layer.notes)
        assert layer.rate_before is not None and layer.rate_after is not None
        # Part 1 gave every channel the same std, and Part 2 scales a layer's channels alike.
        # Up to rounding: efficientnet_b0 amplifies float32 rounding along its depth (its
        # float32 forward is 1e-3 away from float64 at the classifier; with its batch norms'
        # inputs rescaled by Part 2, float32 channel stds move by up to 1.2e-2 where float64
        # ones move by 1e-11), so 2e-2 there and 1e-2 elsewhere; a wrong normalization is an
        # O(1) spread. Its squeeze-excitation layers see 8 pooled inputs that barely differ, so
        # their weights fit float32 statistics: measured in float64 the spread is as large (2e-2
        # at features.7.0.block.2.fc2), and at 2 threads it is 2.2e-2 in float32: one thread.
        live = [c for c in range(len(layer.channel_std_after)) if c not in layer.zero_variance_channels]
        _, std = channel_stats(modules[layer.name], outputs[layer.name])
        std = std[live]
        assert float((std / std.mean() - 1).abs().max()) < (2e-2 if name == "efficientnet_b0" else 1e-2), layer.name
        fixed = layer.input_scale_fixed_by is not None and layer.output_scale_fixed_by is not None
        if fixed:
            assert layer.weight_scale == 1.0, layer.name


# --- bench/zoo.py: its tables, and where init_'s time goes, on one tiny model -------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_table  # noqa: E402
import zoo  # noqa: E402
import zoo_models  # noqa: E402

TINY = zoo_models.ModelSpec(
    "tiny_cnn",
    lambda: plain_cnn(depth=4, width=8),
    lambda count: torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
    input_words="{count} Gaussian 3 x 16 x 16 inputs",
)


@pytest.fixture(scope="module")
def tiny_rows() -> tuple[zoo.ZooRow, zoo.ZooRow]:
    """The tiny model measured by bench/zoo.py in both scale modes (one copy each: a few seconds)."""
    return zoo.measure(TINY), zoo.measure(TINY, scale_mode="approximate")


def figures(cell: str) -> float:
    return 0.0 if cell == "-" else float(cell)


def test_zoo_time_columns_add_up_to_init_over_forward(tiny_rows: tuple[zoo.ZooRow, zoo.ZooRow]) -> None:
    exact, approximate = tiny_rows
    for row in tiny_rows:
        assert row.error is None and row.init_seconds is not None and row.forward_seconds is not None
        stages = zoo.stage_forwards(row)
        assert {"trace", "Part 1", "rates", "solve", "checks", "other"} <= set(stages)
        # the stages (the stopwatch's, and the rest of init_'s measured wall time) add up to the ratio exactly
        assert sum(stages.values()) == pytest.approx(row.init_seconds / row.forward_seconds, rel=1e-9)
        assert row.init_over_forward == pytest.approx(row.init_seconds / row.forward_seconds, rel=1e-9)
        # what the stopwatch did not see ("other" = its own other, Part 2's and the API's) stays small
        assert all(value >= 0 for key, value in stages.items() if key != "other")
        assert stages["other"] > -1e-3 * sum(stages.values())
        # every sample drawn in the first round, and no more than rate_max_rounds (16) rounds' draws
        assert row.rate_draws is not None and row.samples_used == 8 and 8 <= row.rate_draws <= 16 * 8
    assert "retrace" in zoo.stage_forwards(approximate) and "retrace" not in zoo.stage_forwards(exact)

    table = zoo.time_table([exact, approximate])
    lines = [line for line in table.splitlines() if line.startswith("| tiny_cnn |")]
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert len(lines) == 2
    first, last = header.index("trace"), header.index("other")
    for line, row in zip(lines, tiny_rows):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == row.scale_mode and len(cells) == len(header)
        total = float(cells[header.index("init_ / forward")])
        parts = [figures(cell) for cell in cells[first : last + 1]]
        # each printed figure is rounded to 0.05: the printed stages add up to the printed total within that
        assert abs(sum(parts) - total) <= 0.05 * (len(parts) + 1) + 1e-9, line
        assert total == pytest.approx(row.init_over_forward, abs=0.05)
        assert "%" in cells[header.index("most of the time")]
        assert row.kaiming_seconds is not None and row.kaiming_seconds > 0
        kaiming = float(cells[header.index("kaiming_normal_ / forward")])
        assert kaiming == pytest.approx(row.kaiming_seconds / row.forward_seconds, abs=0.05)
        # the rates' errors, worst and median layer's, beside the precision asked: as an init_ of the same
        # model, inputs and seed reports them (the bench's copies are seeded alike)
        report = magicinit.init_(
            zoo_models.build(TINY), TINY.inputs(8), seed=0, scale_mode=row.scale_mode, across_normalization=True
        )
        errors = sorted(
            layer.rate_before_log_error
            for layer in report.layers
            if layer.rate_before_log_error is not None and 0 < (layer.rate_before or 0) < float("inf")
        )
        worst, median = cells[header.index("rate error worst / median (asked)")].removesuffix(" (0.02)").split(" / ")
        assert float(worst) == pytest.approx(errors[-1], abs=5e-4), line
        assert float(median) == pytest.approx(errors[len(errors) // 2], abs=5e-4), line


def test_a_row_above_the_target_says_why_from_its_own_figures(tiny_rows: tuple[zoo.ZooRow, zoo.ZooRow]) -> None:
    exact = tiny_rows[0]
    # 40 forwards, 30 of them the rates': their 128 draws left the worst layer at 0.1 against 0.02 asked, so the
    # precision would take (0.1 / 0.02)^2 = 25 times the draws and the rates' forwards
    slow = dataclasses.replace(
        exact,
        forward_seconds=0.5,
        init_seconds=20.0,
        seconds={"data": 0.0, "trace": 0.5, "within": 1.0},
        between_seconds={"rates": 15.0, "solve": 0.0, "checks": 2.5},
        rate_draws=128,
        samples_used=8,
        rate_errors=(0.1, 0.05),
        rate_precision=0.02,
    )
    assert zoo.stage_forwards(slow)["rates"] == pytest.approx(30.0)
    why = zoo.why_above_target(slow)
    assert why.startswith("rates: 30 forwards for 128 draws (16 rounds of the 8 samples)")
    assert why.endswith("the budget ran out at error 0.100: 0.02 would take about 3200 draws, 750 forwards")
    met = dataclasses.replace(slow, rate_errors=(0.019, 0.01))
    assert zoo.why_above_target(met).endswith("(16 rounds of the 8 samples), which error 0.02 took")
    approximate = dataclasses.replace(met, scale_mode="approximate", rounds=3, rate_measurements=2)
    assert "(16 rounds of the 8 samples per measurement, 2 measurements for 3 scale rounds)" in (
        zoo.why_above_target(approximate)
    )
    once = dataclasses.replace(approximate, rounds=1, rate_measurements=1)
    assert "per measurement, 1 measurement for 1 scale round)" in zoo.why_above_target(once)
    # another stage ahead of the rates: that stage; at or below the target: nothing to explain
    checked = dataclasses.replace(
        slow, between_seconds={"rates": 5.0, "solve": 0.0, "checks": 12.5}, kaiming_seconds=None
    )
    assert zoo.why_above_target(checked) == "checks: 25 forwards"
    # with torch.nn.init's time of the same layers measured, that stage's row gives it for comparison
    timed = dataclasses.replace(checked, kaiming_seconds=1.5)
    assert zoo.why_above_target(timed) == "checks: 25 forwards (kaiming_normal_ of the same layers alone: 3.0)"
    assert zoo.why_above_target(dataclasses.replace(slow, init_seconds=10.0, between_seconds={"rates": 7.0})) == "-"
    table = zoo.time_table([slow, exact])
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[-1] == "above 20 forwards: why"
    cells = [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]
    assert len(cells) == len(header) and cells[-1] == why


def test_zoo_tables_json_and_section(tiny_rows: tuple[zoo.ZooRow, zoo.ZooRow], tmp_path: Path) -> None:
    exact, approximate = tiny_rows
    failed = zoo.measure(zoo_models.ModelSpec("broken", lambda: nn.Conv2d(5, 4, 3), TINY.inputs))
    assert failed.error is not None and "RuntimeError" in failed.error and zoo.stage_forwards(failed) == {}
    device = torch.device("cpu")
    section = zoo.section_text("torchvision", device, 1, 3, [exact, failed], [approximate, failed])
    assert section.startswith("## bench/zoo.py\n")
    assert "| tiny_cnn | 4 |" in section and "| broken | failed: RuntimeError" in section
    assert "| tiny_cnn | approximate |" in section and "8 Gaussian 3 x 16 x 16 inputs" in section
    assert "\npython bench/zoo.py --models tiny_cnn broken --threads 1\n" in section  # the command that wrote it
    exact_only = zoo.section_text("torchvision", device, 2, 3, [exact], [], samples=64)
    assert exact_only.startswith("## bench/zoo.py --samples 64\n") and "in exact mode;" in exact_only
    assert "\npython bench/zoo.py --samples 64 --models tiny_cnn --no-approximate\n" in exact_only
    # the JSON keeps the keys bench/gpu_table.py reads, and adds the stages in forward passes
    (tmp_path / "zoo.json").write_text(zoo.json_rows([exact], [approximate], device, "torchvision", 3))
    data = json.loads((tmp_path / "zoo.json").read_text())
    row = data["rows"][0]
    assert {"name", "init_seconds", "forward_seconds", "init_over_forward", "spread_before", "rate_way"} <= set(row)
    assert sum(row["forward_equivalents"].values()) == pytest.approx(row["init_over_forward"], rel=1e-9)
    assert data["approximate_rows"][0]["between_seconds"]["retrace"] > 0
    problem, text = gpu_table.figures_zoo(tmp_path, gpu_table.Step("zoo", 0, 1.0, 90, "zoo.log"))
    assert problem is None and text.startswith("tiny_cnn: init_/fwd ")


def test_zoo_families_and_the_hugging_face_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert zoo.heading_and_command("timm", torch.device("cpu"), 1) == (
        "## bench/zoo.py --family timm",
        "python bench/zoo.py --family timm --repeats 1",
    )
    assert zoo.heading_and_command("torchvision", torch.device("cpu"), 3, samples=64) == (
        "## bench/zoo.py --samples 64",
        "python bench/zoo.py --samples 64",
    )
    assert {"coatnet_0_rw_224", "ghostnet_100", "cait_xxs24_224"} <= set(zoo_models.default_models("timm"))
    assert {"lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"} <= set(
        zoo_models.default_models("torchvision")
    )
    assert callable(zoo_models.detector_recipe()["raw_head_outputs"])  # docs/guide.md's block, run as written
    # without transformers the section says so (forced here, whether or not it is installed)
    monkeypatch.setattr(zoo, "hf_missing", lambda: "transformers not installed")
    results, out = tmp_path / "RESULTS.md", tmp_path / "hf.json"
    monkeypatch.setattr(
        sys, "argv", ["zoo.py", "--family", "hf", "--threads", "1", "--results", str(results), "--json", str(out)]
    )
    assert zoo.main() == 0
    text = results.read_text()
    assert "## bench/zoo.py --family hf\n" in text and "Not run: transformers not installed (models: t5, llama)" in text
    assert json.loads(out.read_text())["not_run"] == "transformers not installed"


def test_torch_init_seconds_times_a_copy_and_leaves_the_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = zoo_models.build(TINY)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    initialized: list[tuple[int, ...]] = []
    original = nn.init.kaiming_normal_

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        assert all(tensor is not p for p in model.parameters())  # a copy's weights, never the model's
        initialized.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(nn.init, "kaiming_normal_", counting)
    assert zoo.torch_init_seconds(model, torch.device("cpu")) > 0
    affine = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert affine and initialized == [tuple(m.weight.shape) for m in affine]  # every convolution and linear weight
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
