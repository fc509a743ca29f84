"""The initializations magicinit is compared with (``torch.nn.init``), for the demo and ``bench/``.

``BASELINES`` maps a name to ``init(model)``, applied in place to every conv,
transposed conv and linear layer (biases zeroed); ``"default"`` keeps the
weights torch's layer constructors drew.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .._core.adapters import find_affine_layers

__all__ = ["BASELINES"]


def _each_affine_layer(weight_init: Callable[[Tensor], object]) -> Callable[[nn.Module], None]:
    def init(model: nn.Module) -> None:
        for module in find_affine_layers(model).values():
            weight, bias = module.weight, module.bias
            assert isinstance(weight, Tensor)  # an affine layer's weight (a bias is a tensor or None)
            weight_init(weight)
            if bias is not None:
                assert isinstance(bias, Tensor)
                nn.init.zeros_(bias)

    return init


BASELINES: dict[str, Callable[[nn.Module], None]] = {
    "default": lambda model: None,
    "xavier": _each_affine_layer(nn.init.xavier_normal_),
    "kaiming": _each_affine_layer(lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")),
    "orthogonal": _each_affine_layer(lambda w: nn.init.orthogonal_(w, gain=nn.init.calculate_gain("relu"))),
}
