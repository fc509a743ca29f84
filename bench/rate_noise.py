"""Why the change rates need so many noise draws on some models, and what variance reduction could save.

Part 2 measures a layer's change rate from ``||dL/dW||^2`` under a random linear loss ``L = eta . f(x)``
(Rademacher ``eta`` over the model's outputs). For one sample that is the quadratic form ``eta^T A eta`` of
the layer's output-space Gram matrix ``A = J J^T`` (``J``: the Jacobian of the outputs with respect to the
layer's weight), whose expectation is ``tr(A)`` and whose variance under Rademacher noise is
``2 (||A||_F^2 - sum_i A_ii^2)``. This script computes every layer's ``A`` exactly, for single samples, from
one backward pass per output (the model after Part 1, as Part 2 sees it), and tabulates the per-draw
relative standard deviation ``std / tr(A)``:

* ``plain``: the library's estimator (one Rademacher draw);
* ``deflated k``: Hutch++-style deflation with the sample's own top ``k`` output directions (of the sum of
  every layer's ``A / tr(A)``): ``tr(Q^T A Q)`` exactly (``k`` backward passes per sample) and the draws on
  the rest only (noise projected off ``Q``); its per-draw std is that of the rest;
* ``other sample's k``: the same with the directions of another sample (a subspace found once and shared by
  every sample would cost nothing per sample; does it carry over?).

The draws the 2 % precision of ``log C`` needs per sample follow as ``(0.5 * std / 0.02)^2`` (``log C``
is half ``log ||dL/dW||^2``), to compare with the rounds ``bench/zoo.py --samples 64`` spends. An
independent check: the worst layer's per-draw std from real draws (``--draws`` backward passes of
``eta . f(x)``), beside the one the formula gives.

``--part shares`` measures the other half of the cost: how unequally the samples weigh (every sample's
mean squared gradient norm of every layer as a share of the layer's total, from a few Rademacher draws per
sample), in a section of its own.

Layers whose Jacobian over all outputs would take more than ``--max-jacobian-gb`` are left out (the final
classifiers: their ``A`` is a multiple of the identity on a 1 000-class output, which a Rademacher draw
measures exactly). Output: a table per model on stdout and the section ``## bench/rate_noise.py`` of
``bench/RESULTS.md``. Run from the repository root (about 10 minutes a model on one core)::

    pip install -c constraints.txt -e ".[test,bench]"
    python bench/rate_noise.py --models mobilenet_v3_small squeezenet1_1 --threads 1
    python bench/rate_noise.py --part shares --models mobilenet_v3_small squeezenet1_1 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import magicinit
from results_file import BENCH, commit, replace_section
from zoo_models import build, spec

HEADING = "## bench/rate_noise.py"
TARGET = 0.02  # the default rate_precision: standard error of log C
DEFLATIONS = (1, 4, 16)  # own-sample deflation ranks
SHARED = 16  # the other sample's deflation rank
OUTPUT_BLOCK = 50  # outputs per batched backward pass
SHARES_ABOUT = (
    "How unequally the init samples weigh in the rates: on the model after Part 1 (on the same samples), every "
    "sample's mean squared gradient norm of every layer from `--share-draws` Rademacher draws (plain autograd, "
    "one sample at a time; each mean is itself noisy by about the per-draw spread over the square root of the "
    "draws), as a share of the layer's total. A layer whose heaviest sample holds half of it needs that "
    "sample's noise averaged down, and drawing every sample as often wastes the others' draws (docs/method.md, "
    '"Drawing where the weight is").'
)
SHARES_HEADER = (
    "| model | layers | samples | heaviest sample's share (median over layers) | (largest) "
    "| samples holding half a layer's total (median) |"
)
ABOUT = (
    "Per layer and sample, the output-space Gram matrix `A = J J^T` of the layer's weight, computed exactly (one "
    "backward pass per output) on the model after Part 1 (`init_(model, x, between=False, seed=0)` on the "
    "zoo's Gaussian 64 px inputs), and the per-draw relative std of the rate's draw `||dL/dW||^2` under "
    "Rademacher noise, `sqrt(2 (||A||_F^2 - sum A_ii^2)) / tr(A)`: *plain* is the library's estimator; "
    "*deflated k* takes the sample's own top k output directions (of the sum of every layer's `A / tr(A)`) "
    "exactly and draws on the rest (Hutch++-style); *other sample's k* uses another sample's directions (a "
    "subspace shared by all samples would cost nothing per sample). Draws per sample for 2 %: "
    "`(0.5 std / 0.02)^2` for the worst layer (`log C` is half `log ||dL/dW||^2`); with deflation, k exact "
    "backward passes plus the draws on the rest (finding the k directions costs more passes on top: a sketch)."
)


@dataclass
class LayerNoise:
    """One layer's per-draw relative standard deviations on one sample."""

    name: str
    plain: float
    deflated: dict[int, float]
    shared: float


def gram_matrices(model: nn.Module, sample: Tensor, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every layer's ``A = J J^T`` (float64, ``(outputs, outputs)``) for one sample, one backward per output."""
    output = model(sample[None]).flatten()
    count = output.numel()
    jacobians = {name: torch.empty(count, weight.numel()) for name, weight in weights.items()}
    basis = torch.eye(count)
    for start in range(0, count, OUTPUT_BLOCK):
        rows = basis[start : start + OUTPUT_BLOCK]
        grads = torch.autograd.grad(output, list(weights.values()), rows, retain_graph=True, is_grads_batched=True)
        for (name, _), grad in zip(weights.items(), grads):
            jacobians[name][start : start + len(rows)] = grad.flatten(1)
    return {name: (jacobian @ jacobian.T).double() for name, jacobian in jacobians.items()}


def relative_std(gram: Tensor, trace: float) -> float:
    """Per-draw std of ``eta^T gram eta`` (Rademacher ``eta``) over ``trace``."""
    variance = 2 * float(gram.square().sum() - gram.diagonal().square().sum())
    return max(variance, 0.0) ** 0.5 / trace


def deflated_std(gram: Tensor, directions: Tensor, trace: float) -> float:
    """Per-draw relative std of the draws on what ``directions`` (orthonormal columns) leave of ``gram``."""
    projector = torch.eye(gram.shape[0], dtype=gram.dtype) - directions @ directions.T
    return relative_std(projector @ gram @ projector, trace)


def top_directions(grams: dict[str, Tensor], count: int) -> Tensor:
    """The top ``count`` eigenvectors of the sum of every layer's ``A / tr(A)`` (each layer weighs alike)."""
    total = sum(gram / gram.trace() for gram in grams.values() if gram.trace() > 0)
    assert isinstance(total, Tensor)
    return torch.linalg.eigh(total).eigenvectors[:, -count:]


def layer_noise(samples: list[dict[str, Tensor]]) -> list[list[LayerNoise]]:
    """Per sample, every layer's ``LayerNoise`` (the shared column uses the next sample's directions)."""
    tables = []
    for index, grams in enumerate(samples):
        own = top_directions(grams, max(DEFLATIONS))
        other = top_directions(samples[(index + 1) % len(samples)], SHARED)
        rows = []
        for name, gram in grams.items():
            trace = float(gram.trace())
            if trace <= 0:
                continue
            deflated = {k: deflated_std(gram, own[:, -k:], trace) for k in DEFLATIONS}
            rows.append(LayerNoise(name, relative_std(gram, trace), deflated, deflated_std(gram, other, trace)))
        tables.append(rows)
    return tables


def rademacher(shape: torch.Size, generator: torch.Generator) -> Tensor:
    """Entries of -1 or +1 with equal odds (drawn here, not by the library: the checks are independent)."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def after_part1(name: str, count: int) -> tuple[nn.Module, Tensor, dict[str, Tensor]]:
    """The zoo model ``name`` after Part 1 on ``count`` of its inputs (what Part 2 measures rates on), in eval
    mode; the inputs; and the weights of its convolution and linear layers by layer name."""
    model_spec = spec(name)
    model = build(model_spec)
    inputs = model_spec.inputs(count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        magicinit.init_(model, inputs, between=False, seed=0)
    model.eval()
    layers = (nn.Conv1d, nn.Conv2d, nn.Linear)
    return model, inputs, {n: m.weight for n, m in model.named_modules() if isinstance(m, layers)}


def drawn_std(model: nn.Module, sample: Tensor, weight: Tensor, draws: int, seed: int) -> float:
    """Per-draw relative std of ``||dL/dW||^2`` from ``draws`` real Rademacher draws (independent of ``A``)."""
    generator = torch.Generator().manual_seed(seed)
    output = model(sample[None]).flatten()
    values = []
    for _ in range(draws):
        noise = rademacher(output.shape, generator)
        (grad,) = torch.autograd.grad(output, [weight], noise, retain_graph=True)
        values.append(float(grad.double().square().sum()))
    return statistics.stdev(values) / statistics.fmean(values)


def sample_shares(model: nn.Module, inputs: Tensor, weights: dict[str, Tensor], draws: int, seed: int) -> Tensor:
    """Every sample's share of each layer's squared gradient norm, ``(layers, samples)``: per sample the mean
    of ``draws`` Rademacher draws of ``||dL/dW||^2`` (plain autograd, one sample at a time), over their sum."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.zeros(len(weights), len(inputs), dtype=torch.float64)
    for index in range(len(inputs)):
        output = model(inputs[index : index + 1]).flatten()
        for _ in range(draws):
            noise = rademacher(output.shape, generator)
            grads = torch.autograd.grad(output, list(weights.values()), noise, retain_graph=True)
            means[:, index] += torch.stack([g.double().square().sum() for g in grads]) / draws
    return means / means.sum(1, keepdim=True).clamp_min(1e-300)


def shares_row(name: str, args: argparse.Namespace) -> str:
    """One model's row of the shares table: over its layers, the median and the largest share of the
    heaviest sample, and the median number of samples it takes to hold half a layer's total."""
    model, inputs, weights = after_part1(name, args.share_samples)
    shares = sample_shares(model, inputs, weights, args.share_draws, seed=3)
    heaviest = shares.amax(1)
    ordered = shares.sort(dim=1, descending=True).values.cumsum(1)
    half = (ordered < 0.5).sum(1) + 1  # samples holding half of the layer's total
    return (
        f"| {name} | {len(weights)} | {args.share_samples} | {float(heaviest.median()):.2f} | "
        f"{float(heaviest.max()):.2f} | {float(half.double().median()):.0f} |"
    )


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    """One model: Part 1 on ``args.init_samples`` zoo inputs, then the Gram matrices of ``args.samples``
    of them, the noise table and the independent check on the worst layer."""
    model, inputs, every_weight = after_part1(name, args.init_samples)
    with torch.no_grad():
        outputs = model(inputs[:1]).numel()
    limit = args.max_jacobian_gb * 2**30 / 4 / outputs
    weights = {n: weight for n, weight in every_weight.items() if weight.numel() <= limit}
    left_out = sorted(set(every_weight) - set(weights))
    started = time.perf_counter()
    samples = [gram_matrices(model, inputs[i], weights) for i in range(args.samples)]
    seconds = time.perf_counter() - started
    tables = layer_noise(samples)
    worst = max(tables[0], key=lambda row: row.plain)
    check = drawn_std(model, inputs[0], weights[worst.name], args.draws, seed=7)
    return {
        "name": name,
        "outputs": outputs,
        "layers": len(weights),
        "left_out": left_out,
        "tables": tables,
        "worst": worst,
        "drawn": check,
        "seconds": seconds,
    }


def summary_rows(result: dict[str, object]) -> list[str]:
    """The model's markdown rows: per sample, the max and median over layers of each column."""
    rows = []
    tables = result["tables"]
    assert isinstance(tables, list)
    for index, table in enumerate(tables):
        columns = [[r.plain for r in table]]
        columns += [[r.deflated[k] for r in table] for k in DEFLATIONS]
        columns += [[r.shared for r in table]]
        cells = [f"{max(c):.2f} / {statistics.median(c):.2f}" for c in columns]
        draws = (0.5 * max(columns[0]) / TARGET) ** 2
        deflated_draws = (0.5 * max(columns[2]) / TARGET) ** 2
        rows.append(
            f"| {result['name']} | {index} | {result['layers']} | " + " | ".join(cells) + f" | {draws:.0f} | "
            f"{DEFLATIONS[1]} + {deflated_draws:.0f} |"
        )
    return rows


def table(results: list[dict[str, object]]) -> str:
    """The markdown table of every model and sample, and the independent check."""
    ks = " | ".join(f"deflated k={k}" for k in DEFLATIONS)
    lines = [
        f"| model | sample | layers | plain | {ks} | other sample's k={SHARED} | draws per sample for 2 % (plain) "
        f"| passes per sample for 2 % (deflated k={DEFLATIONS[1]}: exact + draws) |",
        "|---|---|---|" + "---|" * (len(DEFLATIONS) + 2) + "---|---|",
    ]
    for result in results:
        lines += summary_rows(result)
    lines.append("")
    lines.append("Cells: max / median over the layers of the per-draw relative std. Independent check (the worst")
    lines.append("layer of sample 0, from real draws, against the formula on its exact `A`):")
    lines.append("")
    for result in results:
        worst = result["worst"]
        assert isinstance(worst, LayerNoise)
        left_out = result["left_out"]
        assert isinstance(left_out, list)
        lines.append(
            f"- {result['name']} ({result['outputs']} outputs; left out: {', '.join(left_out) or 'none'}): "
            f"`{worst.name}` {worst.plain:.3f} from `A`, {result['drawn']:.3f} from real draws; Gram matrices "
            f"{result['seconds']:.0f} s"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_small", "squeezenet1_1"])
    parser.add_argument("--samples", type=int, default=2, help="samples whose Gram matrices are computed (>= 2)")
    parser.add_argument("--init-samples", type=int, default=8, help="Part 1's samples (the zoo's default)")
    parser.add_argument("--draws", type=int, default=400, help="real draws of the independent check")
    parser.add_argument("--max-jacobian-gb", type=float, default=2.0, help="leave out layers above this")
    parser.add_argument(
        "--part", choices=["noise", "shares"], default="noise",
        help="noise: the per-draw spread and deflation (the Gram matrices); shares: how unequally the samples weigh",
    )  # fmt: skip
    parser.add_argument("--share-samples", type=int, default=64, help="--part shares: the samples")
    parser.add_argument("--share-draws", type=int, default=8, help="--part shares: draws per sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples: 2 at least (the shared column uses another sample's directions)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every model, print the table and write the section."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.part == "shares":
        heading, about = f"{HEADING} --part shares", SHARES_ABOUT
        rows = [shares_row(name, args) for name in args.models]
        text = "\n".join([SHARES_HEADER, "|---|---|---|---|---|---|", *rows])
    else:
        heading, about = HEADING, ABOUT
        results = []
        for name in args.models:
            results.append(measure(name, args))
            print(f"{name}: done", flush=True)
        text = table(results)
    command = "python bench/rate_noise.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    section = (
        f"{heading}\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at commit "
        f"{commit()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} "
        f"threads, {(time.perf_counter() - started) / 60:.0f} minutes:\n\n```\n{command}\n```\n\n"
        f"{about}\n\n{text}\n"
    )
    replace_section(args.results, heading, section)
    print(text)


if __name__ == "__main__":
    main()
