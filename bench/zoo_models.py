"""The models of ``bench/zoo.py`` by family: how each is built, what input it gets and how it is called.

* ``torchvision``: the classifiers of ``magicinit.tools.nets.TORCHVISION_CLASSIFIERS`` and the built-in
  ``caffenet`` on 8 Gaussian 3 x 64 x 64 inputs (``zoo.py --samples``: another count), and two extras the
  issue names: the segmentation model ``lraspp_mobilenet_v3_large`` (same inputs; its output is a dict,
  whose tensors magicinit's default forward finds) and the detector ``ssdlite320_mobilenet_v3_large`` at
  160 px with the detector recipe of ``docs/guide.md`` (``### Detectors``: a ``forward=`` returning the
  heads' raw outputs). The recipe is not copied here: ``detector_recipe`` runs the guide's block, as
  ``tests/test_detectors.py`` does.
* ``timm``: ``timm.create_model(name, pretrained=False, **TIMM_ARGS.get(name, {}))`` on the same 64 px inputs
  (``img_size=64`` where the model is built for one size).
* ``hf``: Hugging Face's T5 and Llama from small configs (random weights, offline) on token ids, when
  ``transformers`` is importable (``hf_missing`` says why not otherwise).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from magicinit.tools.cli import load_model
from magicinit.tools.nets import TORCHVISION_CLASSIFIERS

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
FAMILIES = ("torchvision", "timm", "hf")
BUILT_IN = {"caffenet": {"width": 0.25, "classes": 1000}}  # built-in nets of magicinit.tools.nets, and their arguments
SAMPLES = 8  # init samples of every model unless zoo.py --samples says otherwise
IMAGES = "{count} Gaussian 3 x 64 x 64 inputs"  # input_words are formatted with the sample count
TOKENS = 32  # Hugging Face inputs: sequences of 32 token ids
VOCABULARY = 512

Forward = Callable[[nn.Module, Any], Any]


@dataclass
class ModelSpec:
    """One model of the zoo: its name, how to build it (seeded, random weights), its inputs and its forward."""

    name: str
    build: Callable[[], nn.Module]  # called after torch.manual_seed(0)
    inputs: Callable[[int], Any]  # the init data of that many samples (on the CPU; the caller moves it)
    input_words: str = IMAGES  # what the inputs are, for the RESULTS text; "{count}": the sample count
    forward: Forward | None = None  # init_'s forward= and the timed forward; None: model(inputs)
    notes: list[str] = field(default_factory=list)


def gaussian_images(count: int = SAMPLES, size: int = 64) -> Tensor:
    """The zoo's usual init data: ``count`` Gaussian 3 x size x size inputs (seeded)."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@functools.cache
def detector_recipe() -> dict[str, Any]:
    """The names docs/guide.md's detector recipe defines (``raw_head_outputs``, ``grid_boxes``), run as written
    (the ``<!-- detectors-recipe -->`` block; ``tests/test_detectors.py`` reads the same block); once."""
    found = re.findall(r"<!-- detectors-recipe -->\n```python\n(.*?)```", GUIDE.read_text(), re.S)
    if len(found) != 1:
        raise RuntimeError(f"{GUIDE}: expected one detector recipe block, found {len(found)}")
    namespace: dict[str, Any] = {"__name__": "guide_detectors"}
    exec(compile(found[0], "docs/guide.md:detectors", "exec"), namespace)
    return namespace


def raw_head_outputs(model: nn.Module, images: Tensor) -> Any:
    """The guide's ``raw_head_outputs(model, images)``: the detector's raw head outputs."""
    return detector_recipe()["raw_head_outputs"](model, images)


def _ssdlite(size: int) -> nn.Module:
    """SSDlite (torchvision's 91 classes, no backbone weights) with its fixed input size set to ``size``."""
    model = load_model("torchvision:ssdlite320_mobilenet_v3_large", {"weights_backbone": None})
    transform: Any = model.transform
    transform.min_size, transform.max_size, transform.fixed_size = (size,), size, (size, size)
    return model


def _built(name: str, args: dict[str, Any]) -> Callable[[], nn.Module]:
    return lambda: load_model(name, args)


TORCHVISION_EXTRAS = {
    "lraspp_mobilenet_v3_large": ModelSpec(
        "lraspp_mobilenet_v3_large",
        _built("torchvision:lraspp_mobilenet_v3_large", {"weights_backbone": None}),
        gaussian_images,
        notes=["output: a dict ({'out': ...}); the default forward finds its tensor"],
    ),
    "ssdlite320_mobilenet_v3_large": ModelSpec(
        "ssdlite320_mobilenet_v3_large",
        lambda: _ssdlite(160),
        lambda count: torch.rand(count, 3, 160, 160, generator=torch.Generator().manual_seed(1)),
        input_words="{count} uniform [0, 1) 3 x 160 x 160 images (transform's fixed size 160)",
        forward=raw_head_outputs,
        notes=["forward=: docs/guide.md's detector recipe (raw head outputs)"],
    ),
}

# timm models and their create_model arguments (img_size=64 where the model is built for one input size)
TIMM_ARGS: dict[str, dict[str, Any]] = {
    "resnet50": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 64},
    "ghostnet_100": {},
    "mobilenetv3_small_100": {},
    "coatnet_0_rw_224": {"img_size": 64},
    "cait_xxs24_224": {"img_size": 64},
    "maxvit_nano_rw_256": {"img_size": 64},
}


def _hf_t5() -> nn.Module:
    transformers = importlib.import_module("transformers")  # not a dependency: typed Any, imported only here

    config = transformers.T5Config(
        vocab_size=VOCABULARY, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config)


def _hf_llama() -> nn.Module:
    transformers = importlib.import_module("transformers")

    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=TOKENS,
    )
    return transformers.LlamaForCausalLM(config)


def _token_ids(count: int) -> Tensor:
    return torch.randint(0, VOCABULARY, (count, TOKENS), generator=torch.Generator().manual_seed(1))


HF_WORDS = f"{{count}} sequences of {TOKENS} random token ids (vocabulary {VOCABULARY})"
HF_MODELS = {
    "t5": ModelSpec(
        "t5",
        _hf_t5,
        _token_ids,
        input_words=HF_WORDS + ", as encoder and decoder input",
        forward=lambda model, ids: model(input_ids=ids, decoder_input_ids=ids).logits,
        notes=["T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)"],
    ),
    "llama": ModelSpec(
        "llama",
        _hf_llama,
        _token_ids,
        input_words=HF_WORDS,
        forward=lambda model, ids: model(input_ids=ids).logits,
        notes=["LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)"],
    ),
}


def hf_missing() -> str | None:
    """Why the Hugging Face family cannot run here (``transformers not installed``), or None."""
    return None if importlib.util.find_spec("transformers") is not None else "transformers not installed"


def default_models(family: str) -> list[str]:
    """The model names a family's run measures by default."""
    if family == "torchvision":
        return [*TORCHVISION_CLASSIFIERS, *TORCHVISION_EXTRAS, *BUILT_IN]
    if family == "timm":
        return list(TIMM_ARGS)
    if family == "hf":
        return list(HF_MODELS)
    raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")


def spec(name: str, family: str = "torchvision") -> ModelSpec:
    """The model ``name`` of ``family``: a listed one, else any torchvision (``get_model``) or timm model by
    name on the 64 px images."""
    if family == "hf":
        return HF_MODELS[name]
    if family == "timm":
        return ModelSpec(name, _built(f"timm:{name}", TIMM_ARGS.get(name, {})), gaussian_images)
    if name in TORCHVISION_EXTRAS:
        return TORCHVISION_EXTRAS[name]
    if name in BUILT_IN:
        return ModelSpec(name, _built(name, BUILT_IN[name]), gaussian_images)
    return ModelSpec(name, _built(f"torchvision:{name}", {}), gaussian_images)


def build(model: ModelSpec, device: torch.device | str = "cpu") -> nn.Module:
    """``model`` built (seeded) on ``device``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's note about its future default init
        return model.build().to(device)
