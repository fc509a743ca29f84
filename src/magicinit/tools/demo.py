"""The main job on built-in defaults: does a deep plain CNN train with magicinit?

``magicinit demo`` (or ``python -m magicinit demo``): a plain 20-layer ReLU CNN
without batch norm is trained briefly on scikit-learn's handwritten digits
(1797 8x8 images, offline) from torch's default initialization, kaiming
normal, and ``magicinit.init_`` with its defaults, at every learning rate of a
small grid and from several seeds. It prints the init report, a table of test
accuracy per init and learning rate (the mean over the seeds and its range),
and a verdict; it writes two figures: the training-loss curves (mean over the
seeds, one panel per learning rate) and the per-layer statistics of the
magicinit report.

The exact accuracies depend on the machine (the floating-point order changes
with the CPU and the thread count, and training amplifies it), so the verdict
says only what survives that: whether magicinit's range over the seeds lies
above another init's, overlaps it or lies below it, at every learning rate and
at each init's best one.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
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

__all__ = ["DemoSettings", "TrainingRun", "evaluate", "run_demo", "train", "verdict"]

CANDIDATE = "magicinit"  # the init the verdict compares with every other
TORCH_DEFAULT = "torch default"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains, and how (the defaults are the documented demo)."""

    depth: int = 20
    width: int = 32
    epochs: int = 4
    batch_size: int = 64
    learning_rates: tuple[float, ...] = (0.001, 0.003)
    seeds: int = 3  # runs per init and learning rate, seeded seed, seed + 1, ...
    # torch's default init stays at chance in every run tried (every seed, rate and thread count): the first
    # seeds_torch_default seeds show it at a fraction of the cost
    seeds_torch_default: int = 1
    init_samples: int = 256
    test_samples: int = 500
    pass_mark: float = 0.5  # the table counts the runs that reach this test accuracy (chance is 10 %)
    seed: int = 0  # also splits the images into training and test images

    def run_seeds(self, init: str = CANDIDATE) -> tuple[int, ...]:
        """The seed of each run of ``init`` at one learning rate (model, init and batch order)."""
        count = min(self.seeds, self.seeds_torch_default) if init == TORCH_DEFAULT else self.seeds
        return tuple(range(self.seed, self.seed + count))


@dataclass
class TrainingRun:
    """One training run: per-step losses, the final test figures and the times."""

    init: str
    learning_rate: float
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    init_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 % of steps (NaN once it diverged)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else float("nan")

    @property
    def diverged(self) -> bool:
        """Whether a training loss became NaN or infinite (training stopped there)."""
        return not math.isfinite(self.final_loss)

    @property
    def accuracy(self) -> float:
        """The test accuracy, 0 for a diverged run (its weights are not finite)."""
        return 0.0 if self.diverged else self.test_accuracy


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
    """Train the demo's nets; returns the magicinit report (of the first seed), every run, and the
    result table followed by the verdict.

    Every (init, seed) pair is initialized once and trained from a copy at every learning rate, so
    all learning rates of one seed start from the same weights. With ``out_dir``, writes
    ``loss_curves.png`` and ``layer_statistics.png`` there.
    """
    images, labels = digits()
    images = (images - images.mean()) / images.std()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
    test, trainset = order[: settings.test_samples], order[settings.test_samples :]
    train_images, train_labels = images[trainset], labels[trainset]
    steps = settings.epochs * math.ceil(len(trainset) / settings.batch_size)
    inits: dict[str, Callable[[nn.Module, int], Report | None]] = {
        TORCH_DEFAULT: lambda model, seed: BASELINES["default"](model),
        "kaiming normal": lambda model, seed: BASELINES["kaiming"](model),
        CANDIDATE: lambda model, seed: init_(
            model, train_images[: settings.init_samples], seed=seed, progress=progress
        ),
    }
    report: Report | None = None
    runs = []
    for name, initialize in inits.items():
        for seed in settings.run_seeds(name):
            # Every draw seeded: the model's construction and the init (torch seeds its global generator
            # differently in every process), so every run of the demo gives the same table on one machine.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                initialized = plain_cnn(settings.depth, settings.width, in_channels=1, classes=10)
                start = time.perf_counter()
                result = initialize(initialized, seed)
                init_seconds = time.perf_counter() - start
            if report is None and isinstance(result, Report):
                report = result
            for learning_rate in settings.learning_rates:
                run = TrainingRun(name, learning_rate, seed, init_seconds=init_seconds)
                model = copy.deepcopy(initialized)
                start = time.perf_counter()
                run.losses = train(
                    model,
                    train_images,
                    train_labels,
                    steps=steps,
                    batch_size=settings.batch_size,
                    learning_rate=learning_rate,
                    seed=seed,
                )
                run.train_seconds = time.perf_counter() - start
                run.test_accuracy, run.test_loss = evaluate(model, images[test], labels[test])
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    assert report is not None
    text = _table(runs, settings, steps) + "\n\n" + verdict(runs, settings)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_curves(
            {f"lr {rate:g}": _mean_curves(runs, rate) for rate in settings.learning_rates},
            out_dir / "loss_curves.png",
            title=f"plain {settings.depth}-layer CNN on digits: training loss, mean over the seeds",
        )
        plot_layer_statistics(report, out_dir / "layer_statistics.png", title="magicinit.init_ on the demo CNN")
    return report, runs, text


def verdict(runs: Sequence[TrainingRun], settings: DemoSettings) -> str:
    """What the runs show, in words that do not depend on the machine's rounding: against every other
    init, the learning rates where magicinit's range over the seeds lies above the other's, overlaps it
    or lies below it, and the same comparison at each init's best learning rate (the highest mean).

    Counts of runs above a pass mark are left to the table: a run near the mark crosses it on one
    machine and not on another.
    """
    grid = _grid(runs)
    mine = grid[CANDIDATE]
    lines = [f"Verdict, from the ranges over the seeds (all runs of one init at one rate), {CANDIDATE}:"]
    for name, theirs in grid.items():
        if name == CANDIDATE:
            continue
        where: dict[str, list[float]] = {"above": [], "overlapping": [], "below": []}
        for learning_rate in settings.learning_rates:
            where[_compare(mine[learning_rate], theirs[learning_rate])].append(learning_rate)
        if len(where["above"]) == len(settings.learning_rates):
            place = "above at every learning rate"
        else:
            place = "; ".join(f"{word} at lr {_rates(rates)}" for word, rates in where.items() if rates)
        best = _compare(mine[_best_rate(mine)], theirs[_best_rate(theirs)])
        at_best = {"above": f"{CANDIDATE} ahead", "overlapping": "a tie", "below": f"{name} ahead"}[best]
        lines.append(f"- against {name}: {place}; at each one's best learning rate, {at_best}.")
    return "\n".join(lines)


def _all(by_rate: dict[float, list[TrainingRun]]) -> list[TrainingRun]:
    return [run for seeded in by_rate.values() for run in seeded]


def _grid(runs: Sequence[TrainingRun]) -> dict[str, dict[float, list[TrainingRun]]]:
    """The runs by init and learning rate (in the order of ``runs``)."""
    grid: dict[str, dict[float, list[TrainingRun]]] = {}
    for run in runs:
        grid.setdefault(run.init, {}).setdefault(run.learning_rate, []).append(run)
    return grid


def _compare(mine: list[TrainingRun], theirs: list[TrainingRun]) -> str:
    """``above`` when every run of ``mine`` beats every run of ``theirs``, ``below`` when the reverse
    holds, ``overlapping`` otherwise."""
    if min(run.accuracy for run in mine) > max(run.accuracy for run in theirs):
        return "above"
    if max(run.accuracy for run in mine) < min(run.accuracy for run in theirs):
        return "below"
    return "overlapping"


def _best_rate(by_rate: dict[float, list[TrainingRun]]) -> float:
    """The learning rate with the highest mean accuracy (the first of equals)."""
    return max(by_rate, key=lambda rate: statistics.fmean(run.accuracy for run in by_rate[rate]))


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:g}" for rate in rates)


def _mean_curves(runs: Sequence[TrainingRun], learning_rate: float) -> dict[str, list[float]]:
    """Per init, the training loss at ``learning_rate`` averaged over the seeds, step by step, up to the
    first step where some seed's loss is not finite."""
    curves = {}
    for name, by_rate in _grid(runs).items():
        seeded = by_rate.get(learning_rate, [])
        if not seeded:
            continue
        length = min(len(run.losses) for run in seeded)
        mean = [statistics.fmean(run.losses[step] for run in seeded) for step in range(length)]
        finite = next((step for step, value in enumerate(mean) if not math.isfinite(value)), length)
        diverged = sum(run.diverged for run in seeded)
        label = f"{name} ({diverged} of {len(seeded)} diverged)" if diverged else name
        curves[label] = mean[:finite]
    return curves


def _table(runs: Sequence[TrainingRun], settings: DemoSettings, steps: int) -> str:
    """One row per init: the test accuracy at every learning rate (mean over the seeds, lowest and
    highest), the runs that reach the pass mark and the runs that diverged."""
    header = ["init", *(f"lr {rate:g}" for rate in settings.learning_rates), f">= {100 * settings.pass_mark:g} %"]
    header.append("diverged")
    rows = []
    for name, by_rate in _grid(runs).items():
        everything = _all(by_rate)
        rows.append(
            [
                name,
                *(_cell(by_rate[rate]) for rate in settings.learning_rates),
                f"{sum(run.accuracy >= settings.pass_mark for run in everything)}/{len(everything)}",
                f"{sum(run.diverged for run in everything)}/{len(everything)}",
            ]
        )
    return render_table(header, rows) + (
        f"\ncells: test accuracy in % on {settings.test_samples} held-out images, the mean over "
        f"{_seeds(settings.run_seeds())} (lowest-highest; {TORCH_DEFAULT}: {_seeds(settings.run_seeds(TORCH_DEFAULT))}"
        f"); a diverged run counts as 0. Each run: {steps} SGD steps ({_epochs(settings.epochs)}, batch "
        f"{settings.batch_size}, momentum 0.9). Every draw is seeded, so a rerun on the same machine gives this "
        "table; another machine or thread count rounds differently and moves the figures."
    )


def _epochs(epochs: int) -> str:
    return f"{epochs} epoch" + ("s" if epochs != 1 else "")


def _seeds(seeds: tuple[int, ...]) -> str:
    return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def _cell(seeded: list[TrainingRun]) -> str:
    accuracies = [100 * run.accuracy for run in seeded]
    if len(accuracies) == 1:
        return f"{accuracies[0]:.1f}"
    return f"{statistics.fmean(accuracies):.1f} ({min(accuracies):.1f}-{max(accuracies):.1f})"
