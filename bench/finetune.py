"""Data-dependent init vs self-supervised pre-training vs both, on 1 000 labels of MNIST and of USPS.

The paper's claim, at small scale: "combined with pre-training, the initialization significantly outperforms".
Protocol (all defaults; see ``--help``):

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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import magicinit
from magicinit.tools.baselines import BASELINES
from magicinit.tools.demo import evaluate, train
from magicinit.tools.nets import plain_cnn
from results_file import BENCH, accuracies, best_learning_rate, commit, replace_section
from train import BATCH_SIZE, DEFAULT_DATA_ROOT, INIT_SAMPLES, Dataset, load_mnist, load_usps

WIDTH = 16
CLASSES = 10
ROTATIONS = 4
LABELED = 1_000
LABELED_TEXT = "1 000"
TASKS: dict[str, Callable[[Path], Dataset]] = {"MNIST": load_mnist, "USPS": load_usps}

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


def all_rotations(images: Tensor) -> Tensor:
    """``(4, N, C, H, W)``: the images turned by 0, 90, 180 and 270 degrees."""
    return torch.stack([torch.rot90(images, turns, dims=(2, 3)) for turns in range(ROTATIONS)])


def pretrain(images: Tensor, depth: int, record: Pretraining) -> nn.Module:
    """Train a kaiming-initialized ``plain_cnn`` with 4 outputs to tell the rotation of each image."""
    torch.manual_seed(record.seed)
    model = plain_cnn(depth, WIDTH, in_channels=1, classes=ROTATIONS)
    BASELINES["kaiming"](model)
    rotated = all_rotations(images)
    optimizer = torch.optim.SGD(model.parameters(), lr=record.learning_rate, momentum=0.9)
    generator = torch.Generator().manual_seed(record.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    while len(record.losses) < record.steps:
        if len(order) < BATCH_SIZE:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        rotation = torch.randint(ROTATIONS, (len(index),), generator=generator)
        loss = nn.functional.cross_entropy(model(rotated[rotation, index]), rotation)
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


def fine_tuning_model(pretrained: nn.Module | None, depth: int, seed: int) -> nn.Module:
    """A fresh ``plain_cnn`` with 10 outputs, or a copy of ``pretrained`` with a new 10-way head."""
    torch.manual_seed(seed)
    if pretrained is None:
        return plain_cnn(depth, WIDTH, in_channels=1, classes=CLASSES)
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


def difference_table(at_chosen: dict[str, list[float]], validation: dict[str, float]) -> list[str]:
    """Per-seed differences of test accuracy (each row at its chosen lr), averaged, with half their range."""
    scratch = [row for row in FROM_SCRATCH if row in at_chosen]
    best_scratch = max(scratch, key=lambda row: validation[row]) if scratch else None
    pairs = [(RESCALED, MAGIC_HEAD), (RESCALED, best_scratch), (DEFAULT_HEAD, "kaiming normal")]
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
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
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


def main() -> None:
    """Parse the arguments, run everything, write the section of RESULTS.md and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="folder with mnist/ and usps/ (default ../shared/data)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--depth", type=int, default=10, help="affine layers of the plain CNN")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning SGD steps per run (batch 128)")
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="rotation pre-training steps (batch 128)")
    parser.add_argument("--pretrain-lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one seed, learning rates 0.003 and "
        "0.01, 500 pre-training and 100 fine-tuning steps (not for conclusions)",
    )
    parser.add_argument("--out-dir", type=Path, default=BENCH, help="where the JSON goes")
    parser.add_argument(
        "--results",
        type=Path,
        default=BENCH / "RESULTS.md",
        help="the markdown file whose '## bench/finetune.py' section is replaced",
    )
    args = parser.parse_args()
    if not (args.data_root / "mnist").exists():
        parser.error(f"--data-root {args.data_root}: no mnist/ there (see ../shared/data/SOURCES.md)")
    if args.quick:
        args.seeds, args.lrs, args.pretrain_steps, args.steps = args.seeds[:1], [0.003, 0.01], 500, 100
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


if __name__ == "__main__":
    main()
