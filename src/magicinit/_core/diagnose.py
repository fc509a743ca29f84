"""Part 4 of the method: diagnostics (the reference's ``measure_stat``), model untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from .arguments import check_arguments
from .context import RateOptions
from .distributed import ProcessGroupArg
from .inputs import Batch
from .rates import measure_change_rates
from .report import Diagnosis, LayerDiagnosis
from .safety import buffers_kept, guarded
from .session import original_module, outside_inference_mode, start_session
from .stats import coefficient_of_variation
from .within import first_site_moments


@outside_inference_mode
def diagnose(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    *,
    seed: int | None = 0,
    samples: int = 256,
    forward: Callable[[nn.Module, Batch], Any] | None = None,
    skip: Iterable[str] = (),
    progress: bool = False,
    rate_chunk_size: int = RateOptions.chunk_size,
    rate_precision: float = RateOptions.precision,
    rate_max_rounds: int = RateOptions.max_rounds,
    process_group: ProcessGroupArg = "default",
) -> Diagnosis:
    """Per-layer statistics of ``model`` on ``data``; the model is not changed.

    For every affine layer that the forward pass calls: the mean and std of
    each output channel, the coefficient of variation of those stds (output
    CV, 0 when every channel has the same scale), the layer's change rate
    ``C_k`` from back-propagated Gaussian noise with its standard error, and
    the mean and coefficient of variation of the per-channel change rates.
    A well-initialized network has output CV near 0 and equal rates.

    Args:
        model: any ``nn.Module``.
        data: a batch or an iterable of batches, as for ``init_``.
        seed: seed of the noise draws (default 0: repeatable, torch's global RNG untouched);
            None uses torch's global RNG.
        samples, forward, skip, progress, rate_*, process_group: as for ``init_`` (statistics
            over all processes of the group, each on its own data).

    Example:
        >>> print(magicinit.diagnose(net, images))  # doctest: +SKIP
    """
    checked = check_arguments(dict(seed=seed, samples=samples, forward=forward, skip=skip, progress=progress,
                                   rate_chunk_size=rate_chunk_size, rate_precision=rate_precision,
                                   rate_max_rounds=rate_max_rounds))
    seed, samples, skip, rate_chunk_size, rate_precision, rate_max_rounds = (
        checked[k] for k in ("seed", "samples", "skip", "rate_chunk_size", "rate_precision", "rate_max_rounds"))
    model = original_module(model)  # a torch.compile'd model shares its parameters with the module it wraps
    options = RateOptions(chunk_size=rate_chunk_size, precision=rate_precision, max_rounds=rate_max_rounds)
    with buffers_kept(model):  # the tracing pass and every later one: a forward may update buffers of its own
        session = start_session(model, data, samples=samples, seed=seed, forward=forward, skip=skip,
                                include_frozen=True, progress=progress, rates=options, process_group=process_group)
        with guarded(model):
            moments, layouts = first_site_moments(session.context, session.index, session.units)
            called = {name: unit for name, unit in session.units.items() if name in moments}
            rates = measure_change_rates(session.context, called, layouts, "magicinit: diagnose")
    layers = []
    for name, unit in called.items():
        channel_rate = rates.channel_rate[name]
        layers.append(LayerDiagnosis(
            name=name,
            type=unit.owner_type,
            channel_mean=moments[name].mean.tolist(),
            channel_std=moments[name].std.tolist(),
            output_cv=coefficient_of_variation(moments[name].std),
            rate=rates.rate[name],
            rate_log_error=rates.log_error[name],
            rate_mean=float(channel_rate.double().mean()),
            rate_cv=coefficient_of_variation(channel_rate),
        ))
    return Diagnosis(layers, rates.draws)
