"""Part 2's change rates (``measure_change_rates``): back-propagated random noise, and the squared gradient
norms of every noise draw, got by the fastest strategy that holds for the model.

A *draw* is one chunk of the init data (``rate_chunk_size`` samples, one by default) with its own Gaussian
noise ``eta`` on the model's outputs; what the rates need of it is ``||dL/dW_i||^2`` for every output
channel ``i`` of every weight (and, for weights reading a concatenation, of every slice of input channels),
under ``L = eta . output``. Every strategy draws the same noise, in the same order, so all give the same
estimate.

* ``measure.py``: ``measure_change_rates`` and ``ChangeRates``: rounds of draws until the noise error of
  every rate is small enough;
* ``norms.py``: squared norms in float64 (of filters, of slices of input channels, of per-sample gradients
  through the Gram matrix of a sample's positions) and ``DrawNorms``, the norms of consecutive draws;
* ``strategy.py``: ``GradientNormStrategy``, what every strategy is (a description, ``rounds()``,
  ``close()``); ``NoiseDraws``, what they share (the weights measured and the noise generator); and
  ``StrategyRefused``;
* ``from_activations.py``: ``FromActivations``, from the inputs and output gradients of the affine sites of
  one kept batched forward (about two backward passes a round; plain weights of affine maps, samples that
  do not interact);
* ``vectorized.py``: ``Vectorized``, per-sample gradients with ``torch.func.vmap`` (a forward without
  data-dependent control flow or random operations);
* ``chunks.py``: ``OneChunkAtATime``, a forward and a backward per draw (every model);
* ``choose.py``: ``choose_strategy``, which of the three a model takes, and why.
"""

from __future__ import annotations

from .measure import ChangeRates, measure_change_rates
from .norms import squared_slice_norms

__all__ = ["ChangeRates", "measure_change_rates", "squared_slice_norms"]
