"""Do nets trained from scratch on CIFAR-10 do better with magicinit than with the usual inits?

Protocol (all defaults; see ``--help``), one network family per invocation (``--family``):

* Data: CIFAR-10 from ``--data-root`` (default ``../shared/data``) through ``bench/cifar10.py`` (decoded once
  and cached). Of the 50 000 training images, the 5 000 that ``load_cifar10`` holds out are the validation
  pool and a fixed random ``--train-count`` (10 000) of the other 45 000 are the training set (the split of
  ``bench/train.py``, seed 0). ``--validation-count`` of the validation pool (1 000) pick the learning rate;
  the first ``--test-count`` of a fixed shuffle of the 10 000 test images (2 000) are the test set (raise both
  to 5 000 / 10 000 when the budget allows). Every channel is standardized with the training set's
  per-channel mean and std.
* Families, each with its own ``bench/cifar_<family>_results.json`` and its own section
  ``## bench/cifar_train.py --family <family>`` of ``bench/RESULTS.md``:

  - ``plain``: ``magicinit.tools.nets.plain_cnn`` (3x3 ReLU convolutions, width 16, two max-pools at one and
    two thirds, global average pool, linear head; no normalization), depth 10 and 20, and its batch-norm twin;
  - ``caffenet``: ``cifar_nets.caffenet_cifar``, the paper's CaffeNet layout for 32 px (conv1 5x5 stride 1,
    LRN, grouped convolutions, dropout), width 1/8, hidden 256; magicinit in ``scale_mode`` exact and
    approximate;
  - ``resnet``: ``cifar_nets.resnet20`` (3 stages x 3 basic blocks, widths 16/32/64) without normalization,
    and its batch-norm twin; ``resnet-bn``: every row on the batch-norm ResNet-20 (and magicinit with
    ``across_normalization=True``);
  - ``vit``: ``cifar_nets.vit`` (4x4 patches, class token, dim 64, 4 pre-norm blocks, 4 heads, GELU MLP x2).

* Rows: torch default, kaiming normal (fan-in, relu), orthogonal (relu gain), ``lsuv`` (the PyPI package,
  its defaults), magicinit gaussian Part 1 alone (``between=False``), magicinit gaussian Parts 1+2, kmeans
  Parts 1+2 (``"kmeans"``, the authors' construction), zca Parts 1+2, and for plain nets and the ResNet the
  batch-norm twin with kaiming normal and with magicinit's defaults (``batch norm + magicinit``: Part 2
  leaves the layers before a batch norm alone). Every magicinit init uses 256 random training images and the run's
  seed. The init is computed once per (depth, row, seed) and copied for every learning rate. An init that
  raises is recorded (``init_errors`` in the JSON) and its row is left out.
* Training: ``magicinit.tools.demo.train``: SGD, momentum 0.9, no weight decay, batch 128, a constant
  learning rate, ``--steps`` steps for every run (each family has its own default, sized for the budget).
  Validation and test accuracy are measured at 3/4 of the steps and at the end of every run. A run whose
  loss becomes NaN or Inf is diverged and counts as 10 % (chance) from then on.
* Learning rate, an adaptive grid on seed 0: the runs of ``--lrs`` (0.01 0.03 0.1); while the best
  validation accuracy is at the grid's smallest or largest rate, one more rate about sqrt(10) beyond it (on
  the 1-3 sequence: ..., 0.003, 0.01, 0.03, 0.1, 0.3, 1, ...) is trained, at most ``--max-extensions`` (3)
  times per (depth, row) (the JSON's ``grids`` says when that limit stopped a search with the best still at
  an edge). Seeds 1 and 2 are then trained at the chosen rate only: the budget does not allow every seed on
  the whole grid.
* Reported per (family, depth): row, chosen rate (and ``edge`` where the search ended with it at an edge),
  test accuracy at the end and at 3/4 (mean over seeds ± half the range), init seconds, train seconds per
  run; the rows within noise of the best (one of their seeds at or above the best row's worst seed); and whether the
  rows rank alike at 3/4 and at the end (Kendall's tau of the two orders; the pairs of rows that swap, and of
  those the ones whose seeds do not overlap at 3/4 or at the end: a swap within the seeds' spread is a tie).

The JSON holds every run (loss curve every ``LOSS_EVERY`` steps, accuracies, rate, seed, divergence, init
time, the magicinit report's notes and warnings) and the machine; it is rewritten after every run, and
``--resume`` skips the runs it already holds (with the same settings), so an interrupted run can go on and
``--depths 10`` then ``--depths 20 --resume`` fill one table. A run with other than the family's steps
(``--steps``: does the ranking at 3/4 hold in a longer run?) has its own JSON (``..._steps<N>_results.json``)
and its own section (``--family <f> --steps <N>``), beside the default run's. ``--estimate`` times a few
steps of each net and prints the expected wall time without training; a normal run prints the estimate first.
``--recompute-bn-statistics`` evaluates a net with batch norm after recomputing its running statistics, on a
copy of it, from ``BN_STATISTICS_BATCHES`` fixed batches of the training images (in training mode, without
gradients, an equal-weight average): at a constant rate the running averages lag weights that still move
fast, and one evaluation can land far from the net's accuracy (a ResNet-20 with batch norm at 120 steps:
kaiming normal seed 1 at 0.03 read 43.5 % at 3/4 and 26.8 % at the end, 44.9 and 39.8 with the statistics
recomputed; torch's default seed 0 at 0.01 read 23.9 and 44.9, recomputed 40.2 and 46.1). It changes only
the evaluations (training is the same run), has its own JSON (``..._bnstats_results.json``) and section, and
leaves nets without batch norm as they are; ``--runs-without-batch-norm-from`` takes their runs from the
JSON of the same settings evaluated with the running averages, so that only the nets with batch norm train
again (``--family plain``: the batch-norm twin alone).

Run from the repository root::

    pip install -c constraints.txt -e ".[bench]"
    python bench/cifar_train.py --family plain --estimate   # the expected wall time on this machine
    python bench/cifar_train.py --family plain --depths 10            # one depth per invocation ...
    python bench/cifar_train.py --family plain --depths 20 --resume   # ... into the same table
    python bench/cifar_train.py --family caffenet
    python bench/cifar_train.py --family caffenet --steps 300   # twice as long: a section of its own
    python bench/cifar_train.py --family vit --quick        # a smoke test (minutes), not for conclusions
"""

from __future__ import annotations

import argparse
import copy
import math
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
from cifar10 import ARCHIVE, VALIDATION_SHARE, cifar10_arrays
from cifar_nets import caffenet_cifar, resnet20, vit
from magicinit.tools.demo import evaluate, train
from magicinit.tools.nets import plain_cnn
from results_file import (
    BENCH,
    DIVERGED_ACCURACY,
    accuracies,
    commit,
    machine_facts,
    replace_section,
    stored_runs,
    write_runs,
)
from train import (
    BATCH_NORM_TWIN,
    BATCH_SIZE,
    DEFAULT_DATA_ROOT,
    INIT_SAMPLES,
    Dataset,
    InitFn,
    _baseline,
    _digest,
    _lsuv,
    _split,
)

GRID_FACTOR = math.sqrt(10.0)
LOSS_EVERY = 5  # the JSON keeps every LOSS_EVERY-th step's loss
BN_STATISTICS_BATCHES = 20  # --recompute-bn-statistics: training batches of BATCH_SIZE images it averages
PLAIN_WIDTH = 16
CAFFENET_WIDTH = 0.125
CAFFENET_HIDDEN = 256
VIT_DIM, VIT_DEPTH, VIT_HEADS = 64, 4, 4


# ----------------------------------------------------------------------------------------------- inits


def _magicinit(**options: Any) -> InitFn:
    """``magicinit.init_`` with ``options``; unlike ``train._magicinit`` it keeps the warnings and the report's
    notes (``_LAST_INIT_NOTES``), which this benchmark records."""

    def init(model: nn.Module, images: Tensor, seed: int) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = magicinit.init_(model, images, seed=seed, **options)
        _LAST_INIT_NOTES[:] = [f"warning: {w.category.__name__}: {w.message}" for w in caught] + [
            f"note: {note}" for note in report.notes
        ]

    return init


_LAST_INIT_NOTES: list[str] = []  # what the last magicinit init warned and noted
BATCH_NORM_MAGICINIT = "batch norm + magicinit"  # magicinit's defaults on the batch-norm twin


def _common_rows(twin: bool, **magic: Any) -> dict[str, tuple[InitFn, bool]]:
    """The rows every family has: name -> (init, on the batch-norm twin)."""
    rows: dict[str, tuple[InitFn, bool]] = {
        "torch default": (_baseline("default"), False),
        "kaiming normal": (_baseline("kaiming"), False),
        "orthogonal": (_baseline("orthogonal"), False),
        "lsuv": (_lsuv, False),
        "magicinit within (gaussian)": (_magicinit(between=False), False),
        "magicinit (gaussian)": (_magicinit(**magic), False),
        "magicinit (kmeans)": (_magicinit(sampler="kmeans", **magic), False),
        "magicinit (zca)": (_magicinit(sampler="zca", **magic), False),
    }
    if twin:
        rows[BATCH_NORM_TWIN] = (_baseline("kaiming"), True)
        rows[BATCH_NORM_MAGICINIT] = (_magicinit(**magic), True)
    return rows


@dataclass(frozen=True)
class Family:
    """A network family: ``build(depth, batch_norm)``, its depths, rows and default number of steps."""

    summary: str
    build: Callable[[int, bool], nn.Module]
    rows: dict[str, tuple[InitFn, bool]]
    depths: tuple[int, ...]
    steps: int


def _fixed_depth(name: str, depth: int, build: Callable[[bool], nn.Module]) -> Callable[[int, bool], nn.Module]:
    def checked(requested: int, batch_norm: bool) -> nn.Module:
        if requested != depth:
            raise SystemExit(f"--family {name} has depth {depth} only; --depths {requested} does not apply")
        return build(batch_norm)

    return checked


def _caffenet_rows() -> dict[str, tuple[InitFn, bool]]:
    rows = _common_rows(False)
    rows["magicinit (gaussian), scale_mode approximate"] = (_magicinit(scale_mode="approximate"), False)
    return {
        name if name != "magicinit (gaussian)" else "magicinit (gaussian), scale_mode exact": row
        for name, row in rows.items()
    }


def _resnet_bn_rows() -> dict[str, tuple[InitFn, bool]]:
    rows = _common_rows(False)
    rows["magicinit (gaussian), across_normalization"] = (_magicinit(across_normalization=True), False)
    return rows


FAMILIES: dict[str, Family] = {
    "plain": Family(
        f"Plain ReLU CNNs (`magicinit.tools.nets.plain_cnn`, width {PLAIN_WIDTH}, no normalization) and their "
        "batch-norm twin.",
        lambda depth, batch_norm: plain_cnn(depth, PLAIN_WIDTH, in_channels=3, classes=10, batch_norm=batch_norm),
        _common_rows(True),
        (10, 20),
        200,
    ),
    "caffenet": Family(
        f"The paper's CaffeNet layout for 32 px (`cifar_nets.caffenet_cifar`, width {CAFFENET_WIDTH:g}, hidden "
        f"{CAFFENET_HIDDEN}: LRN, grouped convolutions, dropout); magicinit's Part 2 in `exact` mode (LRN fixes "
        "the scales around it) and `approximate` mode.",
        _fixed_depth("caffenet", 8, lambda bn: caffenet_cifar(CAFFENET_WIDTH, hidden=CAFFENET_HIDDEN)),
        _caffenet_rows(),
        (8,),
        150,
    ),
    "resnet": Family(
        "ResNet-20 for CIFAR (`cifar_nets.resnet20`, widths 16/32/64) without normalization, and its batch-norm twin.",
        _fixed_depth("resnet", 20, lambda bn: resnet20(batch_norm=bn)),
        _common_rows(True),
        (20,),
        60,
    ),
    "resnet-bn": Family(
        "ResNet-20 for CIFAR with batch norm (`cifar_nets.resnet20(batch_norm=True)`), every init; by default "
        "Part 2 cannot rescale across batch norm, the last row lets it (`across_normalization=True`).",
        _fixed_depth("resnet-bn", 20, lambda bn: resnet20(batch_norm=True)),
        _resnet_bn_rows(),
        (20,),
        60,
    ),
    "vit": Family(
        f"A small vision transformer (`cifar_nets.vit`: 4x4 patches, class token, dim {VIT_DIM}, {VIT_DEPTH} "
        f"pre-norm blocks, {VIT_HEADS} heads, layer norm, GELU).",
        _fixed_depth("vit", VIT_DEPTH, lambda bn: vit(VIT_DIM, VIT_DEPTH, VIT_HEADS)),
        _common_rows(False),
        (VIT_DEPTH,),
        110,
    ),
}


# ------------------------------------------------------------------------------------------------ data


def load_data(root: Path, train_count: int, validation_count: int, test_count: int) -> Dataset:
    """CIFAR-10 as the module docstring says, every channel standardized by the training set's statistics."""
    archive = root / ARCHIVE
    if not archive.is_file():
        raise SystemExit(f"CIFAR-10: no {archive} (see ../shared/data/SOURCES.md)")
    arrays = cifar10_arrays(archive)
    images, labels = arrays.train
    pool = len(images) // VALIDATION_SHARE
    if train_count > len(images) - pool:
        raise SystemExit(f"--train-count {train_count}: at most {len(images) - pool}")
    test_order = torch.randperm(len(arrays.test[0]), generator=torch.Generator().manual_seed(0))[:test_count]
    data = _split(
        "CIFAR10",
        images.float() / 255.0,
        labels,
        (arrays.test[0][test_order].float() / 255.0, arrays.test[1][test_order]),
        train_count,
        pool,
    )
    return standardize_channels(data, validation_count)


def standardize_channels(data: Dataset, validation_count: int) -> Dataset:
    """``data`` with every channel standardized by the training images' per-channel mean and std (an affine
    map per channel, so any earlier global standardization does not matter), ``validation_count`` validation
    images kept."""
    mean = data.train[0].mean(dim=(0, 2, 3), keepdim=True)
    std = data.train[0].std(dim=(0, 2, 3), keepdim=True)

    def scaled(part: tuple[Tensor, Tensor], count: int | None = None) -> tuple[Tensor, Tensor]:
        images, labels = part[0][:count], part[1][:count]
        return (images - mean) / std, labels

    return Dataset(data.name, scaled(data.train), scaled(data.validation, validation_count), scaled(data.test))


# -------------------------------------------------------------------------------------------- training


@dataclass
class Run:
    """One training run and its results (accuracies at 3/4 of the steps and at the end)."""

    family: str
    depth: int
    init: str
    seed: int
    learning_rate: float
    init_seconds: float
    steps: int = 0
    weights: str = ""  # digest of the initial weights: rows with the same digest train alike
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # every LOSS_EVERY-th step's
    validation_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    validation_accuracy_3_4: float = float("nan")
    test_accuracy_3_4: float = float("nan")
    diverged: bool = False
    diverged_step: int | None = None
    init_notes: list[str] = field(default_factory=list)

    def key(self) -> tuple[int, str, int, float]:
        return (self.depth, self.init, self.seed, self.learning_rate)


@dataclass
class _AtThreeQuarters:
    """Stands in for a run's 3/4 figures in ``accuracies``: diverged if the run diverged by then."""

    seed: int
    diverged: bool
    validation_accuracy: float
    test_accuracy: float


def three_quarters(run: Run) -> _AtThreeQuarters:
    """The run as it was at 3/4 of its steps (diverged if it diverged before they were measured)."""
    early = run.diverged_step is not None and run.diverged_step <= _checkpoint(run.steps)
    return _AtThreeQuarters(run.seed, early, run.validation_accuracy_3_4, run.test_accuracy_3_4)


def _checkpoint(steps: int) -> int:
    """The step after which the 3/4 accuracies are measured."""
    return (3 * steps) // 4


class _EvaluateAt(nn.Module):
    """Wraps a model for ``demo.train``: before the training forward number ``step + 1`` it calls
    ``callback(model)`` once (the model back in training mode after it), so one continuous run is measured at
    an intermediate step."""

    def __init__(self, model: nn.Module, step: int, callback: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.model, self.step, self.callback, self.calls = model, step, callback, 0

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if self.calls == self.step:
                self.callback(self.model)
                self.model.train()
            self.calls += 1
        return self.model(x)


def batch_norms_with_running_statistics(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``net`` that keep running statistics (those that eval mode uses)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def with_recomputed_bn_statistics(model: nn.Module, images: Tensor) -> nn.Module:
    """A copy of ``model`` whose batch norms' running statistics are recomputed from ``images``: reset, then
    the equal-weight average (``momentum=None``) over ``BN_STATISTICS_BATCHES`` batches of ``BATCH_SIZE`` of a
    fixed shuffle of them, in training mode without gradients; ``model`` itself where it has no batch norm
    with running statistics."""
    if not batch_norms_with_running_statistics(model):
        return model
    copied = copy.deepcopy(model)
    for norm in batch_norms_with_running_statistics(copied):
        norm.reset_running_stats()
        norm.momentum = None
    copied.train()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start in range(0, min(len(images), BN_STATISTICS_BATCHES * BATCH_SIZE), BATCH_SIZE):
            copied(images[order[start : start + BATCH_SIZE]])
    return copied


def train_run(run: Run, model: nn.Module, data: Dataset, steps: int, recompute_bn_statistics: bool = False) -> Run:
    """Train ``model`` (in place) as ``run`` says, filling in its losses, accuracies and divergence; with
    ``recompute_bn_statistics``, every evaluation is of ``with_recomputed_bn_statistics`` of the model."""

    def measure(trained: nn.Module, suffix: str) -> None:
        if recompute_bn_statistics:
            trained = with_recomputed_bn_statistics(trained, data.train[0])
        setattr(run, "validation_accuracy" + suffix, evaluate(trained, *data.validation)[0])
        setattr(run, "test_accuracy" + suffix, evaluate(trained, *data.test)[0])

    start = time.perf_counter()
    probe = _EvaluateAt(model, _checkpoint(steps), lambda m: measure(m, "_3_4"))
    losses = train(
        probe, *data.train, steps=steps, batch_size=BATCH_SIZE, learning_rate=run.learning_rate, seed=run.seed
    )
    run.diverged = not math.isfinite(losses[-1])
    if run.diverged:
        run.diverged_step = len(losses)
    else:
        measure(model, "")
    run.train_seconds = time.perf_counter() - start
    run.losses = [float(f"{loss:.4g}") for loss in losses[::LOSS_EVERY]] + [float(f"{losses[-1]:.4g}")]
    return run


# ------------------------------------------------------------------------------------ the adaptive grid


@dataclass
class GridSearch:
    """The learning rates tried (ascending), the best, and whether the search stopped with the best at an
    edge because ``max_extensions`` was reached."""

    tried: list[float]
    best: float
    extensions: int
    stopped_at_edge: bool


def _one_three(rate: float) -> float:
    """The nearest (in log scale) of the rates 1 and 3 times a power of ten: 0.316 -> 0.3, 0.949 -> 1."""
    decade = math.floor(math.log10(rate))
    candidates = [mantissa * 10.0**power for power in (decade, decade + 1) for mantissa in (1, 3)]
    nearest = min(candidates, key=lambda candidate: abs(math.log(candidate / rate)))
    return float(f"{nearest:.3g}")


def adaptive_grid(
    start: Sequence[float],
    score: Callable[[float], float],
    factor: float = GRID_FACTOR,
    max_extensions: int = 3,
) -> GridSearch:
    """Score every rate of ``start``; while the best is the smallest (largest) rate tried, score one more
    ``factor`` below (above) it (snapped to the 1-3 sequence: 0.1, 0.3, 1, ...), at most ``max_extensions``
    times. Ties go to the smaller rate."""
    scores = {lr: score(lr) for lr in sorted(start)}
    extensions = 0
    while True:
        tried = sorted(scores)
        best = max(tried, key=lambda lr: scores[lr])  # the first maximum: the smallest rate on ties
        if best not in (tried[0], tried[-1]):
            return GridSearch(tried, best, extensions, False)
        if extensions >= max_extensions:
            return GridSearch(tried, best, extensions, True)
        beyond = best / factor if best == tried[0] else best * factor
        new = _one_three(beyond)
        if not (new < tried[0] or new > tried[-1]):  # snapping went back into the grid: keep the plain step
            new = float(f"{beyond:.3g}")
        scores[new] = score(new)
        extensions += 1


# ------------------------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    """The runs of one invocation, written to ``path`` as JSON after every run."""

    args: argparse.Namespace
    path: Path
    runs: dict[tuple[int, str, int, float], Run] = field(default_factory=dict)
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    init_errors: dict[str, str] = field(default_factory=dict)
    # ``--runs-without-batch-norm-from``: the JSON the runs of nets without batch norm were taken from, its
    # machine facts, and the rows and number of runs taken
    copied: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        keys = (
            "family",
            "steps",
            "train_count",
            "validation_count",
            "test_count",
            "lrs",
            "max_extensions",
            "init_samples",
        )
        settings = {key: getattr(self.args, key) for key in keys}
        if self.args.recompute_bn_statistics:  # (absent otherwise: the JSONs written before the option resume)
            settings["bn_statistics"] = f"recomputed from {BN_STATISTICS_BATCHES} x {BATCH_SIZE} training images"
        return settings

    def load(self) -> None:
        """Take the runs of an earlier JSON with the same settings (``--resume``)."""
        stored = stored_runs(self.path, self.settings())
        if stored is None:
            return
        for record in stored["runs"]:
            run = Run(**record)
            self.runs[run.key()] = run
        self.grids = stored.get("grids", {})
        self.init_errors = stored.get("init_errors", {})
        self.copied = stored.get("copied", {})

    def write(self) -> None:
        """The JSON, one run per line, replaced whole."""
        write_runs(
            self.path,
            {
                "settings": self.settings(),
                "machine": machine_facts(commit=self.args.commit),
                "grids": self.grids,
                "init_errors": self.init_errors,
                **({"copied": self.copied} if self.copied else {}),
            },
            {"runs": [asdict(run) for run in self.runs.values()]},
        )


def copy_runs_without_batch_norm(bench: Bench, source: Path) -> None:
    """Take into ``bench`` (a ``--recompute-bn-statistics`` run) the runs, grids and failures of the rows of
    ``source`` whose nets have no batch norm with running statistics. ``source`` is the JSON of the same
    settings evaluated with the running averages; the option evaluates those nets as they are (training is
    the same run), so their runs are the ones it would make, up to the floating-point order of the machine
    they were made on (rerun on another CPU, a run's accuracy moves within the seeds' spread). Runs ``bench``
    holds already are kept."""
    args = bench.args
    family = FAMILIES[args.family]
    settings = {key: value for key, value in bench.settings().items() if key != "bn_statistics"}
    stored = stored_runs(source, settings)
    if stored is None:
        raise SystemExit(f"--runs-without-batch-norm-from: {source} does not exist")
    normalized: dict[tuple[int, bool], bool] = {}  # (depth, batch-norm twin) -> whether its net has batch norm

    def without_batch_norm(depth: int, row: str) -> bool:
        if row not in family.rows:
            return False
        twin = family.rows[row][1]
        if (depth, twin) not in normalized:
            normalized[depth, twin] = bool(batch_norms_with_running_statistics(family.build(depth, twin)))
        return not normalized[depth, twin]

    taken: set[str] = set()
    count = 0
    for record in stored["runs"]:
        run = Run(**record)
        if without_batch_norm(run.depth, run.init) and run.key() not in bench.runs:
            bench.runs[run.key()] = run
            taken.add(run.init)
            count += 1
    for table, into in ((stored.get("grids", {}), bench.grids), (stored.get("init_errors", {}), bench.init_errors)):
        for label, entry in table.items():  # labels "depth D, row"
            depth, row = label.split(", ", 1)
            if without_batch_norm(int(depth.removeprefix("depth ")), row):
                into.setdefault(label, entry)
    if count:
        rows = sorted(taken | set(bench.copied.get("rows", [])), key=list(family.rows).index)
        bench.copied = {
            "source": source.name,
            "machine": stored.get("machine", {}),
            "rows": rows,
            "runs": count + bench.copied.get("runs", 0),
        }
    bench.write()


def run_family(args: argparse.Namespace, data: Dataset, bench: Bench) -> None:
    """Every (depth, row): the adaptive grid on seed 0, then the other seeds at the chosen rate."""
    family = FAMILIES[args.family]
    started = time.perf_counter()
    for depth in args.depths:
        for row in args.rows:
            init, twin = family.rows[row]
            models: dict[int, tuple[nn.Module, float, str, list[str]]] = {}

            def initialized(seed: int) -> tuple[nn.Module, float, str, list[str]]:
                if seed not in models:
                    torch.manual_seed(seed)
                    model = family.build(depth, twin)
                    pick = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))
                    _LAST_INIT_NOTES.clear()
                    start = time.perf_counter()
                    init(model, data.train[0][pick[: args.init_samples]], seed)
                    models[seed] = (model, time.perf_counter() - start, _digest(model), list(_LAST_INIT_NOTES))
                return models[seed]

            def run_at(seed: int, learning_rate: float) -> Run:
                key = (depth, row, seed, learning_rate)
                if key not in bench.runs:
                    model, seconds, digest, notes = initialized(seed)
                    run = Run(
                        args.family, depth, row, seed, learning_rate, seconds, args.steps, digest, init_notes=notes
                    )
                    train_run(run, copy.deepcopy(model), data, args.steps, args.recompute_bn_statistics)
                    bench.runs[key] = run
                    bench.write()
                    result = "diverged" if run.diverged else f"val {100 * run.validation_accuracy:.1f}%"
                    print(
                        f"[{(time.perf_counter() - started) / 60:5.1f} min] depth {depth} {row:<44} seed {seed} "
                        f"lr {learning_rate:<7g} {result} (init {seconds:.1f} s, train {run.train_seconds:.0f} s)",
                        flush=True,
                    )
                return bench.runs[key]

            label = f"depth {depth}, {row}"
            try:
                search = adaptive_grid(
                    args.lrs,
                    lambda lr: accuracies([run_at(args.seeds[0], lr)], "validation_accuracy")[0],
                    max_extensions=args.max_extensions,
                )
                for seed in args.seeds[1:]:
                    run_at(seed, search.best)
            except Exception as error:  # an init (or a run) that fails on this net: recorded, the row left out
                message = f"{type(error).__name__}: {error}"
                print(f"depth {depth} {row}: failed: {message}", flush=True)
                bench.init_errors[label] = message
                bench.write()
                continue
            bench.grids[label] = asdict(search)
            bench.write()


# --------------------------------------------------------------------------------------------- tables


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _spread(values: Sequence[float]) -> str:
    text = f"{100 * _mean(values):.2f}"
    if len(values) > 1:
        text += f" ± {50 * (max(values) - min(values)):.2f}"
    return text


def kendall_tau(first: Sequence[float], second: Sequence[float]) -> float:
    """Kendall's tau-a of two scorings of the same items (1: same order, -1: reversed)."""
    pairs = [(i, j) for i in range(len(first)) for j in range(i + 1, len(first))]
    if not pairs:
        return float("nan")
    agree = sum((first[i] - first[j]) * (second[i] - second[j]) > 0 for i, j in pairs) - sum(
        (first[i] - first[j]) * (second[i] - second[j]) < 0 for i, j in pairs
    )
    return agree / len(pairs)


def _apart(first: Sequence[float], second: Sequence[float]) -> bool:
    """Whether two rows' seeds do not overlap (every seed of one above every seed of the other)."""
    return min(first) > max(second) or min(second) > max(first)


def swapped_pairs(
    ends: dict[str, list[float]], early: dict[str, list[float]]
) -> tuple[int, list[tuple[str, str]], list[tuple[str, str]]]:
    """Pairs of rows whose means order differently at 3/4 and at the end: the number of pairs, the
    swapped ones, and those of them whose seeds do not overlap at 3/4 or at the end (a conclusion drawn
    at one point that the other contradicts; swaps within the seeds' spread at both are ties)."""
    rows = list(ends)
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]]
    swapped = [(a, b) for a, b in pairs if (_mean(ends[a]) - _mean(ends[b])) * (_mean(early[a]) - _mean(early[b])) < 0]
    apart = [(a, b) for a, b in swapped if _apart(ends[a], ends[b]) or _apart(early[a], early[b])]
    return len(pairs), swapped, apart


def tables(bench: Bench) -> str:
    """The markdown tables of every depth (see the module docstring)."""
    args = bench.args
    lines: list[str] = []
    for depth in sorted({run.depth for run in bench.runs.values()} | set(args.depths)):
        lines += [f"### {args.family}, depth {depth}", ""]
        header = ["init", "chosen lr", "test acc % end (± half range)", "test acc % at 3/4", "init s", "train s / run"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        ends: dict[str, list[float]] = {}
        early: dict[str, list[float]] = {}
        for row in FAMILIES[args.family].rows:  # every row the JSON holds (--resume may add rows to earlier runs)
            label = f"depth {depth}, {row}"
            if label in bench.init_errors:
                lines.append(f"| {row} | failed: {bench.init_errors[label]} | | | | |")
                continue
            if label not in bench.grids:
                continue
            grid = bench.grids[label]
            chosen = grid["best"]
            runs = [r for r in bench.runs.values() if (r.depth, r.init, r.learning_rate) == (depth, row, chosen)]
            ends[row] = accuracies(runs, "test_accuracy")
            early[row] = accuracies([three_quarters(r) for r in runs], "test_accuracy")
            all_runs = [r for r in bench.runs.values() if (r.depth, r.init) == (depth, row)]
            diverged = sum(r.diverged for r in all_runs)
            lr_text = f"{chosen:g}" + (" (edge)" if grid["stopped_at_edge"] else "")
            lines.append(
                f"| {row} | {lr_text} | {_spread(ends[row])} | {_spread(early[row])} | "
                f"{_mean([r.init_seconds for r in all_runs]):.2f} | {_mean([r.train_seconds for r in all_runs]):.0f}"
                + (f" ({diverged} of {len(all_runs)} runs diverged)" if diverged else "")
                + " |"
            )
        lines.append("")
        if ends:
            best = max(ends, key=lambda row: _mean(ends[row]))
            floor = min(ends[best])
            within = [row for row in ends if max(ends[row]) >= floor]
            rows = list(ends)
            tau = kendall_tau([_mean(ends[r]) for r in rows], [_mean(early[r]) for r in rows])
            same = [r for r in sorted(rows, key=lambda r: -_mean(ends[r]))] == [
                r for r in sorted(rows, key=lambda r: -_mean(early[r]))
            ]
            pairs, swapped, apart = swapped_pairs(ends, early)
            if not swapped:
                swaps = "no pair of rows swaps"
            elif not apart:
                swaps = (
                    f"{len(swapped)} of {pairs} pairs of rows swap, each within the seeds' spread at 3/4 and at "
                    "the end (the order holds beyond that spread)"
                )
            else:
                swaps = (
                    f"{len(swapped)} of {pairs} pairs of rows swap, {len(apart)} of them with seeds apart at 3/4 "
                    "or at the end: " + "; ".join(f"{a} / {b}" for a, b in apart)
                )
            lines += [
                f"Best at the end: {best}. Within noise of it (a seed at or above its worst seed): "
                f"{', '.join(within)}. Rows ranked at 3/4 and at the end: Kendall's tau {tau:.2f}, same order: "
                f"{'yes' if same else 'no'}; {swaps}.",
                "",
            ]
        for label, grid in bench.grids.items():
            if label.startswith(f"depth {depth},") and grid["stopped_at_edge"]:
                lines += [
                    f"Grid search of {label} stopped at the extension limit with the best rate at an edge "
                    f"(tried {', '.join(f'{lr:g}' for lr in grid['tried'])}).",
                    "",
                ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- estimate


def estimate_seconds(args: argparse.Namespace, data: Dataset, timed_steps: int = 3) -> float:
    """Times ``timed_steps`` training steps and one evaluation of each net of the family and returns the
    expected wall time: per (depth, row) ``len(--lrs) + 1`` grid runs (one extension, if any is allowed) plus
    one per further seed, and per magicinit seed 3 s of init."""
    family = FAMILIES[args.family]
    total = 0.0
    runs_per_row = len(args.lrs) + min(1, args.max_extensions) + len(args.seeds) - 1
    for depth in args.depths:
        for twin in sorted({family.rows[row][1] for row in args.rows}):
            model = family.build(depth, twin)
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
            rows = [row for row in args.rows if family.rows[row][1] == twin]
            per_run = args.steps * per_step + 2 * per_evaluation
            total += len(rows) * runs_per_row * per_run
            total += sum(row.startswith("magicinit") for row in rows) * len(args.seeds) * 3.0
            print(
                f"{args.family} depth {depth}{' (batch-norm twin)' if twin else ''}: {1000 * per_step:.0f} ms "
                f"per step, {per_evaluation:.1f} s to evaluate {len(data.validation[0])} validation + "
                f"{len(data.test[0])} test images, {per_run:.0f} s per run of {args.steps} steps; "
                f"{len(rows)} rows x {runs_per_row} runs",
                flush=True,
            )
    print(f"expected wall time: {total / 60:.0f} minutes (one grid extension per row)", flush=True)
    return total


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=list(FAMILIES))
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="default ../shared/data")
    parser.add_argument("--depths", type=int, nargs="+", help="default: the family's")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run (default: all of the family's)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="the starting grid")
    parser.add_argument("--max-extensions", type=int, default=3, help="grid extensions per (depth, row) at most")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first searches the grid")
    parser.add_argument("--steps", type=int, help="SGD steps per run (batch 128; default: the family's)")
    parser.add_argument("--train-count", type=int, default=10_000)
    parser.add_argument("--validation-count", type=int, default=1_000, help="at most 5 000")
    parser.add_argument("--test-count", type=int, default=2_000, help="at most 10 000")
    parser.add_argument("--init-samples", type=int, default=INIT_SAMPLES, help="images every data-driven init sees")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="keep the runs the JSON holds (same settings)")
    parser.add_argument("--estimate", action="store_true", help="print the expected wall time and stop")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 000 training images, 256 validation and test, 64 init images, 12 steps, 1 seed, "
        "2 rates, 1 depth, no extension; writes to a temporary folder unless --output (not for conclusions)",
    )
    parser.add_argument(
        "--recompute-bn-statistics",
        action="store_true",
        help="evaluate nets with batch norm after recomputing their running statistics from training images "
        "(its own JSON and section)",
    )
    parser.add_argument(
        "--runs-without-batch-norm-from",
        type=Path,
        metavar="JSON",
        help="with --recompute-bn-statistics: take the runs of nets without batch norm from this JSON of the "
        "same settings (the option evaluates them as they are)",
    )
    parser.add_argument("--output", type=Path, help="the JSON file (default bench/cifar_<family>_results.json)")
    parser.add_argument("--results", type=Path, help="the markdown file (default bench/RESULTS.md)")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    args.depths = args.depths or list(family.depths)
    args.rows = args.rows or list(family.rows)
    unknown = [row for row in args.rows if row not in family.rows]
    if unknown:
        parser.error(f"--rows {unknown}: not rows of --family {args.family}; it has {list(family.rows)}")
    if args.runs_without_batch_norm_from and not args.recompute_bn_statistics:
        parser.error("--runs-without-batch-norm-from: only with --recompute-bn-statistics")
    args.steps = args.steps or family.steps
    other_steps = other_steps_than_the_family(args)  # before --quick sets its own: its own JSON and section
    if args.quick:
        args.train_count, args.validation_count, args.test_count, args.init_samples = 1_000, 256, 256, 64
        args.steps, args.seeds, args.lrs, args.max_extensions = 12, args.seeds[:1], [0.01, 0.03], 0
        args.depths = args.depths[:1]
        quick_dir = Path(tempfile.gettempdir()) / "magicinit-cifar-quick"
        quick_dir.mkdir(exist_ok=True)
        args.output = args.output or quick_dir / f"cifar_{args.family.replace('-', '_')}_results.json"
        args.results = args.results or quick_dir / "RESULTS.md"
    own = (f"_steps{other_steps}" if other_steps else "") + ("_bnstats" if args.recompute_bn_statistics else "")
    args.output = args.output or BENCH / f"cifar_{args.family.replace('-', '_')}{own}_results.json"
    args.results = args.results or BENCH / "RESULTS.md"
    return args


def main(argv: Sequence[str] | None = None, data: Dataset | None = None) -> Bench:
    """Run the benchmark (``data`` given: instead of loading CIFAR-10, for tests); returns its runs."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals slow CPU training many times; no result that matters changes
    if data is None:
        data = load_data(args.data_root, args.train_count, args.validation_count, args.test_count)
    print(
        f"CIFAR-10: {len(data.train[0])} train, {len(data.validation[0])} validation, {len(data.test[0])} test "
        f"images; {args.threads} threads",
        flush=True,
    )
    estimate_seconds(args, data)
    if args.estimate:
        raise SystemExit(0)
    args.commit = commit()
    bench = Bench(args, args.output)
    if args.resume:
        bench.load()
    if args.runs_without_batch_norm_from:
        copy_runs_without_batch_norm(bench, args.runs_without_batch_norm_from)
    started = time.perf_counter()
    run_family(args, data, bench)
    minutes = (time.perf_counter() - started) / 60
    command = "python bench/cifar_train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    how = (
        f"Command, run from the repository root on {time.strftime('%Y-%m-%d')}, library at commit {args.commit}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, CPU, "
        f"{minutes:.0f} minutes (this invocation"
        + (
            "; with --resume, the runs of earlier invocations that the JSON held are kept and tabulated"
            if args.resume
            else ""
        )
        + f"):\n\n```\n{command}\n```"
    )
    replace_section(args.results, heading(args), section_text(bench, how))
    print()
    print(tables(bench))
    print(f"wrote {args.results}, {args.output}")
    return bench


def other_steps_than_the_family(args: argparse.Namespace) -> int | None:
    """The run's steps where they are not its family's default (``--steps``; None for ``--quick``), which
    give it a JSON and a RESULTS section of its own, beside the default run's."""
    return None if args.quick or args.steps == FAMILIES[args.family].steps else args.steps


def heading(args: argparse.Namespace) -> str:
    """The heading of the family's section of RESULTS.md (``other_steps_than_the_family`` and
    ``--recompute-bn-statistics``: a section of its own)."""
    other_steps = other_steps_than_the_family(args)
    steps = f" --steps {other_steps}" if other_steps else ""
    statistics = " --recompute-bn-statistics" if args.recompute_bn_statistics else ""
    return f"## bench/cifar_train.py --family {args.family}{steps}{statistics}"


def section_text(bench: Bench, how: str) -> str:
    """The family's section of RESULTS.md: ``how`` it was run (the commands), the settings, every table."""
    args = bench.args
    section = (
        f"{heading(args)}\n\n{how}\n\n"
        f"{FAMILIES[args.family].summary}\n\n"
        f"CIFAR-10: {args.train_count} training images, {args.validation_count} validation images (pick the "
        f"rate), {args.test_count} test images; per-channel standardization. {args.steps} SGD steps (momentum "
        f"0.9, no weight decay, batch {BATCH_SIZE}, constant rate) per run. The rate: an adaptive grid from "
        f"{', '.join(f'{lr:g}' for lr in args.lrs)} on seed {args.seeds[0]} by validation accuracy, extended by "
        f"about x{GRID_FACTOR:.2f} (the 1-3 sequence) while the best is at an edge (at most "
        f"{args.max_extensions} times; `edge`: the "
        f"limit stopped it there); seeds {', '.join(map(str, args.seeds[1:])) or '(none)'} trained at the chosen "
        f"rate only. Test accuracy (%): mean over seeds ± half the range, at the end and at 3/4 of the steps; a "
        f"diverged run counts as {100 * DIVERGED_ACCURACY:.0f} %"
        + (
            f"; every evaluation of a net with batch norm after recomputing its running statistics on a copy, "
            f"from {BN_STATISTICS_BATCHES} batches of {BATCH_SIZE} training images in training mode (an equal-weight "
            "average)"
            if args.recompute_bn_statistics
            else ""
        )
        + (
            f". The {bench.copied['runs']} runs of the rows without batch norm ({', '.join(bench.copied['rows'])}) "
            f"are those of `{bench.copied['source']}` (commit {bench.copied['machine'].get('commit', 'unknown')}), "
            "taken with `--runs-without-batch-norm-from` (the option evaluates those nets as they are; made on "
            "that commit's machine, whose floating-point order may differ)"
            if bench.copied
            else ""
        )
        + ". Init s: the initialization's time; train s: one "
        "run's training and its evaluations. Raw numbers: "
        f"`{args.output.name if args.output.parent == BENCH else args.output}`.\n\n" + tables(bench) + "\n"
    )
    return section


if __name__ == "__main__":
    main()
