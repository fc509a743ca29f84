"""Data-dependent init vs self-supervised pre-training vs both: 1 000 labels of MNIST and USPS, or CIFAR-10.

The paper's claim, at small scale: "combined with pre-training, the initialization significantly outperforms".
Two datasets: ``--dataset digits`` (the default; MNIST and USPS, described first) and ``--dataset cifar10``
(described after it). Digits protocol (all defaults; see ``--help``):

* Pretext pre-training, no labels: predict which of 4 rotations (0, 90, 180, 270
  degrees, ``torch.rot90`` on H, W) was applied to an image, on the 10 000 MNIST
  training images of bench/train.py's ``load_mnist`` (16 x 16, standardized).
  Each step takes 128 images (seeded reshuffles) and a random rotation per image
  (seeded). Network: ``plain_cnn(--depth, 16, classes=4)``, kaiming normal init,
  SGD with momentum 0.9 on cross-entropy, learning rate ``--pretrain-lr``,
  ``--pretrain-steps`` steps; one pre-training per seed. Its pretext accuracy is
  measured on the 2 000 MNIST validation images, each in all 4 rotations.
* Fine-tuning tasks: MNIST with 1 000 labels (a fixed random 1 000 of
  ``load_mnist``'s training images, generator seed 0, the same for all seeds; its
  validation and test sets) and USPS transfer (1 000 of ``load_usps``'s training
  images, chosen alike; its validation and test sets).
* Rows, each per task and with the same fine-tuning budget: from scratch
  (``plain_cnn(--depth, 16, classes=10)`` built after ``torch.manual_seed(seed)``):
  torch default, kaiming normal, ``magicinit.init_`` gaussian and kmeans; and
  the pre-trained net with its 4-way head replaced by a new ``nn.Linear(16, 10)``
  (built after ``torch.manual_seed(seed)``): with that head as torch draws it,
  with the head alone normalized by Part 1 (``init_(between=False, skip=<every
  other module>)``), and that plus ``magicinit.rescale_`` over the whole net. The
  data-dependent inits see 256 seeded random images of the 1 000 labeled ones
  (their labels unused). All layers are fine-tuned with
  ``magicinit.tools.demo.train`` (SGD, momentum 0.9, batch 128, ``--steps``
  steps) at every learning rate of ``--lrs`` and every seed of ``--seeds``.
* Reported per (task, row): test accuracy at every learning rate (mean over
  seeds), the learning rate with the best mean validation accuracy, test accuracy
  there (mean, and half the range over seeds; a diverged run counts as 10 %), and
  the init time; then differences of test accuracy computed per seed and averaged.

Output: the ``## bench/finetune.py`` section of ``bench/RESULTS.md`` and every run's
numbers in ``bench/finetune_results.json``. Run from the repository root::

    pip install -c constraints.txt -e ".[bench]"
    python bench/finetune.py            # 60-90 minutes on 2 busy CPU cores (see below)
    python bench/finetune.py --quick    # a smoke test in under 5 minutes, not for conclusions

Time, measured on the 2-core machine while other jobs ran, with ``--threads 1``:
one pre-training of 3000 steps 166 s (55 ms per step), one fine-tuning run of 300
steps 13-16 s, plus 2.8 s (MNIST) or 1.0 s (USPS) of evaluation. The defaults make
3 pre-trainings and 3 seeds x 2 tasks x 7 rows x 4 learning rates = 168 runs of
300 steps; the run recorded in bench/RESULTS.md took the minutes it states there,
beside another benchmark. On 2 idle cores with 2 threads bench/train.py's runs of
this net took 18 ms per step, which would make it about 25 minutes (not measured
here). Beside another single-thread job, 2 threads took about 1 s per step here and
1 thread 50 ms: use ``--threads 1`` then.

CIFAR-10 protocol (``--dataset cifar10``; issue 24's pre-training item; all defaults):

* Data: ``bench/cifar10.py``'s archive through ``cifar_train.load_data`` (the splits of bench/cifar_train.py):
  the 45 000 training images outside ``load_cifar10``'s validation pool, per-channel standardized; 1 000
  validation images (``--validation-count``) pick the learning rate; 2 000 test images (``--test-count``).
* Pretext, no labels: rotation prediction on all 45 000 training images as above (one random rotation per
  image and step), ``plain_cnn(--depth, 16, in_channels=3, classes=4)``, ``--pretrain-init`` (kaiming normal;
  or magicinit), ``--pretrain-steps`` (1500, 4.3 epochs) SGD steps at ``--pretrain-lr`` (0.01), one per seed.
  Its weights and record are cached per (seed, settings, a digest of the images) under ``--cache-dir``
  (default ``~/.cache/magicinit-bench/finetune``) and reused by every later invocation.
* Tasks (``--tasks 1000 5000``): "CIFAR-10, 1 000 labels" and "CIFAR-10, 5 000 labels", class-balanced (100
  and 500 per class, the first of each class in a fixed shuffle with generator seed 0: the same for every
  seed, the 1 000 within the 5 000).
* Rows (``--rows``; default: kaiming normal and magicinit gaussian from scratch, the best from-scratch init
  of bench/cifar_train.py --family plain at depth 10, and the three pre-trained rows above; the other digits
  rows work too), each fine-tuned for ``--steps`` (150) SGD steps per run, batch 128.
* Learning rate: cifar_train.py's adaptive grid on the first seed, from ``--lrs`` (0.003 0.01 0.03), extended
  by about x3.16 while the best validation accuracy is at an edge, at most ``--max-extensions`` (2) times (a
  search that ends at an edge is marked ``edge`` in the table); the other seeds train at the chosen rate.
* Reported per (task, row): validation accuracy per rate on the first seed, chosen rate, test accuracy (mean
  ± half the range over seeds), validation accuracy, init and train seconds; per-seed differences
  (rescale_ minus the magicinit head, each pre-trained row minus the best from scratch by validation, ...)
  and whether they agree in sign over the seeds.

Its JSON, ``bench/finetune_cifar10_results.json`` (``--output``), holds the settings, every invocation, the
pre-trainings (every loss), the searches and every run (every 5th loss); it is rewritten after each run, and
``--resume`` keeps what it holds (same settings, else refused), so the pieces below fill one table. Each
invocation rewrites the section ``## bench/finetune.py --dataset cifar10`` of ``bench/RESULTS.md`` from
the whole JSON. ``--stage pretrain`` trains (or loads) the pre-trainings and stops; ``--stage finetune``
fine-tunes only and refuses to pre-train; ``--estimate`` times a few steps and prints the expected wall
time (every run prints it first). ``--quick`` is a smoke test (one seed, 30 pre-training and 10
fine-tuning steps, 200 validation and test images) that writes under a temporary folder.

Time, measured with ``--threads 1`` on the 2-core machine while two other single-thread benchmarks and a
third job ran (so about 1.5 jobs per core): 490-630 ms per SGD step of this net at 32 px (batch 128), 5-7.5 s
to evaluate 1 000 + 2 000 images. Defaults, in pieces of under an hour each::

    python bench/finetune.py --dataset cifar10 --estimate --stage pretrain             # prints the time
    python bench/finetune.py --dataset cifar10 --stage pretrain                        # 3 x 1500 steps: 37-47 min
    python bench/finetune.py --dataset cifar10 --stage finetune --tasks 1000 --resume  # 41-49 min
    python bench/finetune.py --dataset cifar10 --stage finetune --tasks 5000 --resume  # 41-49 min
    python bench/finetune.py --dataset cifar10 --quick                                 # smoke test, 3 min

(per task: 5 rows x about 6 runs of 150 steps, one grid extension per row; each further extension adds
about 1.6 min).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import magicinit
from cifar10 import default_cache_dir
from cifar_train import GRID_FACTOR, adaptive_grid
from cifar_train import load_data as load_cifar_data
from magicinit.tools.baselines import BASELINES
from magicinit.tools.demo import evaluate, train
from magicinit.tools.nets import plain_cnn
from results_file import (
    BENCH,
    DIVERGED_ACCURACY,
    accuracies,
    best_learning_rate,
    commit,
    machine_facts,
    replace_section,
    stored_runs,
    write_runs,
)
from train import BATCH_SIZE, DEFAULT_DATA_ROOT, INIT_SAMPLES, Dataset, load_mnist, load_usps

WIDTH = 16
CLASSES = 10
ROTATIONS = 4
LABELED = 1_000
LABELED_TEXT = "1 000"
TASKS: dict[str, Callable[[Path], Dataset]] = {"MNIST": load_mnist, "USPS": load_usps}

# --dataset cifar10 (see the module docstring)
CIFAR_TASKS: dict[str, int] = {"1000": 1_000, "5000": 5_000}  # --tasks name -> labeled training images
CIFAR_HEADING = "## bench/finetune.py --dataset cifar10"
CIFAR_STEPS = 150  # fine-tuning steps per run
CIFAR_PRETRAIN_STEPS = 1500
CIFAR_CHANNELS = 3
QUICK_PRETRAIN_STEPS, QUICK_STEPS, QUICK_EVALUATION = 30, 10, 200
LOSS_EVERY = 5  # the CIFAR JSON keeps every LOSS_EVERY-th fine-tuning loss

Initializer = Callable[[nn.Module, Tensor, int], object]


def head_name(model: nn.Module) -> str:
    """The qualified name of the model's last ``nn.Linear`` (the classifier head)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def init_head(model: nn.Module, images: Tensor, seed: int) -> None:
    """Part 1 of ``init_`` on the head alone: every other module is skipped, no rescaling."""
    head = head_name(model)
    others = [
        name
        for name, _ in model.named_modules()
        if name and name != head and not head.startswith(name + ".") and not name.startswith(head + ".")
    ]
    magicinit.init_(model, images, seed=seed, between=False, skip=others)


def init_head_and_rescale(model: nn.Module, images: Tensor, seed: int) -> None:
    """``init_head``, then ``rescale_`` (Part 2, keeps the function) over the whole net."""
    init_head(model, images, seed)
    magicinit.rescale_(model, images, seed=seed)


@dataclass(frozen=True)
class RowSpec:
    """How a row's model starts: from the pre-trained net (with a new head) or from scratch, then its init."""

    pretrained: bool
    initialize: Initializer


RESCALED, MAGIC_HEAD, DEFAULT_HEAD = (
    "rotation pre-trained + rescale_",
    "rotation pre-trained, magicinit head",
    "rotation pre-trained, default head",
)
ROWS: dict[str, RowSpec] = {
    "torch default": RowSpec(False, lambda model, images, seed: BASELINES["default"](model)),
    "kaiming normal": RowSpec(False, lambda model, images, seed: BASELINES["kaiming"](model)),
    "magicinit (gaussian)": RowSpec(False, lambda model, images, seed: magicinit.init_(model, images, seed=seed)),
    "magicinit (kmeans)": RowSpec(
        False, lambda model, images, seed: magicinit.init_(model, images, seed=seed, sampler="kmeans")
    ),
    DEFAULT_HEAD: RowSpec(True, lambda model, images, seed: None),
    MAGIC_HEAD: RowSpec(True, init_head),
    RESCALED: RowSpec(True, init_head_and_rescale),
}
FROM_SCRATCH = [name for name, spec in ROWS.items() if not spec.pretrained]
CIFAR_ROWS = ["kaiming normal", "magicinit (gaussian)", DEFAULT_HEAD, MAGIC_HEAD, RESCALED]


@dataclass
class Pretraining:
    """One rotation pre-training: its losses and pretext accuracy on the validation images."""

    seed: int
    steps: int
    learning_rate: float
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    pretext_accuracy: float = float("nan")


@dataclass
class Run:
    """One fine-tuning run and its results."""

    task: str
    row: str
    seed: int
    learning_rate: float
    init_seconds: float
    train_seconds: float = 0.0
    final_train_loss: float = float("nan")  # mean over the last 10 % of steps
    validation_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    diverged: bool = False


@dataclass
class CifarRun(Run):
    """A CIFAR-10 fine-tuning run: a ``Run`` and every ``LOSS_EVERY``-th training loss (and the last)."""

    losses: list[float] = field(default_factory=list)

    def key(self) -> tuple[str, str, int, float]:
        """What identifies the run in the JSON: (task, row, seed, learning rate)."""
        return (self.task, self.row, self.seed, self.learning_rate)


def all_rotations(images: Tensor) -> Tensor:
    """``(4, N, C, H, W)``: the images turned by 0, 90, 180 and 270 degrees."""
    return torch.stack([torch.rot90(images, turns, dims=(2, 3)) for turns in range(ROTATIONS)])


def rotate_batch(images: Tensor, rotation: Tensor) -> Tensor:
    """Image ``i`` of ``images`` (square) turned by ``rotation[i]`` times 90 degrees: the same values as
    ``all_rotations(images)[rotation, arange(N)]`` without the 4 copies of every image."""
    rotated = images.clone()
    for turns in range(1, ROTATIONS):
        chosen = rotation == turns
        if chosen.any():
            rotated[chosen] = torch.rot90(images[chosen], turns, dims=(2, 3))
    return rotated


def pretrain(images: Tensor, depth: int, record: Pretraining, in_channels: int = 1, init: str = "kaiming") -> nn.Module:
    """Train a ``plain_cnn`` with 4 outputs to tell the rotation of each image; ``init``: ``"kaiming"``
    (kaiming normal) or ``"magicinit"`` (``init_`` gaussian on ``INIT_SAMPLES`` seeded random images)."""
    torch.manual_seed(record.seed)
    model = plain_cnn(depth, WIDTH, in_channels=in_channels, classes=ROTATIONS)
    if init == "kaiming":
        BASELINES["kaiming"](model)
    elif init == "magicinit":
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(record.seed))[:INIT_SAMPLES]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            magicinit.init_(model, images[pick], seed=record.seed)
    else:
        raise ValueError(f"pretext init {init!r}: kaiming or magicinit")
    optimizer = torch.optim.SGD(model.parameters(), lr=record.learning_rate, momentum=0.9)
    generator = torch.Generator().manual_seed(record.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    while len(record.losses) < record.steps:
        if len(order) < BATCH_SIZE:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        rotation = torch.randint(ROTATIONS, (len(index),), generator=generator)
        loss = nn.functional.cross_entropy(model(rotate_batch(images[index], rotation)), rotation)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record.losses.append(loss.item())
        if not math.isfinite(record.losses[-1]):
            break
    return model


def pretext_accuracy(model: nn.Module, images: Tensor) -> float:
    """Rotation accuracy on ``images``, each in all 4 rotations."""
    labels = torch.arange(ROTATIONS).repeat_interleave(len(images))
    return evaluate(model, all_rotations(images).flatten(0, 1), labels)[0]


def labeled_subset(data: Dataset) -> Dataset:
    """``data`` with a fixed random 1 000 of its training images (generator seed 0) as the training set."""
    pick = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(0))[:LABELED]
    return Dataset(data.name, (data.train[0][pick], data.train[1][pick]), data.validation, data.test)


def fine_tuning_model(pretrained: nn.Module | None, depth: int, seed: int, in_channels: int = 1) -> nn.Module:
    """A fresh ``plain_cnn`` with 10 outputs, or a copy of ``pretrained`` with a new 10-way head."""
    torch.manual_seed(seed)
    if pretrained is None:
        return plain_cnn(depth, WIDTH, in_channels=in_channels, classes=CLASSES)
    model = copy.deepcopy(pretrained)
    parent, _, child = head_name(model).rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, child, nn.Linear(getattr(owner, child).in_features, CLASSES))
    return model


def fine_tune(model: nn.Module, task: Dataset, run: Run, steps: int) -> Run:
    """Train a copy of ``model`` on the task's labeled images (``run`` gives seed and learning rate); fill ``run``."""
    tuned = copy.deepcopy(model)
    start = time.perf_counter()
    losses = train(
        tuned, *task.train, steps=steps, batch_size=BATCH_SIZE, learning_rate=run.learning_rate, seed=run.seed
    )
    run.train_seconds = time.perf_counter() - start
    run.final_train_loss = statistics.fmean(losses[-max(1, len(losses) // 10) :])
    run.diverged = not math.isfinite(losses[-1])
    if isinstance(run, CifarRun):
        run.losses = losses[::LOSS_EVERY] + [losses[-1]]
    if not run.diverged:
        run.validation_accuracy = evaluate(tuned, *task.validation)[0]
        run.test_accuracy, run.test_loss = evaluate(tuned, *task.test)
    return run


def run_all(args: argparse.Namespace) -> tuple[list[Pretraining], list[Run]]:
    """Per seed: one rotation pre-training, then every (task, row, learning rate) fine-tuning run."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as bench/train.py: denormals slow CPU training, change nothing that matters
    mnist = load_mnist(args.data_root)
    tasks = [labeled_subset(mnist if name == "MNIST" else TASKS[name](args.data_root)) for name in args.tasks]
    pretrainings: list[Pretraining] = []
    runs: list[Run] = []
    total = len(args.seeds) * len(tasks) * len(args.rows) * len(args.lrs)
    started = time.perf_counter()
    for seed in args.seeds:
        record = Pretraining(seed, args.pretrain_steps, args.pretrain_lr)
        start = time.perf_counter()
        pretrained = pretrain(mnist.train[0], args.depth, record)
        record.seconds = time.perf_counter() - start
        record.pretext_accuracy = pretext_accuracy(pretrained, mnist.validation[0])
        pretrainings.append(record)
        print(
            f"pre-training seed {seed}: {record.steps} steps in {record.seconds:.1f} s, final loss "
            f"{record.losses[-1]:.3f}, pretext accuracy {100 * record.pretext_accuracy:.2f}% (chance 25%)",
            flush=True,
        )
        for task in tasks:
            pick = torch.randperm(LABELED, generator=torch.Generator().manual_seed(seed))[:INIT_SAMPLES]
            init_images = task.train[0][pick]
            for row in args.rows:
                model = fine_tuning_model(pretrained if ROWS[row].pretrained else None, args.depth, seed)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ROWS[row].initialize(model, init_images, seed)
                init_seconds = time.perf_counter() - start
                for learning_rate in args.lrs:
                    run = fine_tune(model, task, Run(task.name, row, seed, learning_rate, init_seconds), args.steps)
                    runs.append(run)
                    print(
                        f"[{len(runs)}/{total} {(time.perf_counter() - started) / 60:.1f} min] {task.name} "
                        f"{row:<37} seed {seed} lr {learning_rate:<6g} "
                        f"{'diverged' if run.diverged else f'test {100 * run.test_accuracy:.2f}%'} "
                        f"(init {init_seconds:.2f} s, train {run.train_seconds:.1f} s)",
                        flush=True,
                    )
    return pretrainings, runs


def select(runs: list[Run], task: str, row: str, learning_rate: float | None = None) -> list[Run]:
    """The runs of (task, row), at one learning rate if given."""
    return [
        run
        for run in runs
        if (run.task, run.row) == (task, row) and (learning_rate is None or run.learning_rate == learning_rate)
    ]


def spread_text(values: list[float]) -> str:
    """Mean ± half the range, in percent (points)."""
    return f"{100 * statistics.fmean(values):.2f} ± {50 * (max(values) - min(values)):.2f}"


def task_tables(runs: list[Run], task: str, args: argparse.Namespace) -> str:
    """The task's result table and its table of per-seed differences."""
    header = ["row", *(f"lr {lr:g}" for lr in args.lrs), "chosen lr", "test acc % (± half range)", "init s"]
    lines = [f"### {task}, {LABELED_TEXT} labels", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    at_chosen: dict[str, list[float]] = {}  # row -> test accuracy per seed at its chosen lr
    validation: dict[str, float] = {}
    rows = []
    for row in args.rows:
        chosen = best_learning_rate(args.lrs, lambda lr: select(runs, task, row, lr))
        at_chosen[row] = accuracies(select(runs, task, row, chosen), "test_accuracy")
        validation[row] = statistics.fmean(accuracies(select(runs, task, row, chosen), "validation_accuracy"))
        cells = []
        for lr in args.lrs:
            selected = select(runs, task, row, lr)
            diverged = sum(run.diverged for run in selected)
            cells.append(
                f"{100 * statistics.fmean(accuracies(selected, 'test_accuracy')):.2f}"
                + (f" ({diverged} div.)" if diverged else "")
            )
        init_seconds = statistics.fmean(run.init_seconds for run in select(runs, task, row))
        rows.append([row, *cells, f"{chosen:g}", spread_text(at_chosen[row]), f"{init_seconds:.2f}"])
    best = max(statistics.fmean(values) for values in at_chosen.values())
    for cells, row in zip(rows, args.rows):
        if statistics.fmean(at_chosen[row]) == best:
            cells[-2] = f"**{cells[-2]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *difference_table(at_chosen, validation)])


def difference_table(
    at_chosen: dict[str, list[float]], validation: dict[str, float], against_best_scratch: bool = False
) -> list[str]:
    """Per-seed differences of test accuracy (each row at its chosen lr), averaged, with half their range;
    ``against_best_scratch`` adds every pre-trained row minus the best from-scratch row (by validation)."""
    scratch = [row for row in FROM_SCRATCH if row in at_chosen]
    best_scratch = max(scratch, key=lambda row: validation[row]) if scratch else None
    pairs = [(RESCALED, MAGIC_HEAD), (RESCALED, best_scratch), (DEFAULT_HEAD, "kaiming normal")]
    if against_best_scratch:
        pairs[2:2] = [(MAGIC_HEAD, best_scratch), (DEFAULT_HEAD, best_scratch)]
        pairs = list(dict.fromkeys(pairs))  # the best from scratch may be kaiming normal
    lines = ["| difference (test acc, points) | mean ± half range | per seed |", "|---|---|---|"]
    for minuend, subtrahend in pairs:
        if minuend not in at_chosen or subtrahend not in at_chosen:
            continue
        per_seed = [a - b for a, b in zip(at_chosen[minuend], at_chosen[subtrahend])]
        label = f"({minuend}) − ({subtrahend})"
        if subtrahend == best_scratch:
            label += " [best from scratch by validation]"
        lines.append(f"| {label} | {spread_text(per_seed)} | " + ", ".join(f"{100 * d:+.2f}" for d in per_seed) + " |")
    return lines + [""]


def _four_digits(record: dict[str, object]) -> dict[str, object]:
    """``record`` with its losses (numbers or lists under a key naming a loss) to 4 significant digits."""
    rounded = dict(record)
    for key, value in record.items():
        if "loss" in key and isinstance(value, float):
            rounded[key] = float(f"{value:.4g}")
        elif "loss" in key and isinstance(value, list):
            rounded[key] = [float(f"{loss:.4g}") for loss in value]
    return rounded


def write_raw(pretrainings: list[Pretraining], runs: list[Run], args: argparse.Namespace) -> Path:
    """Settings, the pre-trainings (with every loss) and every fine-tuning run as JSON, one record per line."""
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in digits_settings(args).items()}
    pretraining_lines = [json.dumps(_four_digits(asdict(record))) for record in pretrainings]
    run_lines = [json.dumps(_four_digits(asdict(run))) for run in runs]
    path = args.out_dir / "finetune_results.json"
    path.write_text(
        '{"settings": '
        + json.dumps(settings)
        + ',\n"pretrainings": [\n'
        + ",\n".join(pretraining_lines)
        + '\n],\n"runs": [\n'
        + ",\n".join(run_lines)
        + "\n]}\n"
    )
    return path


DIGITS_SETTINGS = (  # the keys, in this order, of the digits JSON's settings (its format as before --dataset)
    "data_root",
    "tasks",
    "rows",
    "depth",
    "lrs",
    "seeds",
    "steps",
    "pretrain_steps",
    "pretrain_lr",
    "threads",
    "quick",
    "out_dir",
    "results",
)


def digits_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the digits JSON records: ``DIGITS_SETTINGS`` of ``args``."""
    return {key: getattr(args, key) for key in DIGITS_SETTINGS}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, each dataset's defaults filled in (``--quick`` applied)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="folder with mnist/ and usps/, or cifar10/ (default ../shared/data)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        help=f"digits: {' '.join(TASKS)} (default both); cifar10: {' '.join(CIFAR_TASKS)} labels (default both)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        metavar="ROW",
        help=f"default: {list(ROWS)} for digits, {CIFAR_ROWS} for cifar10",
    )
    parser.add_argument("--depth", type=int, default=10, help="affine layers of the plain CNN")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="digits: every seed at each (default 0.001 0.003 0.01 0.03); cifar10: "
        "the starting grid on the first seed (default 0.003 0.01 0.03)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        help=f"fine-tuning SGD steps per run (batch 128; default 300 digits, {CIFAR_STEPS} cifar10)",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        help=f"rotation pre-training steps (batch 128; default 3000 digits, {CIFAR_PRETRAIN_STEPS} cifar10)",
    )
    parser.add_argument("--pretrain-lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, help="default 2 digits, 1 cifar10")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one seed, learning rates 0.003 and "
        "0.01, 500 pre-training and 100 fine-tuning steps (not for conclusions); cifar10: one seed, rates 0.01 and "
        f"0.03, no extension, {QUICK_PRETRAIN_STEPS} pre-training and {QUICK_STEPS} fine-tuning steps, "
        f"{QUICK_EVALUATION} validation and test images, everything written under a temporary folder",
    )
    parser.add_argument("--out-dir", type=Path, default=BENCH, help="digits: where the JSON goes")
    parser.add_argument(
        "--results",
        type=Path,
        help="the markdown file whose '## bench/finetune.py' (digits) or "
        f"'{CIFAR_HEADING}' section is replaced (default bench/RESULTS.md)",
    )
    cifar = parser.add_argument_group("--dataset cifar10")
    cifar.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    cifar.add_argument(
        "--stage",
        choices=["all", "pretrain", "finetune"],
        default="all",
        help="pretrain: the rotation pre-trainings of --seeds (cached) and stop; finetune: fine-tuning only "
        "(the pre-trainings must be cached); all: whatever is missing of both (default)",
    )
    cifar.add_argument("--pretrain-init", choices=["kaiming", "magicinit"], default="kaiming")
    cifar.add_argument("--max-extensions", type=int, default=2, help="grid extensions per (task, row) at most")
    cifar.add_argument("--validation-count", type=int, default=1_000, help="at most 5 000")
    cifar.add_argument("--test-count", type=int, default=2_000, help="at most 10 000")
    cifar.add_argument("--init-samples", type=int, default=INIT_SAMPLES, help="images every data-driven init sees")
    cifar.add_argument("--output", type=Path, help="the JSON (default bench/finetune_cifar10_results.json)")
    cifar.add_argument("--cache-dir", type=Path, help="pre-trained weights (default ~/.cache/magicinit-bench/finetune)")
    cifar.add_argument("--resume", action="store_true", help="keep the runs the JSON holds (same settings)")
    cifar.add_argument("--estimate", action="store_true", help="print the expected wall time and stop")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "bench/finetune.py", *(sys.argv[1:] if argv is None else argv)])
    if args.dataset == "digits":
        args.tasks = args.tasks or list(TASKS)
        unknown = [task for task in args.tasks if task not in TASKS]
        if unknown:
            parser.error(f"--tasks {unknown}: the digits tasks are {list(TASKS)}")
        args.rows = args.rows or list(ROWS)
        args.lrs = args.lrs or [0.001, 0.003, 0.01, 0.03]
        args.steps = args.steps or 300
        args.pretrain_steps = args.pretrain_steps or 3000
        args.threads = args.threads or 2
        args.results = args.results or BENCH / "RESULTS.md"
        if not (args.data_root / "mnist").exists():
            parser.error(f"--data-root {args.data_root}: no mnist/ there (see ../shared/data/SOURCES.md)")
        if args.quick:
            args.seeds, args.lrs, args.pretrain_steps, args.steps = args.seeds[:1], [0.003, 0.01], 500, 100
        return args
    args.tasks = args.tasks or list(CIFAR_TASKS)
    unknown = [task for task in args.tasks if task not in CIFAR_TASKS]
    if unknown:
        parser.error(f"--tasks {unknown}: the cifar10 tasks are {list(CIFAR_TASKS)} (labeled images)")
    args.rows = args.rows or list(CIFAR_ROWS)
    args.lrs = args.lrs or [0.003, 0.01, 0.03]
    args.steps = args.steps or CIFAR_STEPS
    args.pretrain_steps = args.pretrain_steps or CIFAR_PRETRAIN_STEPS
    args.threads = args.threads or 1
    if args.quick:
        args.seeds, args.lrs, args.max_extensions = args.seeds[:1], [0.01, 0.03], 0
        args.pretrain_steps, args.steps = QUICK_PRETRAIN_STEPS, QUICK_STEPS
        args.validation_count = args.test_count = QUICK_EVALUATION
        args.init_samples = min(args.init_samples, 64)
        quick_dir = Path(tempfile.gettempdir()) / "magicinit-finetune-quick"
        quick_dir.mkdir(exist_ok=True)
        args.output = args.output or quick_dir / "finetune_cifar10_results.json"
        args.results = args.results or quick_dir / "RESULTS.md"
        args.cache_dir = args.cache_dir or quick_dir / "cache"
    args.output = args.output or BENCH / "finetune_cifar10_results.json"
    args.results = args.results or BENCH / "RESULTS.md"
    args.cache_dir = args.cache_dir or default_cache_dir() / "finetune"
    return args


def main(argv: Sequence[str] | None = None, data: Dataset | None = None) -> CifarBench | None:
    """Parse the arguments and run the dataset's benchmark (``data``: CIFAR-10 given instead of loaded, for
    tests); returns the CIFAR-10 bench, None for digits."""
    args = parse_args(argv)
    if args.dataset == "digits":
        main_digits(args)
        return None
    return main_cifar(args, data)


def main_digits(args: argparse.Namespace) -> None:
    """MNIST and USPS: run everything, write the section of RESULTS.md and the JSON."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    library_commit = commit()  # the code this run loads (the checkout may move on while it runs)
    started = time.perf_counter()
    pretrainings, runs = run_all(args)
    minutes = (time.perf_counter() - started) / 60
    body = "\n".join(task_tables(runs, task, args) for task in args.tasks)
    pretext = ", ".join(f"seed {p.seed}: {100 * p.pretext_accuracy:.2f}%" for p in pretrainings)
    low = [p for p in pretrainings if p.pretext_accuracy < 0.5]
    command = shlex.join(["python", "bench/finetune.py", *sys.argv[1:]])
    section = (
        f"## bench/finetune.py\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at "
        f"commit {library_commit}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, CPU, {minutes:.1f} minutes:\n\n"
        f'```\npip install -c constraints.txt -e ".[bench]"\n{command}\n```\n\n'
        + ("**--quick: a smoke test (one seed, few steps), not for conclusions.**\n\n" if args.quick else "")
        + f"Pre-training without labels: predict the rotation (0/90/180/270 degrees) of the 10 000 MNIST training "
        f"images, plain_cnn(depth {args.depth}, width {WIDTH}, 4 outputs), kaiming normal, {args.pretrain_steps} "
        f"SGD steps (momentum 0.9, batch {BATCH_SIZE}, lr {args.pretrain_lr:g}), one per seed. Fine-tuning: "
        f"{LABELED_TEXT} labeled training images per task (the same for all seeds), all layers, {args.steps} SGD steps "
        f"(momentum 0.9, batch {BATCH_SIZE}) at each learning rate, seeds {', '.join(map(str, args.seeds))}; the "
        "pre-trained rows replace the 4-way head by a new 10-way linear layer (torch's init, Part 1 on it alone, "
        f"or that and rescale_ over the whole net); the magicinit inits use {INIT_SAMPLES} of the labeled images "
        "without labels. Test accuracy (%) is the mean over seeds (a diverged run counts as 10 %); the chosen "
        "learning rate has the best mean validation accuracy; the best test accuracy there is in bold. "
        "Differences: per seed, each row at its chosen learning rate, then mean ± half the range.\n\n"
        f"Pretext (rotation) accuracy on the 2 000 MNIST validation images in all 4 rotations, chance 25 %: "
        f"{pretext}.\n\n"
        + (
            f"**Pretext accuracy below 50 % for seed(s) {', '.join(str(p.seed) for p in low)}: the pre-trained "
            "rows say little.**\n\n"
            if low
            else ""
        )
        + body
        + "\n"
    )
    replace_section(args.results, "## bench/finetune.py", section)
    raw = write_raw(pretrainings, runs, args)
    print(f"\npretext accuracy: {pretext}\n\n{body}")
    print(f"wrote {args.results} and {raw} ({minutes:.1f} minutes)")


# ---------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_TRAIN_IMAGES = 45_000  # every training image outside load_cifar10's validation pool


def spaced(number: int) -> str:
    """``1000`` as ``"1 000"``."""
    return f"{number:,}".replace(",", " ")


def cifar_task_name(labels: int) -> str:
    """The task's name: ``"CIFAR-10, 1 000 labels"``."""
    return f"CIFAR-10, {spaced(labels)} labels"


def class_balanced_subset(data: Dataset, count: int) -> Dataset:
    """``data`` with ``count / 10`` training images of every class as its training set: the first ones of each
    class in a fixed shuffle (generator seed 0), the same for every seed (so the 1 000 lie within the 5 000)."""
    if count % CLASSES:
        raise SystemExit(f"{count} labels: not a multiple of {CLASSES} (class-balanced subsets)")
    images, labels = data.train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    per_class = count // CLASSES
    picks = []
    for label in range(CLASSES):
        of_class = order[labels[order] == label][:per_class]
        if len(of_class) < per_class:
            raise SystemExit(f"{count} labels: class {label} has {len(of_class)} training images, not {per_class}")
        picks.append(of_class)
    pick = torch.cat(picks)
    return Dataset(cifar_task_name(count), (images[pick], labels[pick]), data.validation, data.test)


def data_digest(images: Tensor) -> str:
    """A short digest of the pretext images (their shape and every 45th image, exactly), so that a cached
    pre-training made from other data is not reused."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images[::45].contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def pretrain_settings(args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    """Everything a CIFAR-10 pre-training depends on besides its seed (its cache file is named by them)."""
    return {
        "dataset": "cifar10",
        "depth": args.depth,
        "width": WIDTH,
        "steps": args.pretrain_steps,
        "learning_rate": args.pretrain_lr,
        "init": args.pretrain_init,
        "batch_size": BATCH_SIZE,
        "data": data_digest(data.train[0]),
    }


def pretrain_cache(cache_dir: Path, settings: dict[str, Any], seed: int) -> Path:
    """The cache file of one pre-training: readable settings, the seed and a digest of all the settings."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode(), usedforsecurity=False).hexdigest()[:10]
    return cache_dir / (
        f"rotation-cifar10-d{settings['depth']}-{settings['steps']}steps-lr{settings['learning_rate']:g}-"
        f"{settings['init']}-seed{seed}-{digest}.pt"
    )


def load_pretrained(path: Path, settings: dict[str, Any]) -> tuple[nn.Module, Pretraining] | None:
    """The pre-trained net and its record from a cache file; None where it is missing, damaged or made with
    other settings."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        if stored["settings"] != settings:
            return None
        model = plain_cnn(settings["depth"], WIDTH, in_channels=CIFAR_CHANNELS, classes=ROTATIONS)
        model.load_state_dict(stored["state_dict"])
        return model, Pretraining(**stored["record"])
    except Exception as error:  # a damaged or foreign file: trained again
        print(f"{path}: not used ({type(error).__name__}: {error})", file=sys.stderr)
        return None


def save_pretrained(path: Path, settings: dict[str, Any], record: Pretraining, model: nn.Module) -> None:
    """Write the cache file whole or not at all (a temporary file beside it, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"settings": settings, "record": asdict(record), "state_dict": model.state_dict()}, file)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


@dataclass
class CifarBench:
    """The CIFAR-10 pre-trainings, runs and learning-rate searches, written to ``path`` as JSON after each."""

    args: argparse.Namespace
    path: Path
    runs: dict[tuple[str, str, int, float], CifarRun] = field(default_factory=dict)
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<task>, <row>" -> the search
    pretrainings: dict[int, Pretraining] = field(default_factory=dict)
    invocations: list[dict[str, Any]] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """What every run of one JSON shares (``--resume`` refuses a JSON with other settings)."""
        keys = (
            "dataset",
            "depth",
            "steps",
            "pretrain_steps",
            "pretrain_lr",
            "pretrain_init",
            "validation_count",
            "test_count",
            "lrs",
            "max_extensions",
            "init_samples",
        )
        return {key: getattr(self.args, key) for key in keys}

    def load(self) -> None:
        """Take the pre-trainings, runs and searches of an earlier JSON with the same settings (``--resume``)."""
        stored = stored_runs(self.path, self.settings())
        if stored is None:
            return
        for record in stored["runs"]:
            run = CifarRun(**record)
            self.runs[run.key()] = run
        self.pretrainings = {record["seed"]: Pretraining(**record) for record in stored.get("pretrainings", [])}
        self.grids = stored.get("grids", {})
        self.invocations = stored.get("invocations", [])

    def write(self) -> None:
        """The JSON, one record per line, replaced whole (a temporary file renamed)."""
        write_runs(
            self.path,
            {"settings": self.settings(), "machine": machine_facts(), "grids": self.grids},
            {
                "invocations": self.invocations,
                "pretrainings": [_four_digits(asdict(self.pretrainings[seed])) for seed in sorted(self.pretrainings)],
                "runs": [_four_digits(asdict(run)) for run in self.runs.values()],
            },
        )


def pretrained_nets(
    args: argparse.Namespace, data: Dataset, bench: CifarBench, train_missing: bool
) -> dict[int, nn.Module]:
    """The rotation pre-trained net of every seed: from its cache file, else trained (and cached) where
    ``train_missing``, else an error."""
    settings = pretrain_settings(args, data)
    nets: dict[int, nn.Module] = {}
    for seed in args.seeds:
        path = pretrain_cache(args.cache_dir, settings, seed)
        loaded = load_pretrained(path, settings)
        if loaded is not None:
            nets[seed], record = loaded
            source = f"loaded from {path}"
        elif not train_missing:
            raise SystemExit(
                f"--stage finetune: no pre-training of seed {seed} with these settings ({path}); "
                f"run --stage pretrain --seeds {seed} with the same settings first"
            )
        else:
            record = Pretraining(seed, args.pretrain_steps, args.pretrain_lr)
            start = time.perf_counter()
            nets[seed] = pretrain(
                data.train[0], args.depth, record, in_channels=CIFAR_CHANNELS, init=args.pretrain_init
            )
            record.seconds = time.perf_counter() - start
            record.pretext_accuracy = pretext_accuracy(nets[seed], data.validation[0])
            save_pretrained(path, settings, record, nets[seed])
            source = f"trained, cached in {path}"
        bench.pretrainings[seed] = record
        bench.write()
        print(
            f"pre-training seed {seed} ({source}): {record.steps} steps in {record.seconds:.1f} s, final loss "
            f"{record.losses[-1]:.3f}, pretext accuracy {100 * record.pretext_accuracy:.2f}% (chance 25%)",
            flush=True,
        )
    return nets


def run_cifar_tasks(args: argparse.Namespace, data: Dataset, bench: CifarBench, nets: dict[int, nn.Module]) -> None:
    """Every (task, row): the adaptive learning-rate grid on the first seed, then the other seeds at the rate
    it chose; runs the JSON already holds are not trained again."""
    started = time.perf_counter()
    for task_key in args.tasks:
        task = class_balanced_subset(data, CIFAR_TASKS[task_key])
        for row in args.rows:
            spec = ROWS[row]
            models: dict[int, tuple[nn.Module, float]] = {}

            def initialized(seed: int) -> tuple[nn.Module, float]:
                if seed not in models:
                    model = fine_tuning_model(nets[seed] if spec.pretrained else None, args.depth, seed, CIFAR_CHANNELS)
                    generator = torch.Generator().manual_seed(seed)
                    pick = torch.randperm(len(task.train[0]), generator=generator)[: args.init_samples]
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        spec.initialize(model, task.train[0][pick], seed)
                    models[seed] = (model, time.perf_counter() - start)
                return models[seed]

            def run_at(seed: int, learning_rate: float) -> CifarRun:
                key = (task.name, row, seed, learning_rate)
                if key not in bench.runs:
                    model, seconds = initialized(seed)
                    run = CifarRun(task.name, row, seed, learning_rate, seconds)
                    fine_tune(model, task, run, args.steps)
                    bench.runs[key] = run
                    bench.write()
                    result = "diverged" if run.diverged else f"val {100 * run.validation_accuracy:.1f}%"
                    print(
                        f"[{(time.perf_counter() - started) / 60:5.1f} min] {task.name} {row:<37} seed {seed} "
                        f"lr {learning_rate:<7g} {result} (init {seconds:.1f} s, train {run.train_seconds:.0f} s)",
                        flush=True,
                    )
                return bench.runs[key]

            search = adaptive_grid(
                args.lrs,
                lambda lr: accuracies([run_at(args.seeds[0], lr)], "validation_accuracy")[0],
                max_extensions=args.max_extensions,
            )
            for seed in args.seeds[1:]:
                run_at(seed, search.best)
            bench.grids[f"{task.name}, {row}"] = {**asdict(search), "seed": args.seeds[0], "seeds": list(args.seeds)}
            bench.write()


def consistency(differences: list[float]) -> str:
    """How per-seed differences read: higher for every seed, lower for every seed, or mixed."""
    higher, lower = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    mean = f"{100 * statistics.fmean(differences):+.2f} points on average"
    if higher == len(differences):
        return f"higher for every seed ({mean})"
    if lower == len(differences):
        return f"lower for every seed ({mean})"
    return f"no consistent difference: higher for {higher} of {len(differences)} seeds, lower for {lower} ({mean})"


def cifar_tables(bench: CifarBench) -> str:
    """Per task: every row's search, chosen rate and accuracies; the per-seed differences; what they say."""
    lines: list[str] = []
    for labels in CIFAR_TASKS.values():
        task = cifar_task_name(labels)
        rows = [row for row in ROWS if f"{task}, {row}" in bench.grids]
        if not rows:
            continue
        header = ["row", "validation % per lr (first seed)", "chosen lr", "test acc % (± half range)"]
        header += ["validation %", "init s", "train s / run"]
        lines += [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        at_chosen: dict[str, list[float]] = {}
        validation: dict[str, float] = {}
        cells: dict[str, list[str]] = {}
        edges = []
        for row in rows:
            grid = bench.grids[f"{task}, {row}"]
            chosen = grid["best"]
            of_row = [run for run in bench.runs.values() if (run.task, run.row) == (task, row)]
            at = [run for run in of_row if run.learning_rate == chosen]
            at_chosen[row] = accuracies(at, "test_accuracy")
            validation[row] = statistics.fmean(accuracies(at, "validation_accuracy"))
            searched = {run.learning_rate: run for run in of_row if run.seed == grid["seed"]}
            per_lr = ", ".join(
                f"{lr:g}: " + ("div." if searched[lr].diverged else f"{100 * searched[lr].validation_accuracy:.1f}")
                for lr in grid["tried"]
            )
            if grid["stopped_at_edge"]:
                edges.append(f"{row} (tried {', '.join(f'{lr:g}' for lr in grid['tried'])})")
            diverged = sum(run.diverged for run in of_row)
            cells[row] = [
                row,
                per_lr,
                f"{chosen:g}" + (" (edge)" if grid["stopped_at_edge"] else ""),
                spread_text(at_chosen[row]),
                f"{100 * validation[row]:.2f}",
                f"{statistics.fmean(run.init_seconds for run in of_row):.2f}",
                f"{statistics.fmean(run.train_seconds for run in of_row):.0f}"
                + (f" ({diverged} of {len(of_row)} runs diverged)" if diverged else ""),
            ]
        best = max(statistics.fmean(values) for values in at_chosen.values())
        for row in rows:
            if statistics.fmean(at_chosen[row]) == best:
                cells[row][3] = f"**{cells[row][3]}**"
            lines.append("| " + " | ".join(cells[row]) + " |")
        lines += ["", *difference_table(at_chosen, validation, against_best_scratch=True)]
        if RESCALED in at_chosen and MAGIC_HEAD in at_chosen:
            differences = [a - b for a, b in zip(at_chosen[RESCALED], at_chosen[MAGIC_HEAD])]
            lines += [f"rescale_ against the magicinit head alone: {consistency(differences)}.", ""]
        scratch = [row for row in rows if not ROWS[row].pretrained]
        pretrained = [row for row in rows if ROWS[row].pretrained]
        if scratch and pretrained:
            best_scratch = max(scratch, key=lambda row: validation[row])
            best_pretrained = max(pretrained, key=lambda row: validation[row])
            differences = [a - b for a, b in zip(at_chosen[best_pretrained], at_chosen[best_scratch])]
            lines += [
                f"Best pre-trained row by validation ({best_pretrained}) against the best from scratch by "
                f"validation ({best_scratch}): {consistency(differences)}.",
                "",
            ]
        if edges:
            lines += [
                f"Learning rate at the grid's edge after {bench.args.max_extensions} extensions: {'; '.join(edges)}.",
                "",
            ]
    return "\n".join(lines)


def cifar_section(bench: CifarBench) -> str:
    """The ``## bench/finetune.py --dataset cifar10`` section of RESULTS.md, from everything the JSON holds."""
    args = bench.args
    invocations = "\n".join(
        f"| {item['date']} | `{item['command']}` | {item['commit']} | {item['threads']} | {item['minutes']:.1f} |"
        for item in bench.invocations
    )
    pretext = ", ".join(
        f"seed {seed}: {100 * record.pretext_accuracy:.2f}% ({record.seconds / 60:.1f} min)"
        for seed, record in sorted(bench.pretrainings.items())
    )
    low = [seed for seed, record in sorted(bench.pretrainings.items()) if not record.pretext_accuracy >= 0.5]
    output = args.output.name if args.output.parent == BENCH else str(args.output)
    return (
        f"{CIFAR_HEADING}\n\n"
        + ("**--quick: a smoke test (one seed, few steps), not for conclusions.**\n\n" if args.quick else "")
        + "Invocations, run from the repository root (each rewrote this section from every run the JSON held), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU:\n\n"
        "| date | command | library commit | threads | minutes |\n|---|---|---|---|---|\n" + invocations + "\n\n"
        f"Pre-training without labels: predict the rotation (0/90/180/270 degrees) of the {spaced(CIFAR_TRAIN_IMAGES)} "
        f"CIFAR-10 training images outside the validation pool (per-channel standardized), plain_cnn(depth "
        f"{args.depth}, width {WIDTH}, 3 input channels, 4 outputs), {args.pretrain_init} init, "
        f"{args.pretrain_steps} SGD steps (momentum 0.9, batch {BATCH_SIZE}, lr {args.pretrain_lr:g}), one per "
        "seed, cached and reused. Fine-tuning tasks: a fixed class-balanced subset of those training images "
        f"with labels (the same for all seeds; {' within '.join(map(spaced, CIFAR_TASKS.values()))}), "
        f"{args.validation_count} validation images (pick the rate) and {args.test_count} test images, the splits "
        f"of bench/cifar_train.py. Every row: all layers, {args.steps} SGD steps (momentum 0.9, batch "
        f"{BATCH_SIZE}, constant rate) per run; from scratch (kaiming normal; magicinit gaussian, the best "
        "from-scratch init of bench/cifar_train.py --family plain) or the pre-trained net with its 4-way head "
        "replaced by a new 10-way linear layer (torch's init; Part 1 on it alone; or that and rescale_ over the "
        f"whole net); the data-dependent inits use {args.init_samples} of the labeled images without labels. "
        f"Learning rate: an adaptive grid from {', '.join(f'{lr:g}' for lr in args.lrs)} on the first seed by "
        f"validation accuracy, extended by about x{GRID_FACTOR:.2f} while the best is at an edge (at most "
        f"{args.max_extensions} times; `edge`: the limit stopped it there), the other seeds at the chosen rate. "
        f"Test accuracy (%): mean over seeds ± half the range; a diverged run counts as "
        f"{100 * DIVERGED_ACCURACY:.0f} %; the best in bold. Differences: per seed, each row at its chosen rate, "
        f"then mean ± half the range. Raw numbers: `{output}`.\n\n"
        + (
            f"Pretext (rotation) accuracy on the {args.validation_count} validation images in all 4 rotations, "
            f"chance 25 %: {pretext}.\n\n"
            if pretext
            else ""
        )
        + (
            f"**Pretext accuracy below 50 % for seed(s) {', '.join(map(str, low))}: the pre-trained rows say "
            "little.**\n\n"
            if low
            else ""
        )
        + cifar_tables(bench)
        + "\n"
    )


def estimate_cifar_seconds(args: argparse.Namespace, data: Dataset, bench: CifarBench, timed_steps: int = 4) -> float:
    """Times ``timed_steps`` SGD steps and one evaluation of the net and returns the expected wall time of
    this invocation: the pre-trainings not cached (unless ``--stage finetune``) and, unless ``--stage
    pretrain``, per (task, row) not finished in the JSON ``len(--lrs) + 1`` runs on the first seed (one
    extension, if any is allowed) and one per further seed, plus 10 s per data-dependent init."""
    torch.manual_seed(0)
    model = plain_cnn(args.depth, WIDTH, in_channels=CIFAR_CHANNELS, classes=CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, labels = data.train[0][:BATCH_SIZE], data.train[1][:BATCH_SIZE]
    for step in range(timed_steps + 1):
        if step == 1:
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_step = (time.perf_counter() - start) / timed_steps
    start = time.perf_counter()
    evaluate(model, *data.validation)
    evaluate(model, *data.test)
    per_evaluation = time.perf_counter() - start
    share = len(data.validation[0]) / (len(data.validation[0]) + len(data.test[0]))
    settings = pretrain_settings(args, data)
    missing = [seed for seed in args.seeds if not pretrain_cache(args.cache_dir, settings, seed).is_file()]
    pretraining = 0.0
    if args.stage != "finetune":
        pretraining = len(missing) * (args.pretrain_steps * per_step + 4 * share * per_evaluation)
    fine_tuning = 0.0
    pending = 0
    if args.stage != "pretrain":
        runs_per_row = len(args.lrs) + min(1, args.max_extensions) + len(args.seeds) - 1
        per_run = args.steps * per_step + per_evaluation
        for task_key in args.tasks:
            for row in args.rows:
                if f"{cifar_task_name(CIFAR_TASKS[task_key])}, {row}" in bench.grids:
                    continue  # finished in the JSON (--resume)
                pending += 1
                fine_tuning += runs_per_row * per_run
                if row not in ("kaiming normal", "torch default", DEFAULT_HEAD):
                    fine_tuning += len(args.seeds) * 10.0
    print(
        f"plain_cnn depth {args.depth} width {WIDTH}, 32 px, {args.threads} thread(s): {1000 * per_step:.0f} ms per "
        f"step, {per_evaluation:.1f} s to evaluate {len(data.validation[0])} + {len(data.test[0])} images; "
        f"pre-training: {len(missing) if args.stage != 'finetune' else 0} of {len(args.seeds)} seeds to train "
        f"({args.pretrain_steps} steps each), {pretraining / 60:.0f} min; fine-tuning: {pending} (task, row) "
        f"searches to run, {fine_tuning / 60:.0f} min",
        flush=True,
    )
    total = pretraining + fine_tuning
    print(f"expected wall time: {total / 60:.0f} minutes (one grid extension per row)", flush=True)
    return total


def main_cifar(args: argparse.Namespace, data: Dataset | None = None) -> CifarBench:
    """CIFAR-10: the pre-trainings (cached), the fine-tuning runs (written as they finish), the section."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as bench/train.py: denormals slow CPU training, change nothing that matters
    if data is None:
        data = load_cifar_data(args.data_root, CIFAR_TRAIN_IMAGES, args.validation_count, args.test_count)
    print(
        f"CIFAR-10: {len(data.train[0])} training images (pretext), {len(data.validation[0])} validation, "
        f"{len(data.test[0])} test; tasks {', '.join(args.tasks)} labels; stage {args.stage}",
        flush=True,
    )
    bench = CifarBench(args, args.output)
    if args.resume:
        bench.load()
    elif args.output.is_file() and not args.estimate:
        print(f"{args.output}: replaced (without --resume its runs are not kept)", flush=True)
    estimate_cifar_seconds(args, data, bench)
    if args.estimate:
        return bench
    library_commit = commit()  # the code this run loads (the checkout may move on while it runs)
    started = time.perf_counter()
    pretrained_rows = any(ROWS[row].pretrained for row in args.rows)
    nets: dict[int, nn.Module] = {}
    if args.stage == "pretrain" or pretrained_rows:
        nets = pretrained_nets(args, data, bench, train_missing=args.stage != "finetune")
    if args.stage != "pretrain":
        run_cifar_tasks(args, data, bench, nets)
    minutes = (time.perf_counter() - started) / 60
    bench.invocations.append(
        {
            "date": time.strftime("%Y-%m-%d"),
            "command": args.command,
            "commit": library_commit,
            "threads": args.threads,
            "minutes": round(minutes, 2),
        }
    )
    bench.write()
    replace_section(args.results, CIFAR_HEADING, cifar_section(bench))
    print()
    print(cifar_tables(bench))
    print(f"wrote {args.results}, {args.output} ({minutes:.1f} minutes)")
    return bench


if __name__ == "__main__":
    main()
