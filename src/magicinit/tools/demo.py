"""The main job on built-in defaults: does a deep plain CNN train with magicinit?

``magicinit demo`` (or ``python -m magicinit demo``): a plain 20-layer ReLU CNN
without batch norm is trained briefly on scikit-learn's handwritten digits
(1797 8x8 images, offline) from torch's default initialization, kaiming
normal, and ``magicinit.init_`` with its defaults, at a few learning rates.
It prints the init report and a table of test accuracy and loss, and writes
two figures: the training-loss curves and the per-layer statistics of the
magicinit report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import Report, init_
from .._core.report import render_table
from .baselines import BASELINES
from .nets import plain_cnn
from .plots import plot_curves, plot_layer_statistics
from .readers import digits

__all__ = ["DemoSettings", "TrainingRun", "evaluate", "run_demo", "train"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains, and how (the defaults are the documented demo)."""

    depth: int = 20
    width: int = 32
    epochs: int = 15
    batch_size: int = 64
    learning_rates: tuple[float, ...] = (0.001, 0.003, 0.01)
    init_samples: int = 256
    test_samples: int = 500
    validation_samples: int = 200  # held out of the training images; they pick each init's learning rate
    seed: int = 0


@dataclass
class TrainingRun:
    """One training run: per-step losses, the final test figures and the times."""

    init: str
    learning_rate: float
    losses: list[float] = field(default_factory=list)
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    validation_accuracy: float = float("nan")
    init_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 % of steps (NaN once it diverged)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else float("nan")


def train(
    model: nn.Module, images: Tensor, labels: Tensor, *, steps: int, batch_size: int, learning_rate: float, seed: int
) -> list[float]:
    """``steps`` steps of SGD with momentum 0.9 on cross-entropy, over seeded reshuffles of the
    data; returns every step's loss (and stops early once a loss is NaN or Inf)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    order = torch.empty(0, dtype=torch.long)
    while len(losses) < steps:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    return losses


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode, no grad) on ``images``."""
    model.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            target = labels[start : start + batch_size]
            correct += int((logits.argmax(1) == target).sum())
            total_loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return correct / len(images), total_loss / len(images)


def run_demo(
    settings: DemoSettings = DemoSettings(),
    out_dir: Path | None = None,
    on_run: Callable[[TrainingRun], None] | None = None,
    progress: bool = False,
) -> tuple[Report, list[TrainingRun], str]:
    """Train the demo's nets; returns the magicinit report, every run, and the result table.

    With ``out_dir``, writes ``loss_curves.png`` and ``layer_statistics.png`` there.
    """
    images, labels = digits()
    images = (images - images.mean()) / images.std()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
    test = order[: settings.test_samples]
    validation = order[settings.test_samples : settings.test_samples + settings.validation_samples]
    trainset = order[settings.test_samples + settings.validation_samples :]
    inits: dict[str, Callable[[nn.Module], Report | None]] = {
        "torch default": BASELINES["default"],
        "kaiming normal": BASELINES["kaiming"],
        "magicinit": lambda model: init_(
            model, images[trainset[: settings.init_samples]], seed=settings.seed, progress=progress
        ),
    }
    report: Report | None = None
    runs = []
    for name, initialize in inits.items():
        for learning_rate in settings.learning_rates:
            run = TrainingRun(name, learning_rate)
            # Every draw seeded: the model's construction and the init (torch seeds its global generator
            # differently in every process), so each init starts from the same weights at every learning rate
            # and every run of the demo gives the same table.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                model = plain_cnn(settings.depth, settings.width, in_channels=1, classes=10)
                start = time.perf_counter()
                result = initialize(model)
                run.init_seconds = time.perf_counter() - start
            report = result if isinstance(result, Report) else report
            start = time.perf_counter()
            steps = settings.epochs * math.ceil(len(trainset) / settings.batch_size)
            run.losses = train(
                model,
                images[trainset],
                labels[trainset],
                steps=steps,
                batch_size=settings.batch_size,
                learning_rate=learning_rate,
                seed=settings.seed,
            )
            run.train_seconds = time.perf_counter() - start
            run.test_accuracy, run.test_loss = evaluate(model, images[test], labels[test])
            run.validation_accuracy = evaluate(model, images[validation], labels[validation])[0]
            runs.append(run)
            if on_run is not None:
                on_run(run)
    assert report is not None
    table = _table(runs, settings)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        best = _best_runs(runs)
        curves = {f"{run.init} (lr {run.learning_rate:g})": run.losses for run in best.values()}
        plot_curves(
            {f"plain {settings.depth}-layer CNN on digits, best lr per init": curves}, out_dir / "loss_curves.png"
        )
        plot_layer_statistics(report, out_dir / "layer_statistics.png", title="magicinit.init_ on the demo CNN")
    return report, runs, table


def _best_runs(runs: list[TrainingRun]) -> dict[str, TrainingRun]:
    """Per init (in the order of ``runs``), the run with the best validation accuracy (ties: the lower final
    training loss; diverged runs last)."""

    def rank(run: TrainingRun) -> tuple[float, float]:
        if not math.isfinite(run.final_loss):
            return (math.inf, math.inf)
        return (-run.validation_accuracy, run.final_loss)

    best: dict[str, TrainingRun] = {}
    for run in runs:
        if run.init not in best or rank(run) < rank(best[run.init]):
            best[run.init] = run
    return best


def _table(runs: list[TrainingRun], settings: DemoSettings) -> str:
    """One row per init: test accuracy at every learning rate, and at the one validation picks."""
    best = _best_runs(runs)
    header = [
        "init",
        *(f"acc @ lr {lr:g}" for lr in settings.learning_rates),
        "best lr",
        "test acc",
        "test loss",
        "train loss",
        "init s",
        "train s",
    ]
    rows = []
    for name, chosen in best.items():
        by_rate = {run.learning_rate: run for run in runs if run.init == name}
        rows.append(
            [
                name,
                *(_accuracy(by_rate[lr]) for lr in settings.learning_rates),
                f"{chosen.learning_rate:g}",
                _accuracy(chosen),
                f"{chosen.test_loss:.3f}" if math.isfinite(chosen.test_loss) else "diverged",
                f"{chosen.final_loss:.3f}" if math.isfinite(chosen.final_loss) else "diverged",
                f"{chosen.init_seconds:.2f}",
                f"{chosen.train_seconds:.1f}",
            ]
        )
    return render_table(header, rows) + (
        f"\nacc: on {settings.test_samples} held-out test images. best lr: per init, the learning rate with the best "
        f"accuracy on {settings.validation_samples} validation images held out of the training set (not the test "
        "images); train loss: the mean over the run's last 10 % of steps. Every draw is seeded "
        f"(seed {settings.seed}), so a rerun on the same machine gives this table."
    )


def _accuracy(run: TrainingRun) -> str:
    return f"{100 * run.test_accuracy:.1f}%" if math.isfinite(run.final_loss) else "diverged"
