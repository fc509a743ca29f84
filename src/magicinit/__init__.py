"""magicinit: data-dependent initialization of PyTorch networks.

Krähenbühl, Doersch, Donahue, Darrell, "Data-dependent Initializations of
Convolutional Neural Networks", ICLR 2016. The method, in this package's
terms, is described in docs/method.md.

Everything a user needs is here: ``init_`` (Parts 1 and 2, in place),
``rescale_`` (Part 2 on trained weights), ``diagnose`` (statistics, the model
untouched), their reports, the error type, the sampler registry
(``register_sampler``, and ``SAMPLERS``, a read-only view of it) and what a
sampler author needs: the ``SamplerRequest`` a sampler gets, the
``SamplerCollective`` it reduces over with several processes, and for
data-driven samplers ``layer_patches``, ``patch_whitening`` (a
``PatchWhitening``) and ``DataDrivenSampler``. The
``magicinit._core`` package holds the method's internals; ``magicinit.tools``
the command line, the demo and their helpers; ``magicinit.lightning`` (with
PyTorch Lightning installed) a callback that initializes a LightningModule
when its fit starts.
"""

from ._core.diagnose import diagnose
from ._core.distributed import SamplerCollective
from ._core.errors import MagicInitError
from ._core.initialize import init_, rescale_
from ._core.report import Diagnosis, LayerDiagnosis, LayerReport, LayerStatus, Report
from ._core.samplers import (
    SAMPLERS,
    DataDrivenSampler,
    PatchWhitening,
    Sampler,
    SamplerRequest,
    layer_patches,
    patch_whitening,
    register_sampler,
)

__all__ = [
    "SAMPLERS",
    "DataDrivenSampler",
    "Diagnosis",
    "LayerDiagnosis",
    "LayerReport",
    "LayerStatus",
    "MagicInitError",
    "PatchWhitening",
    "Report",
    "Sampler",
    "SamplerCollective",
    "SamplerRequest",
    "diagnose",
    "init_",
    "layer_patches",
    "patch_whitening",
    "register_sampler",
    "rescale_",
]

__version__ = "0.1.0"
