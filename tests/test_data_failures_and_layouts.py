"""Data that used to end in a raw exception or a wrong reading (issue 26): loaders of dict batches with
per-sample lists and a short last batch, batches that cannot be joined, data that overflows the model's
dtype, and sequence-first layouts (``sample_dim``)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import magicinit
from conftest import assert_untouched, state_copy
from magicinit import MagicInitError

IMAGES = 10  # a dataset of 10 captioned images, loaded 4 at a time: the last batch holds 2


class CaptionedImages(Dataset):
    """Image ``i`` (seeded with ``i``) with caption ``"image i"``: a DataLoader collates the captions into a
    list of strings."""

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": _image(index), "caption": f"image {index}"}


def _image(index: int) -> torch.Tensor:
    return torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(index))


def _small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("samples", [256, 6])
def test_a_loader_of_dict_batches_with_captions_and_a_short_last_batch_hands_each_image_its_caption(
    samples: int,
) -> None:
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        seen.append((batch["pixel_values"], list(batch["caption"])))
        return model(batch["pixel_values"])

    loader = DataLoader(CaptionedImages(), batch_size=4)
    report = magicinit.init_(_small_cnn(), loader, forward=forward, seed=0, samples=samples)

    used = min(samples, IMAGES)
    assert report.settings["samples_used"] == used
    assert any(len(captions) == used for _, captions in seen)  # the whole init data in one pass
    for images, captions in seen:  # every pass, whole or split into chunks: each image with its own caption
        assert len(captions) == images.shape[0] >= 1
        for image, caption in zip(images, captions):
            index = int(caption.removeprefix("image "))
            assert index < used and torch.equal(image, _image(index))


def _tokens(samples: int, length: int = 12) -> torch.Tensor:
    return torch.randn(samples, 3, length, generator=torch.Generator().manual_seed(samples))


@pytest.mark.parametrize(
    ("batches", "cause"),
    [
        (
            [{"tokens": _tokens(4)}, {"tokens": _tokens(2, 9)}],
            r"entry \['tokens'\] has shape \(4, 3, 12\) in the first batch but \(2, 3, 9\) in batch 1.*pad every",
        ),
        ([{"tokens": _tokens(4)}, {"other": _tokens(2)}], r"keys \['tokens'\] in the first batch.*same keys"),
        (  # three tags for four samples, then two for two: one value per sample in the second batch only
            [{"tokens": _tokens(4), "tags": ["a", "b", "c"]}, {"tokens": _tokens(2), "tags": ["a", "b"]}],
            r"entry \['tags'\] holds one value per sample in batch 1 but not in batch 0 \(3 values, 4 samples\)",
        ),
    ],
)
def test_batches_that_cannot_be_joined_are_an_error_naming_the_entry(batches: list[dict], cause: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2))
    saved = state_copy(net)
    with pytest.raises(MagicInitError, match=cause):
        magicinit.init_(net, batches, forward=lambda model, batch: model(batch["tokens"]), seed=0)
    assert_untouched(net, saved)


@pytest.mark.parametrize(("magnitude", "dtype"), [(1e39, torch.float32), (7e4, torch.float16)])
def test_data_that_overflows_the_models_dtype_is_blamed_on_the_data(magnitude: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)
    saved = state_copy(net)
    data = torch.full((16, 4), magnitude, dtype=torch.float64)  # finite in float64
    with pytest.raises(MagicInitError) as raised:
        magicinit.init_(net, data, seed=0)
    message = str(raised.value)
    assert message.startswith("data:") and str(dtype) in message and "standardize the data" in message
    assert "layer" not in message
    assert_untouched(net, saved)


# Sequence-first layouts: torch's transformer layers take (L, N, E) unless batch_first=True.

LENGTH, SEQUENCES, WIDTH = 10, 8, 8


def _sequence_first_encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=0.0)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


def _sequences() -> torch.Tensor:
    """(L, N, E): sequence n scaled by n + 1, so that statistics over some sequences differ from those
    over some positions of all of them."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.arange(1, SEQUENCES + 1, dtype=torch.float32).view(1, SEQUENCES, 1)
    return torch.randn(LENGTH, SEQUENCES, WIDTH, generator=generator) * scale


def test_samples_cap_sequences_not_positions_with_sample_dim_1() -> None:
    encoder = _sequence_first_encoder()
    inputs: list[tuple[int, ...]] = []
    handle = encoder.register_forward_pre_hook(lambda module, args: inputs.append(tuple(args[0].shape)))
    try:
        report = magicinit.init_(encoder, _sequences(), seed=0, samples=3, sample_dim=1, between=False)
    finally:
        handle.remove()
    assert report.settings["samples_used"] == 3 and report.settings["sample_dim"] == 1
    assert all(shape[0] == LENGTH and shape[2] == WIDTH and shape[1] <= 3 for shape in inputs), inputs
    assert max(shape[1] for shape in inputs) == 3


def test_part_1_normalizes_over_the_first_sequences_whole() -> None:
    encoder = _sequence_first_encoder()
    magicinit.init_(encoder, _sequences(), seed=0, samples=3, sample_dim=1, between=False)
    attention = encoder.layers[0].self_attn
    with torch.no_grad():  # the first affine site: the attention's input projection, on sequences 0..2
        projected = F.linear(_sequences()[:, :3], attention.in_proj_weight, attention.in_proj_bias)
    rows = projected.reshape(-1, projected.shape[-1]).double()
    assert torch.allclose(rows.mean(0), torch.zeros(3 * WIDTH, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(rows.std(0, correction=0), torch.ones(3 * WIDTH, dtype=torch.float64), atol=1e-3)


@pytest.mark.slow
def test_both_parts_and_diagnose_count_sequences_with_sample_dim_1() -> None:
    encoder = _sequence_first_encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layout warning when sample_dim is right
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # torch's own, on vmap of attention
        report = magicinit.init_(encoder, _sequences(), seed=0, sample_dim=1)
        diagnosis = magicinit.diagnose(encoder, _sequences(), sample_dim=1)
    assert report.settings["samples_used"] == SEQUENCES  # never more samples than sequences given
    assert report["layers.0.linear1"].rate_before is not None and not diagnosis.notes


def test_a_sequence_first_model_on_the_default_sample_dim_warns_and_notes_sample_dim_1() -> None:
    encoder = _sequence_first_encoder()
    with pytest.warns(UserWarning, match=r"'layers.0.self_attn' \(batch_first=False\).*pass sample_dim=1"):
        report = magicinit.init_(encoder, _sequences(), seed=0, between=False)
    assert any("pass sample_dim=1" in note for note in report.notes)
    with pytest.warns(UserWarning, match="pass sample_dim=1"):
        diagnosis = magicinit.diagnose(encoder, _sequences(), rate_max_rounds=2)
    assert any("pass sample_dim=1" in note for note in diagnosis.notes) and "note: " in str(diagnosis)


class BatchFirstWrapper(nn.Module):
    """Takes (N, L, E) and hands a sequence-first encoder (L, N, E): sample_dim=0 is right for it."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _sequence_first_encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.transpose(0, 1)).transpose(0, 1)


def test_no_layout_warning_where_the_model_lays_its_sequences_out_itself() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = magicinit.init_(BatchFirstWrapper(), _sequences().transpose(0, 1), seed=0, between=False)
    assert report.settings["samples_used"] == SEQUENCES
    assert not any("sample_dim" in note for note in report.notes)


def test_labels_follow_the_sequences_and_a_mask_laid_out_otherwise_is_an_error() -> None:
    encoder = _sequence_first_encoder()
    labels = torch.arange(SEQUENCES)
    seen: list[torch.Tensor] = []

    def forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        sequences, batch_labels = batch
        seen.append(batch_labels)
        assert sequences.shape[1] == batch_labels.shape[0]
        return model(sequences)

    magicinit.init_(encoder, (_sequences(), labels), forward=forward, seed=0, samples=5, sample_dim=1, between=False)
    assert torch.equal(max(seen, key=len), labels[:5])

    saved = state_copy(encoder)
    mask = torch.zeros(SEQUENCES, LENGTH, dtype=torch.bool)  # (N, L), as torch takes key padding masks
    with pytest.raises(MagicInitError, match=r"batch 0 holds at \[1\] a tensor of shape \(8, 10\) .*\(sample_dim=1\)"):
        magicinit.init_(encoder, (_sequences(), mask), sample_dim=1, seed=0)
    with pytest.raises(MagicInitError, match=r"sample_dim=2: the data holds a tensor of shape \(8, 10\)"):
        magicinit.init_(encoder, mask.float(), sample_dim=2, seed=0)
    assert_untouched(encoder, saved)


def _variable_length_batches() -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Two batches as a DataLoader with a collate_fn that leaves sequences of their own lengths in a list
    gives them: (4 sequences (L_i, 6), 4 labels)."""
    generator = torch.Generator().manual_seed(0)
    return [
        ([torch.randn(length, 6, generator=generator) for length in lengths], torch.arange(4))
        for lengths in ((7, 5, 9, 6), (8, 4, 7, 5))
    ]


def test_tensors_that_do_not_share_the_sample_count_are_an_error_naming_the_entry() -> None:
    # a list of sequences of their own lengths was cut along time and joined across batches (its first
    # sequence's length taken as the sample count), the model fed other sequences without a word
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    saved = state_copy(model)
    named = r"batch 0 holds at \[0\]\[1\] a tensor of shape \(5, 6\) .* \(at \[0\]\[0\], shape \(7, 6\)\) has 7 samples"
    with pytest.raises(MagicInitError, match=named + ".*collate_fn"):
        magicinit.init_(model, _variable_length_batches(), forward=lambda m, b: m(torch.cat(b[0])), seed=0)
    assert_untouched(model, saved)
    # a tensor that is not per sample (a graph's edge list beside its node features), at the top of a dict
    nodes, edges = torch.randn(10, 6), torch.randint(0, 10, (2, 30))
    with pytest.raises(MagicInitError, match=r"holds at \['edges'\] a tensor of shape \(2, 30\) .*forward=lambda"):
        magicinit.init_(model, {"nodes": nodes, "edges": edges}, forward=lambda m, b: m(b["nodes"]), seed=0)
    assert_untouched(model, saved)
    # labels beside the images, a 0-dimensional tensor (not per sample) among them: as before
    images = torch.randn(6, 6)
    report = magicinit.init_(model, (images, torch.arange(6), torch.tensor(2.0)), seed=0, between=False)
    assert report.settings["samples_used"] == 6


@dataclasses.dataclass(frozen=True)
class ImageBatch:
    """A batch as a dataclass (a frozen one: it is rebuilt, never written): images, labels, a name."""

    image: torch.Tensor
    label: torch.Tensor
    source: str = "synthetic"


def test_dataclass_batches_are_capped_joined_chunked_and_cast_like_dicts() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        ImageBatch(torch.randn(16, 3, 8, 8, generator=generator, dtype=torch.float64), torch.arange(16) + 16 * i)
        for i in range(4)
    ]
    model = _small_cnn()
    seen: list[int] = []  # samples per call, counted here from the model's own input
    hook = model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    labels: list[torch.Tensor] = []

    def forward(net: nn.Module, batch: ImageBatch) -> torch.Tensor:
        assert isinstance(batch, ImageBatch) and batch.source == "synthetic"
        assert batch.image.dtype == torch.float32 and batch.image.shape[0] == batch.label.shape[0]
        labels.append(batch.label)
        return net(batch.image)

    try:
        capped = magicinit.init_(model, batches, forward=forward, samples=10, seed=0)
        assert capped.settings["samples_used"] == 10 and max(seen) == 10 and min(seen) < 10  # capped, and chunked
        assert torch.equal(max(labels, key=len), torch.arange(10))
        seen.clear(), labels.clear()
        joined = magicinit.init_(model, batches, forward=forward, samples=40, seed=0, between=False)
        assert joined.settings["samples_used"] == 40 and max(seen) == 40  # across three batches
        assert torch.equal(max(labels, key=len), torch.arange(40))
        seen.clear()
        alone = magicinit.init_(model, batches[1], forward=forward, seed=0, between=False)  # one batch, not a loader
        assert alone.settings["samples_used"] == 16 and max(seen) == 16
    finally:
        hook.remove()
