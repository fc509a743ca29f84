"""magicinit: data-dependent initialization of PyTorch networks.

Krähenbühl, Doersch, Donahue, Darrell, "Data-dependent Initializations of
Convolutional Neural Networks", ICLR 2016.
"""

from .diagnose import diagnose
from .errors import MagicInitError
from .initialize import init_, rescale_
from .report import Diagnosis, LayerDiagnosis, LayerReport, Report
from .samplers import SAMPLERS, register_sampler

__all__ = [
    "init_",
    "rescale_",
    "diagnose",
    "MagicInitError",
    "Report",
    "LayerReport",
    "Diagnosis",
    "LayerDiagnosis",
    "SAMPLERS",
    "register_sampler",
]

__version__ = "0.1.0"
