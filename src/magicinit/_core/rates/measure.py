"""The relative change rate of every layer, from back-propagated noise (Parts 2 and 4).

A layer's relative change rate is ``C_k = sqrt(E||dL/dW_k||^2 / ||W_k||^2)``
under a random linear loss ``L = eta . output`` (noise back-propagated from
the top: no labels). The paper draws ``eta`` from a standard Gaussian; any
noise with ``E[eta eta^T] = I`` has the same expectation, and Rademacher
noise (``strategy.NoiseDraws.noise``) has the least variance. It is
estimated on small chunks of the init data, each with its own noise draw: the
gradient of a chunk mixes its samples' contributions with random signs, so
many small chunks give a far steadier estimate than a few large ones at the
same cost. Rounds over the data (each chunk with fresh noise) repeat until
the standard error of every ``log C_k`` is below a target. The target is the
rate *on the init data*, so the error counts only the noise: it is estimated
from how much each chunk's squared gradient norm varies between rounds, not
from differences between samples. After the first round only, where it holds
``ONE_ROUND_MIN_DRAWS`` draws or more, the spread of its draws bounds that
error from above (it counts the differences between samples too), and where
the bound already meets the target no second round is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..adapters import Layout
from ..context import PassContext
from ..distributed import Collective
from ..errors import MagicInitError
from ..inputs import batch_size
from ..safety import temporary_hooks
from ..sites import WeightUnit, refreshed
from .choose import choose_strategy
from .norms import squared_filter_norms
from .strategy import NoiseDraws, check_gradients_reach_output

ONE_ROUND_MIN_DRAWS = 64  # draws in one round from which their own spread is trusted to bound the noise error

# batch norms, which compute the statistics of the batch they get even in eval mode when they keep no running
# statistics (track_running_stats=False)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class ChangeRates:
    """Estimated change rates of a set of layers.

    Attributes:
        rate: ``C_k`` per layer (0 where no gradient reaches the layer).
        log_error: standard error of ``log C_k`` (the estimate's spread).
        channel_rate: per output channel ``sqrt(E||dL/dW_i||^2 / ||W_i||^2)``.
        draws: number of noise draws (chunks times rounds) averaged.
        input_slice_gradient: for weights measured with ``input_slices``, ``E||dL/dW_s||^2`` of
            every slice ``s`` of their input channels (float64, on the CPU).
        method: how the draws' gradient norms were computed (``choose_strategy``): ``"from site
            activations"``, ``"vectorized per-sample gradients"`` or ``"one sample at a time"`` (with the
            reason where it is not the first).
    """

    rate: dict[str, float]
    log_error: dict[str, float]
    channel_rate: dict[str, Tensor]
    draws: int
    input_slice_gradient: dict[str, Tensor] = field(default_factory=dict)
    method: str = "one sample at a time"


def measure_change_rates(
    context: PassContext,
    units: dict[str, WeightUnit],
    layouts: dict[str, Layout],
    desc: str = "magicinit: change rates",
    input_slices: dict[str, tuple[int, ...]] | None = None,
) -> ChangeRates:
    """Estimate the change rate of every weight in ``units`` from back-propagated noise.

    ``layouts`` gives each weight's filter layout (``graph.LayerGraph.layouts``).
    The rate is that of the weight as the forward uses it: the parameter, or a
    reparametrization's result. For the weights in ``input_slices`` (sizes of
    consecutive slices of input channels, dimension 1), the squared gradient
    norm of every slice is averaged too. The model's parameters are not changed.
    Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is written);
    the real parameters' ``requires_grad`` is switched on for the duration and
    the caller restores it. The draws' norms come from the fastest strategy
    ``choose.choose_strategy`` finds for the model. With a
    collective, every rank draws its own noise (from a generator forked off
    the shared one) over its own data, and the sums and their noise variances
    are summed over the ranks, which stop after the same round.
    """
    options, collective = context.rates, context.collective
    problem = _single_sample_batch_norm(context)
    if collective is not None:  # every rank raises if one must (each has its own number of samples)
        collective.agree(problem)
    elif problem is not None:
        raise problem
    generator = context.generator
    if collective is not None and generator is not None:
        generator = collective.fork(generator)
    model, names = context.model, list(units)
    for unit in units.values():
        for param in unit.real_parameters(model):
            param.requires_grad_(True)
    check_gradients_reach_output(context, units)
    draws_per_round = len(range(0, batch_size(context.batch), options.chunk_size))
    channel_sums: dict[str, Tensor] = {}  # on the model's device, summed over all draws
    slices = {name: sizes for name, sizes in (input_slices or {}).items() if name in units}
    slice_sums: dict[str, Tensor] = {}
    draw_totals: list[Tensor] = []  # per round: every layer's squared norm of every draw, (layers, draws)
    rounds = 0
    errors: dict[str, float] = {}  # of the last round's estimate
    noise_draws = NoiseDraws(context, units, layouts, slices, generator)
    # the reparametrizations' attributes hold this pass's graph: recomputed without it at the end
    with (
        context.progress_bar(options.max_rounds * draws_per_round, desc, unit="draw") as advance,
        temporary_hooks() as hooks,
        refreshed(model, units.values()),
    ):
        strategy, method = choose_strategy(noise_draws, hooks)
        try:
            while rounds < options.max_rounds:
                rounds += 1
                round_totals: dict[str, list[Tensor]] = {name: [] for name in names}
                for block in strategy.rounds():
                    for name in names:
                        per_channel = block.channel[name]
                        channel_sums[name] = (
                            channel_sums[name] + per_channel.sum(0) if name in channel_sums else per_channel.sum(0)
                        )
                        round_totals[name].append(per_channel.sum(1))
                        if name in slices:
                            per_slice = block.slices[name].sum(0)
                            slice_sums[name] = slice_sums[name] + per_slice if name in slice_sums else per_slice
                    advance(block.count)
                # one transfer per round, not per layer or draw (layers on other devices joined first)
                totals = [torch.cat(round_totals[name]) for name in names]
                draw_totals.append(torch.stack([t.to(totals[0].device) for t in totals]).cpu())
                # after one round, its draws' bound; after more, the noise measured between rounds
                errors = (_one_round_log_errors if rounds == 1 else _log_errors)(names, draw_totals, collective)
                if all(e <= options.precision for e in errors.values()):
                    break
        finally:
            strategy.close()
    n_draws = draws_per_round * rounds
    if collective is not None:
        n_draws = collective.total(n_draws)
        channel_sums = {name: collective.sum(channel_sums[name]) for name in names}
        slice_sums = {name: collective.sum(slice_sums[name]) for name in slice_sums}
    rate, channel_rate = {}, {}
    for name in names:
        adapter, groups = layouts[name]
        channel_norm_sq = squared_filter_norms(adapter.to_filters(units[name].tensor(model).detach(), groups))
        channel_norm_sq = channel_norm_sq.flatten().cpu()
        mean_grad_sq = channel_sums[name].cpu() / n_draws
        weight_norm_sq = float(channel_norm_sq.sum())
        rate[name] = math.sqrt(float(mean_grad_sq.sum()) / weight_norm_sq) if weight_norm_sq > 0 else math.inf
        channel_rate[name] = (mean_grad_sq / channel_norm_sq).sqrt().float()
    slice_gradient = {name: total.cpu() / n_draws for name, total in slice_sums.items()}
    return ChangeRates(rate, errors, channel_rate, n_draws, slice_gradient, method)


def _single_sample_batch_norm(context: PassContext) -> MagicInitError | None:
    """The refusal (naming the layer) of chunks of a single sample for a model with a batch norm that keeps no
    running statistics: it normalizes a sample alone by that sample's own statistics (for ``BatchNorm1d``: an
    error), which is not the function it computes on a training batch; None where there is nothing to refuse."""
    count, chunk_size = batch_size(context.batch), context.rates.chunk_size
    if chunk_size > 1 and count % chunk_size != 1:
        return None
    for name, module in context.model.named_modules():
        if isinstance(module, BATCH_NORMS) and module.running_mean is None:
            why = "rate_chunk_size=1" if chunk_size == 1 else f"the last chunk of the {count} samples"
            return MagicInitError(
                f"layer '{name}' ({type(module).__name__}, track_running_stats=False) normalizes by the statistics "
                "of the batch it gets, in eval mode too, and change rates are measured on chunks of the init data, "
                f"which here hold a single sample ({why}): on one sample it fails or computes another function. "
                "Pass rate_chunk_size=k with k of 2 or more (the training batch size gives the rates of training) "
                "that leaves no chunk of a single sample, or init_(..., between=False): Part 1 alone works, on all "
                "the init data at once"
            )
    return None


def _one_round_log_errors(
    names: list[str], draw_totals: list[Tensor], collective: Collective | None = None
) -> dict[str, float]:
    """An upper bound of the standard error of ``log C`` due to the noise after one round (``draw_totals``:
    one round, ``(layers, chunks)``), from the spread of its draws; inf with fewer than
    ``ONE_ROUND_MIN_DRAWS`` draws (all ranks') or another number of rounds.

    Each draw is one chunk under its own noise: the draws' variance is the mean noise variance of a
    chunk plus the variance of the chunks' expected norms (law of total variance), so in expectation it
    exceeds the noise alone; a layer no gradient reaches has error 0.
    """
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    if len(draw_totals) == 1:
        values = draw_totals[0].double()
        sums[:, 0], sums[:, 1], sums[:, 2] = values.sum(1), values.square().sum(1), values.shape[1]
    if collective is not None:
        sums = collective.sum(sums)
    errors = {}
    for name, (total, squares, count) in zip(names, sums.tolist()):
        if total <= 0:
            errors[name] = 0.0 if count else math.inf
        elif count < max(ONE_ROUND_MIN_DRAWS, 2):
            errors[name] = math.inf
        else:
            mean = total / count
            variance = max(squares / count - mean * mean, 0.0) * count / (count - 1)
            errors[name] = 0.5 * math.sqrt(variance / count) / mean  # log C = 0.5 log C^2
    return errors


def _log_errors(names: list[str], draw_totals: list[Tensor], collective: Collective | None = None) -> dict[str, float]:
    """Standard error of ``log C`` due to the noise, from per-(round, chunk) squared gradient norms
    (``draw_totals``: per round, ``(layers, chunks)`` in the order of ``names``).

    Each chunk's noise variance is estimated across rounds; with one round
    the error is unknown (inf). A layer no gradient reaches has rate 0 exactly
    (error 0). With a ``collective``, the chunks of all ranks count.
    """
    rounds = len(draw_totals)
    values = torch.stack(draw_totals).double() if rounds else torch.zeros(0, len(names), 0, dtype=torch.float64)
    # per layer: the sum of the chunks' means and the sum of their variances over the rounds
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    if rounds:
        sums[:, 0] = values.mean(0).sum(1)
    if rounds >= 2:
        sums[:, 1] = values.var(0, correction=1).sum(1)
    if collective is not None:
        sums = collective.sum(sums)
    errors = {}
    for name, (total, variance_sum) in zip(names, sums.tolist()):
        if total <= 0:
            errors[name] = 0.0
        elif rounds < 2:
            errors[name] = math.inf
        else:
            errors[name] = 0.5 * math.sqrt(variance_sum / rounds) / total  # log C = 0.5 log C^2
    return errors
