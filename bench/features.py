"""The paper's features claim on CIFAR-10: how good are an *untrained* CaffeNet's conv features under a linear probe?

Krähenbühl et al. (ICLR 2016) report that a k-means-initialized CaffeNet with no training gives 24.5 % ImageNet
top-1 from linear classifiers on its features. This script measures the analogue on CIFAR-10.

Protocol (all defaults; see ``--help``):

* Data: CIFAR-10 via ``bench/cifar10.py`` ``load_cifar10`` (pixels standardized with one mean and one std over
  the 45 000 training images; ``--data-root``, default ``../shared/data``). The probe is trained on the first
  10 000 of the (already shuffled, seed 0) training images, its L2 strength is chosen on the first 2 000 of the
  5 000 held-out validation images, and it is tested on a fixed random 5 000 of the 10 000 test images (seed 0;
  half, to keep the run near 20 minutes on one shared core). The init data are the last 256
  training images (disjoint from the probe's training images; no labels are used).
* Network: ``magicinit.tools.nets.caffenet(3, 10, width=0.25, small_images=True, hidden=64)``: conv1 5x5
  stride 1 (24 channels), LRN, conv2 (64, 2 groups), LRN, conv3 (96), conv4 (96, 2 groups), conv5 (64,
  2 groups), max-pools 32 -> 16 -> 8 -> 4. Width 1/4 keeps the whole run near 20 minutes on one thread.
  ``torch.manual_seed(seed)`` before building it.
* Initializations, seeds 0, 1, 2: ``random`` = kaiming normal (fan-in, relu) with zero biases
  (``magicinit.tools.baselines.BASELINES["kaiming"]``, drawn after ``torch.manual_seed(seed)``); magicinit
  ``gaussian``, ``kmeans`` (the authors' construction) and ``pca``, each ``magicinit.init_(net, init_images,
  sampler=..., seed=seed)`` with Parts 1 and 2 (the defaults). ``--inits`` adds ``zca`` and
  ``kmeans-part1`` (k-means with ``between=False``: Part 1 only).
* Features, one layer at a time (the paper reports a number per layer; so does this): conv1..conv5 after their
  ReLU, and after the max-pool where one follows (conv1, conv2, conv5; conv1 and conv2 before the LRN), each
  channel average-pooled to a 2 x 2 grid and flattened (conv1 96, conv2 256, conv3 384, conv4 384, conv5 256
  features), computed in float32 in eval mode. Each feature is standardized with the probe-training images'
  mean and std.
* Probe: multinomial logistic regression (weights and biases) minimizing mean cross-entropy +
  ``l2 / 2 * ||W||^2``, full batch, torch LBFGS (strong Wolfe line search, at most 200 iterations), for each
  ``l2`` of 1e-4, 1e-3, 1e-2, 1e-1 (each warm-started from the previous, stronger one). The ``l2`` with the best
  validation accuracy is used; its test accuracy is reported.
* Reported: per init and layer, test accuracy (mean over seeds, and half the range); the best layer per init
  (chosen by mean *validation* accuracy) and its test accuracy; the init time (seconds, same process); the gap
  between ``kmeans`` and ``random`` at their best layers, next to the paper's figure.

Output: a markdown section ``## bench/features.py`` in ``bench/RESULTS.md`` and every raw number (per init, seed
and layer: validation accuracy at every ``l2``, the chosen ``l2``, train and test accuracy; magicinit's report
notes and warnings) in ``bench/features_results.json``. ``--quick`` (a smoke test in under a minute on
tiny subsets, not for conclusions) writes its JSON to the temporary directory and leaves ``RESULTS.md`` alone.
``--estimate`` times one init and the feature extraction of 1 000 images and extrapolates the full run.

Run from the repository root, on one thread::

    OMP_NUM_THREADS=1 python bench/features.py              # about 20 minutes
    OMP_NUM_THREADS=1 python bench/features.py --estimate
    OMP_NUM_THREADS=1 python bench/features.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
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
import torch.nn.functional as F
from torch import Tensor, nn

import magicinit
from magicinit.tools.baselines import BASELINES
from magicinit.tools.nets import caffenet

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from results_file import commit, replace_section  # noqa: E402

HEADING = "## bench/features.py"
RESULTS_JSON = BENCH / "features_results.json"
PAPER_KMEANS_TOP1 = 24.5  # ImageNet top-1 (%), linear classifiers on the k-means-initialized CaffeNet's features


@dataclass(frozen=True)
class Config:
    """One run's sizes."""

    width: float = 0.25
    hidden: int = 64
    init_images: int = 256
    probe_train: int = 10_000
    validation: int = 2_000
    test: int = 5_000
    grid: int = 2
    l2s: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)  # strongest first: each fit warm-starts the next
    max_iter: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    batch: int = 250


QUICK = Config(
    width=0.125, init_images=64, probe_train=600, validation=300, test=600, l2s=(1e-2, 1e-3), max_iter=50, seeds=(0,)
)


# ---------------------------------------------------------------- initializations


def _kaiming(net: nn.Module, images: Tensor, seed: int) -> magicinit.Report | None:
    torch.manual_seed(seed)  # BASELINES draw from the global generator
    BASELINES["kaiming"](net)
    return None


def _magicinit(sampler: str, **options: Any) -> Callable[[nn.Module, Tensor, int], magicinit.Report]:
    def init(net: nn.Module, images: Tensor, seed: int) -> magicinit.Report:
        return magicinit.init_(net, images, sampler=sampler, seed=seed, **options)

    return init


INITS: dict[str, Callable[[nn.Module, Tensor, int], magicinit.Report | None]] = {
    "random": _kaiming,
    "gaussian": _magicinit("gaussian"),
    "kmeans": _magicinit("kmeans"),
    "pca": _magicinit("pca"),
    "zca": _magicinit("zca"),
    "kmeans-part1": _magicinit("kmeans", between=False),
}
DEFAULT_INITS = ("random", "gaussian", "kmeans", "pca")


# ---------------------------------------------------------------- features


def tap_points(net: nn.Sequential) -> dict[str, int]:
    """For each convolution of ``net`` (``conv1``, ``conv2``, ...), the index of the module whose output is its
    feature: its ReLU, or the max-pool right after that ReLU."""
    taps: dict[str, int] = {}
    modules = list(net)
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        at = index
        if at + 1 < len(modules) and isinstance(modules[at + 1], nn.ReLU):
            at += 1
        if at + 1 < len(modules) and isinstance(modules[at + 1], nn.MaxPool2d):
            at += 1
        taps[f"conv{len(taps) + 1}"] = at
    return taps


def extract_features(net: nn.Sequential, images: Tensor, grid: int = 2, batch: int = 250) -> dict[str, Tensor]:
    """Each conv layer's feature (see ``tap_points``) on ``images``, every channel average-pooled to ``grid`` x
    ``grid`` and flattened: ``{layer: (N, channels * grid * grid)}``, float32."""
    taps = tap_points(net)
    last = max(taps.values())
    was_training = net.training
    net.eval()
    # channels_last runs the max-pools and LRNs about 1.7 times faster on CPU
    body = nn.Sequential(*list(net)[: last + 1]).to(memory_format=torch.channels_last)
    parts: dict[str, list[Tensor]] = {name: [] for name in taps}
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            h = images[start : start + batch].float().contiguous(memory_format=torch.channels_last)
            for index, module in enumerate(body):
                h = module(h)
                for name, at in taps.items():
                    if at == index:
                        parts[name].append(F.adaptive_avg_pool2d(h, grid).flatten(1).contiguous())
    net.to(memory_format=torch.contiguous_format)
    net.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """``train`` and ``others`` standardized with ``train``'s per-feature mean and std (constant features: 1)."""
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


# ---------------------------------------------------------------- linear probe


@dataclass
class Probe:
    weight: Tensor
    bias: Tensor

    def predict(self, x: Tensor) -> Tensor:
        return (x @ self.weight.T + self.bias).argmax(1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return (self.predict(x) == y).double().mean().item()


def fit_probe(x: Tensor, y: Tensor, classes: int, l2: float, max_iter: int = 200, start: Probe | None = None) -> Probe:
    """Multinomial logistic regression: mean cross-entropy + ``l2 / 2 * ||W||^2`` by full-batch LBFGS."""
    weight = (start.weight.clone() if start else torch.zeros(classes, x.shape[1])).requires_grad_()
    bias = (start.bias.clone() if start else torch.zeros(classes)).requires_grad_()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Probe(weight.detach(), bias.detach())


@dataclass
class LayerResult:
    features: int
    validation_by_l2: dict[str, float] = field(default_factory=dict)
    l2: float = 0.0
    train_accuracy: float = 0.0
    validation_accuracy: float = 0.0
    test_accuracy: float = 0.0
    fit_seconds: float = 0.0


def probe_layer(
    train: tuple[Tensor, Tensor],
    validation: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    l2s: Sequence[float],
    max_iter: int = 200,
) -> LayerResult:
    """Standardize the features, fit a probe at every ``l2`` (strongest first, warm-started), keep the one with
    the best validation accuracy and report its train, validation and test accuracy."""
    started = time.perf_counter()
    x_train, x_validation, x_test = standardize(train[0], validation[0], test[0])
    classes = int(max(train[1].max(), validation[1].max(), test[1].max())) + 1
    result = LayerResult(features=x_train.shape[1])
    best: tuple[float, float, Probe] | None = None
    previous: Probe | None = None
    for l2 in l2s:
        probe = fit_probe(x_train, train[1], classes, l2, max_iter, previous)
        previous = probe
        accuracy = probe.accuracy(x_validation, validation[1])
        result.validation_by_l2[f"{l2:g}"] = accuracy
        if best is None or accuracy > best[0]:
            best = (accuracy, l2, probe)
    assert best is not None
    result.validation_accuracy, result.l2, probe = best
    result.train_accuracy = probe.accuracy(x_train, train[1])
    result.test_accuracy = probe.accuracy(x_test, test[1])
    result.fit_seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- the experiment


@dataclass
class Run:
    init: str
    seed: int
    init_seconds: float
    extract_seconds: float
    layers: dict[str, LayerResult]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Data:
    init_images: Tensor
    train: tuple[Tensor, Tensor]
    validation: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def select_data(dataset: Any, config: Config) -> Data:
    """The fixed subsets of a ``bench/train.py`` ``Dataset`` (see the protocol)."""
    images, labels = dataset.train
    if config.probe_train + config.init_images > len(images):
        raise SystemExit("not enough training images for the probe and the init data")
    return Data(
        images[len(images) - config.init_images :],
        (images[: config.probe_train], labels[: config.probe_train]),
        (dataset.validation[0][: config.validation], dataset.validation[1][: config.validation]),
        _fixed_subset(dataset.test, config.test),
    )


def _fixed_subset(split: tuple[Tensor, Tensor], count: int) -> tuple[Tensor, Tensor]:
    """All of ``split``, or a fixed random ``count`` of it (the test images are ordered by label)."""
    if count >= len(split[0]):
        return split
    index = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(0))[:count]
    return split[0][index], split[1][index]


def build_net(config: Config, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return caffenet(3, 10, width=config.width, small_images=True, hidden=config.hidden)


def _report_notes(report: magicinit.Report | None) -> list[str]:
    if report is None:
        return []
    notes = list(report.notes)
    for layer in report.layers:
        notes += [f"{layer.name}: {note}" for note in layer.notes]
    return notes


def run_one(init: str, seed: int, data: Data, config: Config) -> Run:
    net = build_net(config, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        report = INITS[init](net, data.init_images, seed)
        init_seconds = time.perf_counter() - started
    started = time.perf_counter()
    splits = [extract_features(net, x, config.grid, config.batch) for x in (data.train[0], data.validation[0])]
    splits.append(extract_features(net, data.test[0], config.grid, config.batch))
    extract_seconds = time.perf_counter() - started
    layers = {
        name: probe_layer(
            (splits[0][name], data.train[1]),
            (splits[1][name], data.validation[1]),
            (splits[2][name], data.test[1]),
            config.l2s,
            config.max_iter,
        )
        for name in splits[0]
    }
    return Run(
        init,
        seed,
        init_seconds,
        extract_seconds,
        layers,
        _report_notes(report),
        sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    )


def _mean_half_range(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def summarize(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per init: per layer the test accuracies over seeds, the best layer by mean validation accuracy, and the
    mean init seconds."""
    summary: dict[str, dict[str, Any]] = {}
    for init in dict.fromkeys(run.init for run in runs):
        mine = sorted((run for run in runs if run.init == init), key=lambda run: run.seed)
        layers = list(mine[0].layers)
        test = {layer: [run.layers[layer].test_accuracy for run in mine] for layer in layers}
        validation = {
            layer: statistics.fmean(run.layers[layer].validation_accuracy for run in mine) for layer in layers
        }
        best = max(layers, key=lambda layer: validation[layer])
        summary[init] = {
            "test": test,
            "best_layer": best,
            "best_test": test[best],
            "init_seconds": statistics.fmean(run.init_seconds for run in mine),
            "extract_seconds": statistics.fmean(run.extract_seconds for run in mine),
            "fit_seconds": statistics.fmean(sum(r.fit_seconds for r in run.layers.values()) for run in mine),
        }
    return summary


def _pct(values: Sequence[float]) -> str:
    mean, half = _mean_half_range(values)
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def render(summary: dict[str, dict[str, Any]], config: Config, command: str, total_seconds: float) -> str:
    layers = list(next(iter(summary.values()))["test"])
    header = ["init", *layers, "best layer (by validation)", "init s", "extract s", "probe fits s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for init, entry in summary.items():
        cells = [init, *(_pct(entry["test"][layer]) for layer in layers)]
        cells += [
            f"{entry['best_layer']}: {_pct(entry['best_test'])}",
            f"{entry['init_seconds']:.1f}",
            f"{entry['extract_seconds']:.1f}",
            f"{entry['fit_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    comparison = gap_line(summary)
    date = datetime.date.today().isoformat()
    return (
        f"{HEADING}\n\n"
        "Linear probes on the conv features of an *untrained* 32-px CaffeNet (width "
        f"{config.width:g}) on CIFAR-10: test accuracy (%) over the "
        f"seeds {', '.join(map(str, config.seeds))} (mean ± half the range), per layer (each channel "
        f"average-pooled to {config.grid} x {config.grid}); probe trained on {config.probe_train} training images, "
        f"L2 chosen on {config.validation} validation images, tested on a fixed "
        f"random {config.test} of the 10 000 test images; init on "
        f"{config.init_images} training images. Protocol: the docstring of `bench/features.py`. Chance is 10 %.\n\n"
        f"{table}\n\n{comparison}\n\n"
        f"Command: `{command}`; {torch.get_num_threads()} thread, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, commit {commit()}, {date}; "
        f"{total_seconds / 60:.1f} minutes in all. Raw numbers: `bench/features_results.json`.\n"
    )


def gap_line(summary: dict[str, dict[str, Any]]) -> str:
    if "kmeans" not in summary or "random" not in summary:
        return "(no kmeans-versus-random comparison: both rows are needed)"
    kmeans, random = summary["kmeans"], summary["random"]
    gap = 100 * (statistics.fmean(kmeans["best_test"]) - statistics.fmean(random["best_test"]))
    return (
        f"Gap, best layer each: kmeans {_pct(kmeans['best_test'])} ({kmeans['best_layer']}) against random "
        f"(kaiming normal) {_pct(random['best_test'])} ({random['best_layer']}): {gap:+.1f} points on CIFAR-10. "
        f"The paper (as quoted in `../shared/docs/METHOD.md`) gives {PAPER_KMEANS_TOP1} % ImageNet top-1 for "
        "linear classifiers on the k-means-initialized CaffeNet's features; its random-Gaussian figure is not "
        "quoted there, so the paper's gap cannot be stated from the shared docs."
    )


# ---------------------------------------------------------------- command line


def _seconds(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def estimate(data: Data, config: Config, inits: Sequence[str]) -> None:
    net = build_net(config, 0)
    per_init = {
        init: _seconds(lambda init=init: INITS[init](build_net(config, 0), data.init_images, 0))  # type: ignore[misc]
        for init in inits
    }
    sample = data.train[0][:1000]
    per_image = _seconds(lambda: extract_features(net, sample, config.grid, config.batch)) / len(sample)
    images = config.probe_train + config.validation + config.test
    feats = extract_features(net, sample, config.grid, config.batch)
    fit = _seconds(
        lambda: [fit_probe(standardize(f)[0], data.train[1][:1000], 10, 1e-3, config.max_iter) for f in feats.values()]
    )
    fits = fit * config.probe_train / len(sample) * len(config.l2s)
    total = len(config.seeds) * (sum(per_init.values()) + len(inits) * (per_image * images + fits))
    print(f"init seconds (seed 0): {', '.join(f'{k} {v:.1f}' for k, v in per_init.items())}")
    print(f"extraction: {1000 * per_image:.2f} ms per image, {per_image * images:.0f} s per net ({images} images)")
    print(f"probe fits, 5 layers on 1 000 images, one l2: {fit:.1f} s")
    print(f"estimated total: {total / 60:.1f} minutes (fits scaled by the image count and the l2 grid, no warm start)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=BENCH.parent.parent / "shared" / "data")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--inits", nargs="+", choices=list(INITS), default=list(DEFAULT_INITS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke test in under a minute, not for conclusions")
    parser.add_argument("--estimate", action="store_true", help="time one init and the extraction, extrapolate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = QUICK if args.quick else Config()
    if args.seeds is not None:
        config = Config(**{**asdict(config), "seeds": tuple(args.seeds)})
    if args.width is not None:
        config = Config(**{**asdict(config), "width": args.width})
    from cifar10 import load_cifar10

    started = time.perf_counter()
    data = select_data(load_cifar10(args.data_root, args.cache_dir), config)
    if args.estimate:
        estimate(data, config, args.inits)
        return
    runs = []
    for seed in config.seeds:
        for init in args.inits:
            run = run_one(init, seed, data, config)
            runs.append(run)
            accuracies = ", ".join(f"{k} {100 * v.test_accuracy:.1f}" for k, v in run.layers.items())
            print(
                f"{init} seed {seed}: init {run.init_seconds:.1f} s, extract {run.extract_seconds:.1f} s; "
                f"test % {accuracies}",
                flush=True,
            )
            for line in run.warnings + run.notes:
                print(f"    {line}", flush=True)
    total = time.perf_counter() - started
    summary = summarize(runs)
    command = "OMP_NUM_THREADS=1 python bench/features.py" + "".join(
        f" {arg}" for arg in sys.argv[1:] if not arg.startswith("--data-root") and not arg.startswith("--cache")
    )
    section = render(summary, config, command, total)
    print(section)
    payload = {
        "config": asdict(config),
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "total_seconds": total,
        "summary": summary,
        "runs": [asdict(run) for run in runs],
    }
    output = Path(tempfile.gettempdir()) / "magicinit-features-quick.json" if args.quick else RESULTS_JSON
    output.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {output}")
    if not args.quick:
        replace_section(BENCH / "RESULTS.md", HEADING, section)
        print(f"wrote the {HEADING} section of {BENCH / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
