"""Does a plain CNN without batch norm train better from magicinit? Measured on MNIST and USPS.

Protocol (all defaults; see ``--help``):

* Data, from ``--data-root`` (default ``../shared/data``): MNIST (the idx files;
  a fixed random 10 000 of the 60 000 training images, the official 10 000 test
  images) and USPS (``usps.h5``, needs h5py: all 7 291 training and 2 007 test
  images). MNIST is resized to 16 x 16 (USPS's size, bilinear with antialias),
  so that both cost the same. A further fixed 2 000 (MNIST) / 1 000 (USPS)
  training images are held out as a validation set that picks the learning rate.
  Pixels are standardized with the training subset's mean and std. ``--datasets
  CIFAR10`` loads CIFAR-10 (``bench/cifar10.py``: 45 000 training, 5 000
  validation and the 10 000 test images, 32 x 32 RGB, decoded once and cached);
  the networks here take one channel, so no experiment uses it yet.
* Models: ``magicinit.tools.nets.plain_cnn`` (3x3 ReLU convolutions, two max-pools,
  global average pool, a linear head), ``--width`` 16, at depth 10 and 20
  (affine layers), and its twin with batch norm after every convolution.
* Initializations: torch's default, xavier normal, kaiming normal (fan-in,
  relu), orthogonal (relu gain), ``lsuv`` 0.3.0 (the PyPI package, its
  defaults), magicinit gaussian within-only, gaussian within+between, kmeans
  within+between (each on 256 random training images, ``seed`` = the run's
  seed), and the batch-norm twin with kaiming normal.
* Training: SGD with momentum 0.9, batch 128, ``--steps`` steps for every run,
  each learning rate of ``--lrs`` (the same grid for all), each seed of
  ``--seeds``. The init is computed once per (dataset, depth, init, seed) and
  copied for every learning rate.
* Reported per (dataset, depth, init): test accuracy at every learning rate
  (mean over seeds), the learning rate with the best mean *validation*
  accuracy, test accuracy there (mean, and half the range over seeds), the init
  time and the training time (seconds per run, same process).

Output: a markdown section written into ``bench/RESULTS.md`` (replacing the
previous ``## bench/train.py`` section), PNGs ``bench/train_<dataset>_d<depth>.png``
of the training-loss curves at each init's chosen learning rate, and all raw
numbers in ``bench/train_results.json``.

``--experiment`` picks another set of rows under the same protocol (seeds 0, 1, 2),
each written to its own section ``## bench/train.py --experiment NAME`` and
``bench/train_<name>_results.json`` (no figures); ``EXPERIMENTS`` says what each
compares:

* ``kmeans``: the library's k-means (full-rank regularized whitening, spherical)
  against the authors' construction (top-direction whitening, Euclidean mini-batch);
* ``lrn``: ``scale_mode="exact"`` against ``"approximate"`` on the paper's CaffeNet
  layout with LRN (width 1/4, images resized to 64 x 64);
* ``gelu``: the same two modes on plain GELU CNNs;
* ``batch-norm``: plain CNNs with batch norm: Part 1 alone (what Parts 1+2 do
  there by default) against Parts 1+2 with ``across_normalization=True``;
* ``beta``: Part 1's target mean 0 against the reference's 0.1.

Rows whose initial weights are bit-identical (an ``approximate`` mode that found
nothing to treat as homogeneous) share their training runs; the section says so.

Run from the repository root::

    pip install -c constraints.txt -e ".[bench]"
    python bench/train.py            # about 50 minutes on 2 CPU cores
    python bench/train.py --quick    # a smoke test in under 5 minutes, not for conclusions
    python bench/train.py --experiment kmeans
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

import magicinit
from cifar10 import load_cifar10
from magicinit.tools.baselines import BASELINES
from magicinit.tools.demo import evaluate, train
from magicinit.tools.nets import caffenet, plain_cnn
from magicinit.tools.plots import plot_curves
from magicinit.tools.readers import read_idx, resize_images
from results_file import BENCH, accuracies, best_learning_rate, commit, replace_section

try:
    import lsuv
except ImportError:  # the bench extra is not installed
    lsuv = None

DEFAULT_DATA_ROOT = BENCH.parent.parent / "shared" / "data"
IMAGE_SIZE = 16
CAFFENET_IMAGE_SIZE = 64  # the CaffeNet layout needs at least 63 pixels
CAFFENET_WIDTH = 0.25
INIT_SAMPLES = 256
BATCH_SIZE = 128
BATCH_NORM_TWIN = "batch norm + kaiming"


@dataclass
class Dataset:
    """Standardized images ``(N, C, H, W)`` and labels for training, validation and test."""

    name: str
    train: tuple[Tensor, Tensor]
    validation: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _split(
    name: str, images: Tensor, labels: Tensor, test: tuple[Tensor, Tensor], train_count: int, validation_count: int
) -> Dataset:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train_index = order[:train_count]
    validation_index = order[len(order) - validation_count :]
    mean, std = images[train_index].mean(), images[train_index].std()

    def standardize(x: Tensor) -> Tensor:
        return (x - mean) / std

    return Dataset(
        name,
        (standardize(images[train_index]), labels[train_index]),
        (standardize(images[validation_index]), labels[validation_index]),
        (standardize(test[0]), test[1]),
    )


def load_mnist(root: Path) -> Dataset:
    """MNIST from its idx files: 10 000 training images, 2 000 validation, the 10 000 test images."""
    folder = root / "mnist"

    def images(name: str) -> Tensor:
        return resize_images(read_idx(folder / name).unsqueeze(1).float() / 255.0, IMAGE_SIZE)

    def labels(name: str) -> Tensor:
        return read_idx(folder / name).long()

    test = images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz")
    return _split(
        "MNIST", images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"), test, 10_000, 2_000
    )


def load_usps(root: Path) -> Dataset:
    """USPS from ``usps.h5``: 6 291 training images, 1 000 validation, the 2 007 test images."""
    try:
        import h5py
    except ImportError:
        raise SystemExit("USPS needs h5py: pip install -c constraints.txt -e '.[bench]'") from None
    with h5py.File(root / "usps" / "usps.h5", "r") as file:

        def part(name: str) -> tuple[Tensor, Tensor]:
            data = torch.as_tensor(file[name]["data"][:], dtype=torch.float32).reshape(-1, 1, 16, 16)
            return data, torch.as_tensor(file[name]["target"][:], dtype=torch.long)

        train_images, train_labels = part("train")
        test = part("test")
    return _split("USPS", train_images, train_labels, test, len(train_images) - 1_000, 1_000)


DATASETS: dict[str, Callable[[Path], Dataset]] = {"MNIST": load_mnist, "USPS": load_usps, "CIFAR10": load_cifar10}


def _lsuv(model: nn.Module, images: Tensor, seed: int) -> None:
    if lsuv is None:
        raise SystemExit("the lsuv init needs the bench extra: pip install -c constraints.txt -e '.[bench]'")
    torch.manual_seed(seed)  # lsuv's orthogonal pre-init draws from the global generator
    lsuv.lsuv_with_singlebatch(model, images, verbose=False)


def _baseline(name: str) -> Callable[[nn.Module, Tensor, int], None]:
    return lambda model, images, seed: BASELINES[name](model)


def _magicinit(**options: object) -> Callable[[nn.Module, Tensor, int], None]:
    def init(model: nn.Module, images: Tensor, seed: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            magicinit.init_(model, images, seed=seed, **options)

    return init


InitFn = Callable[[nn.Module, Tensor, int], None]


@dataclass(frozen=True)
class Network:
    """A network family: ``build(depth, width)`` and the image size it takes."""

    build: Callable[[int, int], nn.Module]
    image_size: int = IMAGE_SIZE


def _caffenet(depth: int, width: int) -> nn.Module:
    """The CaffeNet layout at ``CAFFENET_WIDTH`` (its 8 affine layers are its depth; ``width`` is the plain nets')."""
    if depth != 8:
        raise SystemExit(f"caffenet has 8 affine layers; --depths {depth} does not apply")
    return caffenet(in_channels=1, classes=10, width=CAFFENET_WIDTH)


NETWORKS: dict[str, Network] = {
    "plain": Network(lambda depth, width: plain_cnn(depth, width, in_channels=1, classes=10)),
    "plain + batch norm": Network(
        lambda depth, width: plain_cnn(depth, width, in_channels=1, classes=10, batch_norm=True)
    ),
    "plain GELU": Network(lambda depth, width: plain_cnn(depth, width, in_channels=1, classes=10, activation=nn.GELU)),
    "caffenet (LRN)": Network(_caffenet, CAFFENET_IMAGE_SIZE),
}


@dataclass(frozen=True)
class Row:
    """One row of a table: an init applied to a network."""

    init: InitFn
    network: str = "plain"


@dataclass(frozen=True)
class Experiment:
    """A set of rows trained under one protocol, written to its own section of RESULTS.md."""

    heading: str
    summary: str
    rows: dict[str, Row]
    depths: tuple[int, ...] = (10, 20)
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = ("MNIST", "USPS")


FROM_SCRATCH = Experiment(
    "## bench/train.py",
    "Plain ReLU CNNs (no batch norm unless said) from scratch, every init.",
    {
        "torch default": Row(_baseline("default")),
        "xavier normal": Row(_baseline("xavier")),
        "kaiming normal": Row(_baseline("kaiming")),
        "orthogonal": Row(_baseline("orthogonal")),
        "lsuv": Row(_lsuv),
        "magicinit within (gaussian)": Row(_magicinit(between=False)),
        "magicinit (gaussian)": Row(_magicinit()),
        "magicinit (kmeans)": Row(_magicinit(sampler="kmeans")),
        BATCH_NORM_TWIN: Row(_baseline("kaiming"), "plain + batch norm"),
    },
    seeds=(0, 1),
)

EXPERIMENTS: dict[str, Experiment] = {
    "from-scratch": FROM_SCRATCH,
    "kmeans": Experiment(
        "## bench/train.py --experiment kmeans",
        "k-means as this library builds it (`kmeans-full`: whitening at full rank with 1 % of the mean "
        "eigenvalue added, spherical k-means) against the authors' reference construction (`kmeans-reference`: "
        "whitening onto the top directions only, as many as the layer has filters, negligible epsilon, "
        "Euclidean mini-batch k-means). Both then Parts 1 and 2; plain ReLU CNNs.",
        {
            "magicinit (kmeans-full)": Row(_magicinit(sampler="kmeans-full")),
            "magicinit (kmeans-reference)": Row(_magicinit(sampler="kmeans-reference")),
        },
    ),
    "lrn": Experiment(
        "## bench/train.py --experiment lrn",
        f"Part 2's scale modes on the paper's CaffeNet layout (`magicinit.tools.nets.caffenet`, width "
        f"{CAFFENET_WIDTH:g}, LRN after conv1 and conv2, grouped convolutions, dropout) on images resized to "
        f"{CAFFENET_IMAGE_SIZE} x {CAFFENET_IMAGE_SIZE}. In `exact` mode the LRNs fix the scales around them; "
        "`approximate` treats them as homogeneous where they are on the init data. Kaiming normal as the "
        "yardstick.",
        {
            "kaiming normal": Row(_baseline("kaiming"), "caffenet (LRN)"),
            "magicinit, scale_mode exact": Row(_magicinit(scale_mode="exact"), "caffenet (LRN)"),
            "magicinit, scale_mode approximate": Row(_magicinit(scale_mode="approximate"), "caffenet (LRN)"),
        },
        depths=(8,),
        seeds=(0, 1),  # a CaffeNet run costs about 5 plain depth-10 runs
        datasets=("MNIST",),  # CPU budget: one dataset for this ablation
    ),
    "gelu": Experiment(
        "## bench/train.py --experiment gelu",
        "Part 2's scale modes on plain CNNs with GELU instead of ReLU. GELU is not homogeneous, so `exact` "
        "mode can rescale nothing across it; `approximate` rescales across an operation only where it is "
        "homogeneous on the init data within `scale_tolerance` (0.05 by default; the last row loosens it to "
        "0.5). Rows whose initial weights are bit-identical share their training runs.",
        {
            "kaiming normal": Row(_baseline("kaiming"), "plain GELU"),
            "magicinit, scale_mode exact": Row(_magicinit(scale_mode="exact"), "plain GELU"),
            "magicinit, scale_mode approximate": Row(_magicinit(scale_mode="approximate"), "plain GELU"),
            "magicinit, approximate, tolerance 0.5": Row(
                _magicinit(scale_mode="approximate", scale_tolerance=0.5), "plain GELU"
            ),
        },
        depths=(20,),
        datasets=("MNIST",),  # CPU budget: one dataset for this ablation
    ),
    "batch-norm": Experiment(
        "## bench/train.py --experiment batch-norm",
        "Plain CNNs with batch norm after every convolution. With `across_normalization=True`, Part 2 "
        "rescales a convolution before a batch norm and scales the norm's eps (and running statistics) with it. "
        "Without it (the default), a batch norm fixes the scales around it and Part 2 can rescale nothing in "
        "these nets, which is Part 1 alone (second row).",
        {
            "kaiming normal": Row(_baseline("kaiming"), "plain + batch norm"),
            "magicinit Part 1 only": Row(_magicinit(between=False), "plain + batch norm"),
            "magicinit Parts 1+2, across_normalization=True": Row(
                _magicinit(across_normalization=True), "plain + batch norm"
            ),
        },
        depths=(20,),
        datasets=("MNIST",),  # CPU budget: one dataset for this ablation
    ),
    "beta": Experiment(
        "## bench/train.py --experiment beta",
        "Part 1's target channel mean `beta`: 0 (this library's default) against 0.1 (the reference's `-b` "
        "default). Gaussian sampler, Parts 1 and 2, plain ReLU CNNs. (The number of init samples is measured "
        "by bench/samples.py.)",
        {
            "magicinit, beta 0": Row(_magicinit(beta=0.0)),
            "magicinit, beta 0.1": Row(_magicinit(beta=0.1)),
        },
        datasets=("MNIST",),  # CPU budget: one dataset for this ablation
    ),
}


@dataclass
class Run:
    """One training run and its results."""

    dataset: str
    depth: int
    init: str
    seed: int
    learning_rate: float
    init_seconds: float
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    validation_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    diverged: bool = False
    shared_with: str = ""  # the row whose bit-identical initial weights this run's training came from


def _digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer: rows whose initial weights are bit-identical train alike."""
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def _at_size(data: Dataset, size: int) -> Dataset:
    """``data`` with its images resized to ``size`` x ``size`` (bilinear, antialiased)."""
    if size == IMAGE_SIZE:
        return data
    return Dataset(
        data.name,
        *((resize_images(images, size), labels) for images, labels in (data.train, data.validation, data.test)),
    )


def run_all(args: argparse.Namespace) -> list[Run]:
    torch.set_num_threads(args.threads)
    # Denormal floats (tiny activations and gradients, as under kaiming init at depth 20) make
    # CPU training up to 9x slower; flushing them to zero changes no result that matters here.
    torch.set_flush_denormal(True)
    experiment = EXPERIMENTS[args.experiment]
    runs: list[Run] = []
    done: dict[tuple[str, int, int, float, str], Run] = {}  # (dataset, depth, seed, lr, weights) -> run
    started = time.perf_counter()
    total = len(args.datasets) * len(args.depths) * len(args.inits) * len(args.seeds) * len(args.lrs)
    for dataset_name in args.datasets:
        loaded = DATASETS[dataset_name](args.data_root)
        resized: dict[int, Dataset] = {}  # image size -> the dataset at that size, resized once
        print(
            f"{loaded.name}: {len(loaded.train[0])} train, {len(loaded.validation[0])} validation, "
            f"{len(loaded.test[0])} test images",
            flush=True,
        )
        for depth in args.depths:
            for init_name in args.inits:
                row = experiment.rows[init_name]
                network = NETWORKS[row.network]
                if network.image_size not in resized:
                    resized[network.image_size] = _at_size(loaded, network.image_size)
                data = resized[network.image_size]
                for seed in args.seeds:
                    torch.manual_seed(seed)
                    model = network.build(depth, args.width)
                    pick = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))
                    init_images = data.train[0][pick[:INIT_SAMPLES]]
                    start = time.perf_counter()
                    row.init(model, init_images, seed)
                    init_seconds = time.perf_counter() - start
                    weights = _digest(model)
                    for learning_rate in args.lrs:
                        key = (data.name, depth, seed, learning_rate, weights)
                        if key in done:  # the same initial weights as an earlier row: the same training
                            run = replace(
                                done[key], init=init_name, init_seconds=init_seconds, shared_with=done[key].init
                            )
                        else:
                            run = Run(data.name, depth, init_name, seed, learning_rate, init_seconds)
                            trained = copy.deepcopy(model)
                            start = time.perf_counter()
                            run.losses = train(
                                trained,
                                *data.train,
                                steps=args.steps,
                                batch_size=BATCH_SIZE,
                                learning_rate=learning_rate,
                                seed=seed,
                            )
                            run.train_seconds = time.perf_counter() - start
                            run.diverged = not math.isfinite(run.losses[-1])
                            if not run.diverged:
                                run.validation_accuracy = evaluate(trained, *data.validation)[0]
                                run.test_accuracy = evaluate(trained, *data.test)[0]
                            done[key] = run
                        runs.append(run)
                        elapsed = time.perf_counter() - started
                        shared = f" (weights of '{run.shared_with}')" if run.shared_with else ""
                        print(
                            f"[{len(runs)}/{total} {elapsed / 60:.1f} min] {data.name} depth {depth} "
                            f"{init_name:<28} seed {seed} lr {learning_rate:<6g} "
                            f"{'diverged' if run.diverged else f'test {100 * run.test_accuracy:.2f}%'} "
                            f"(init {init_seconds:.2f} s, train {run.train_seconds:.1f} s){shared}",
                            flush=True,
                        )
    return runs


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _select(runs: list[Run], dataset: str, depth: int, init: str, lr: float | None = None) -> list[Run]:
    return [
        r
        for r in runs
        if (r.dataset, r.depth, r.init) == (dataset, depth, init) and (lr is None or r.learning_rate == lr)
    ]


def _percent(values: list[float], spread: bool) -> str:
    text = f"{100 * _mean(values):.2f}"
    if spread and len(values) > 1:
        text += f" ± {50 * (max(values) - min(values)):.2f}"
    return text


def tables(runs: list[Run], args: argparse.Namespace) -> str:
    lines = []
    for dataset in args.datasets:
        name = dataset
        for depth in args.depths:
            lines += [f"### {name}, depth {depth}", ""]
            header = [
                "init",
                *(f"lr {lr:g}" for lr in args.lrs),
                "chosen lr",
                "test acc % (± half range)",
                "init s",
                "train s / run",
            ]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            best_mean, rows = {}, []
            for init in args.inits:
                chosen = best_learning_rate(args.lrs, lambda lr: _select(runs, name, depth, init, lr))
                at_best = accuracies(_select(runs, name, depth, init, chosen), "test_accuracy")
                best_mean[init] = _mean(at_best)
                cells = []
                for lr in args.lrs:
                    selected = _select(runs, name, depth, init, lr)
                    diverged = sum(r.diverged for r in selected)
                    cells.append(
                        _percent(accuracies(selected, "test_accuracy"), False)
                        + (f" ({diverged} div.)" if diverged else "")
                    )
                all_runs = _select(runs, name, depth, init)
                rows.append(
                    [
                        init,
                        *cells,
                        f"{chosen:g}",
                        _percent(at_best, True),
                        f"{_mean([r.init_seconds for r in all_runs]):.2f}",
                        f"{_mean([r.train_seconds for r in all_runs]):.1f}",
                    ]
                )
            top = max(best_mean.values())
            for row, init in zip(rows, args.inits):
                if best_mean[init] == top:
                    row[len(args.lrs) + 2] = f"**{row[len(args.lrs) + 2]}**"
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_figures(runs: list[Run], args: argparse.Namespace) -> list[Path]:
    paths = []
    for dataset in args.datasets:
        for depth in args.depths:
            curves = {}
            for init in args.inits:
                chosen = best_learning_rate(args.lrs, lambda lr: _select(runs, dataset, depth, init, lr))
                seed_runs = _select(runs, dataset, depth, init, chosen)
                length = min(len(r.losses) for r in seed_runs)
                mean_curve = [_mean([r.losses[i] for r in seed_runs]) for i in range(length)]
                curves[f"{init} (lr {chosen:g})"] = _smooth(mean_curve)
            path = args.out_dir / f"train_{dataset.lower()}_d{depth}.png"
            plot_curves(
                {f"{dataset}, depth {depth}: training loss (mean over seeds, moving average of 20)": curves}, path
            )
            paths.append(path)
    return paths


def write_raw(runs: list[Run], args: argparse.Namespace) -> Path:
    """Every run's numbers (losses to 4 significant digits) as JSON, one run per line; returns the file."""
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    lines = []
    for run in runs:
        record = asdict(run)
        record["losses"] = [float(f"{loss:.4g}") for loss in run.losses]
        lines.append(json.dumps(record))
    text = '{"settings": ' + json.dumps(settings) + ',\n"runs": [\n' + ",\n".join(lines) + "\n]}\n"
    suffix = "" if args.experiment == "from-scratch" else f"_{args.experiment.replace('-', '_')}"
    path = args.out_dir / f"train{suffix}_results.json"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiment",
        default="from-scratch",
        choices=list(EXPERIMENTS),
        help="which set of rows (default from-scratch; see the module docstring)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="folder with mnist/ and usps/ (default ../shared/data)",
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="default: the experiment's")
    parser.add_argument("--depths", type=int, nargs="+", help="affine layers (default: the experiment's)")
    parser.add_argument("--inits", nargs="+", metavar="ROW", help="rows to run (default: all of the experiment's)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the experiment's (0 1 2; from-scratch 0 1)")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per run (batch 128)")
    parser.add_argument("--width", type=int, default=16, help="channels of every convolution of the plain nets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one seed, the middle learning rate, 40 steps (not for conclusions)",
    )
    parser.add_argument("--out-dir", type=Path, default=BENCH, help="where the PNGs and the JSON go")
    parser.add_argument(
        "--results",
        type=Path,
        default=BENCH / "RESULTS.md",
        help="the markdown file whose section of this experiment is replaced",
    )
    args = parser.parse_args()
    experiment = EXPERIMENTS[args.experiment]
    args.depths = args.depths or list(experiment.depths)
    args.datasets = args.datasets or list(experiment.datasets)
    args.seeds = args.seeds or list(experiment.seeds)
    args.inits = args.inits or list(experiment.rows)
    unknown = [name for name in args.inits if name not in experiment.rows]
    if unknown:
        parser.error(f"--inits {unknown}: not rows of --experiment {args.experiment}; it has {list(experiment.rows)}")
    if not (args.data_root / "mnist").exists():
        parser.error(f"--data-root {args.data_root}: no mnist/ there (see ../shared/data/SOURCES.md)")
    if args.quick:
        args.seeds, args.lrs, args.steps = args.seeds[:1], [args.lrs[len(args.lrs) // 2]], 40
    args.out_dir.mkdir(parents=True, exist_ok=True)
    library_commit = commit()  # the code this run loads (the checkout may move on while it runs)
    started = time.perf_counter()
    runs = run_all(args)
    minutes = (time.perf_counter() - started) / 60
    body = tables(runs, args)
    figures = write_figures(runs, args) if args.experiment == "from-scratch" else []
    command = (
        "python bench/train.py"
        + (f" --experiment {args.experiment}" if args.experiment != "from-scratch" else "")
        + (" --quick" if args.quick else "")
    )
    shared = sorted({(run.init, run.shared_with) for run in runs if run.shared_with})
    section = (
        f"{experiment.heading}\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at "
        f"commit {library_commit}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, CPU, {minutes:.0f} minutes:\n\n"
        f'```\npip install -c constraints.txt -e ".[bench]"\n{command}\n```\n\n'
        f"{experiment.summary}\n\n"
        f"Width {args.width} (plain nets), {args.steps} SGD steps (momentum 0.9, batch {BATCH_SIZE}) per run, seeds "
        f"{', '.join(map(str, args.seeds))}. Test accuracy (%) is the mean over seeds; a diverged run counts as "
        "10 %. The chosen learning rate has the best mean validation accuracy (held-out training images); the best "
        "mean test accuracy there is in bold. Init s: the initialization's time; train s: one training run's.\n\n"
        + "".join(
            f"Rows '{a}' and '{b}' started from bit-identical weights (at least for some seeds) and share "
            "those runs.\n\n"
            for a, b in shared
        )
        + body
        + "\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in figures)
        + "\n"
    )
    replace_section(args.results, experiment.heading, section)
    raw = write_raw(runs, args)
    print()
    print(body)
    print(f"wrote {args.results}, {', '.join(str(p) for p in [*figures, raw])}")


if __name__ == "__main__":
    main()
