"""The choice of a gradient-norm strategy for a model (``choose_strategy``): the fastest that gives its draws.

In order: from site activations (``from_activations``), vectorized (``vectorized``), one chunk at a time
(``chunks``, which measures every model). A strategy that cannot measure the model says so by
``StrategyRefused`` (the one from site activations) or by torch.func's refusal to vectorize the forward
(``torch_internals.is_vectorization_refusal``); the model's own errors are raised.
"""

from __future__ import annotations

import torch

from ..context import PassContext
from ..errors import MagicInitError
from ..inputs import all_tensors, batch_size, floating_tensors, split_batch
from ..safety import Hooks
from ..sites import WeightUnit
from ..torch_internals import is_vectorization_refusal, root_cause_name
from .chunks import OneChunkAtATime
from .from_activations import FromActivations
from .norms import DrawNorms
from .strategy import GradientNormStrategy, NoiseDraws, StrategyRefused
from .vectorized import Vectorized

# The check of the strategy from site activations: on the first and the last draw, every weight's squared
# gradient norm (summed over its channels) must agree within AGREEMENT with that of each sample run alone.
# Samples that interact differ far more; float32 rounding differs between a batch and one sample alone, and
# deep ReLU networks amplify it to about 1.5 %.
AGREEMENT = 5e-2
# Weights whose total is below ROUNDING_LEVEL times the largest weight's are not compared: their gradient norm
# is under 1e-4 of the largest, near float32's rounding of the backward that carries the large ones (cait's
# class-attention keys behind a 1e-5 layer scale: totals 1e-14 of the largest, batch and alone 30-70 % apart).
# Samples that interact show in the weights upstream of the interaction, whose gradients are not that small.
ROUNDING_LEVEL = 1e-8


def _why_draws_cannot_be_batched(context: PassContext, units: dict[str, WeightUnit]) -> str | None:
    """Why draws of one sample each cannot be batched (None: they can be tried)."""
    if not units:
        return "no weights"
    if context.rates.chunk_size != 1:
        return "rate_chunk_size is not 1"
    if any(unit.kind != "parameter" for unit in units.values()):
        return "a reparametrized weight"
    if not all(t.dim() >= 1 and t.shape[0] == batch_size(context.batch) for t in all_tensors(context.batch)):
        return "a batch entry without the sample dimension"
    return None


def _one_sample_output_shapes(context: PassContext) -> list[torch.Size]:
    """The shapes of one sample's outputs that the noise is put on: the floating ones with a gradient."""
    with torch.enable_grad():
        return [t.shape for t in floating_tensors(context.run(split_batch(context.batch, 0, 1))) if t.requires_grad]


def _agree(first: DrawNorms, second: DrawNorms) -> bool:
    """Whether two strategies gave the same norms for the same draws: every weight's total over its channels
    (and every slice's) within ``AGREEMENT``, but for totals at float32's rounding level (below
    ``ROUNDING_LEVEL`` times the largest in both). Single channels are not compared: in a deep ReLU network,
    float32 rounding that differs between a batch and one sample alone flips units near zero, which moves
    single channels' norms by several percent while the totals stay put."""
    pairs = [
        (float(value.sum()), float(getattr(first, table)[name].sum()))
        for table in ("channel", "slices")
        for name, value in getattr(second, table).items()
    ]
    rounding = ROUNDING_LEVEL * max((abs(total) for pair in pairs for total in pair), default=0.0)
    return all(
        abs(other - total) <= AGREEMENT * abs(total) or max(abs(total), abs(other)) < rounding for total, other in pairs
    )


def choose_strategy(draws: NoiseDraws, hooks: Hooks) -> tuple[GradientNormStrategy, str]:
    """The fastest strategy that gives this model's draws, and a description of it (with the reason where it
    is not the first). ``hooks``: where the strategy one chunk at a time registers its pre-hooks.

    The strategy from site activations refuses, while it records the batched forward, a measured weight used
    other than as the weight of an affine map; the samples not interacting is checked on the first round's
    first and last samples, against the same norms of each sample run alone under the same noise
    (``_agree``), and that first round is kept for the estimate. A vectorized trial leaves the noise
    generator as it was. With a collective, every rank takes the same strategy.
    """
    loop = OneChunkAtATime(draws, hooks)
    context, units = draws.context, draws.units
    reason = _why_draws_cannot_be_batched(context, units)
    if context.collective is not None and context.collective.total(0 if reason is None else 1) and reason is None:
        reason = "another process cannot batch its draws"  # every rank takes the same strategy
    if reason is not None:
        return loop, f"{loop.description} ({reason})"
    state = draws.noise_state()
    count = batch_size(context.batch)
    checked = sorted({0, count - 1})  # the first sample and the last: an interaction shows in one of them
    shapes: list[torch.Size] | None = None  # one sample's output shapes, from the first sample's forward

    def alone(index: int) -> DrawNorms:
        """The norms of sample ``index`` run alone, under the next draw's noise."""
        nonlocal shapes
        single = FromActivations(draws, shapes, split_batch(context.batch, index, index + 1))
        try:
            return DrawNorms.concatenated(list(single.rounds()))
        finally:
            shapes = single.output_shapes
            single.close()

    activations: FromActivations | None = None
    try:
        references = [alone(0)]
        assert shapes is not None
        if count > 1:
            draws.noise(shapes, count - 2)  # the draws of the samples between: the last gets the round's noise
            references.append(alone(count - 1))
        reference = DrawNorms.concatenated(references)
        draws.restore_noise_state(state)
        activations = FromActivations(draws, shapes)  # from here on, the whole batch at once
        first_round = DrawNorms.concatenated(list(activations.rounds()))
        rows = torch.tensor(checked, device=next(iter(first_round.channel.values())).device)
        samples = DrawNorms(
            len(checked),
            {name: value[rows] for name, value in first_round.channel.items()},
            {name: value[rows] for name, value in first_round.slices.items()},
        )
        agreed = _agree(samples, reference)
        why_not = (
            "its norms of the first and last samples disagreed with those of each sample alone (samples "
            "that interact, or a random operation?)"
        )
    except StrategyRefused as refused:
        agreed, why_not = False, str(refused)
    except Exception as error:  # out of memory for the whole batch, an operation the per-site sums cannot follow
        if activations is None and isinstance(error, MagicInitError):
            # The forward's own error on one sample (guard_forward wraps it): every strategy would meet it. The
            # capture's own refusals are StrategyRefused, and the graph trace, under a similar mode, ran before.
            raise
        agreed, why_not = False, f"{type(error).__name__}: {error}"
    except BaseException:
        if activations is not None:
            activations.close()
        raise
    if context.collective is not None and context.collective.total(0 if agreed else 1) and agreed:
        agreed, why_not = False, "another process could not use it"  # every rank takes the same strategy
    if agreed:
        assert activations is not None
        activations.pending = first_round
        return activations, FromActivations.description
    if activations is not None:
        activations.close()
    draws.restore_noise_state(state)
    if shapes is None:  # the first sample's forward did not get that far
        shapes = _one_sample_output_shapes(context)
    trial = min(2, batch_size(context.batch))
    vectorized = Vectorized(draws, shapes, loop, stop=trial)
    try:
        try:
            next(iter(vectorized.rounds(strict=True)))
            refusal = None
        except Exception as error:  # an operation without a batching rule, data-dependent control flow, ...
            if not is_vectorization_refusal(error):
                raise  # the forward's own error: the loop would meet it too
            refusal = root_cause_name(error)
        if context.collective is not None and context.collective.total(0 if refusal is None else 1):
            refusal = refusal or "another process could not vectorize it"  # every rank takes the same strategy
        if refusal is not None:
            return loop, (
                f"{loop.description} (not from site activations: {why_not}; the forward could not be "
                f"vectorized: {refusal})"
            )
    finally:
        draws.restore_noise_state(state)
    return Vectorized(draws, shapes, loop), f"{Vectorized.description} (not from site activations: {why_not})"
