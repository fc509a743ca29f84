"""magicinit.lightning.MagicInitCallback with a real Lightning Trainer on the CPU: a fit starts from the
initialized weights (measured here, by hooks); a resumed fit, and a module restored by load_from_checkpoint, keep
the checkpoint's weights; an unmarked module is refused; a seeded run sees the same batches with the callback."""

from __future__ import annotations

import copy
import gc
import random
import weakref

import numpy
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import magicinit  # noqa: E402
from conftest import channel_stats, first_call_outputs, state_copy  # noqa: E402
from magicinit.lightning import MagicInitCallback, mark_untrained  # noqa: E402


class PlainNet(pl.LightningModule):
    """A plain 6-layer ReLU CNN without normalization."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 6, 6, generator=generator), torch.randint(0, 4, (96,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


class AtTrainStart(pl.Callback):
    """Records the module's weights, and every conv's channel statistics on ``x``, when training starts
    (after every on_fit_start, before any optimizer step)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.weights: dict[str, torch.Tensor] = {}
        self.channel_std: list[torch.Tensor] = []
        self.channel_mean: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = state_copy(pl_module)
        modules = dict(pl_module.named_modules())
        stats = [
            channel_stats(modules[name], output)
            for name, output in first_call_outputs(pl_module, self.x).items()
            if isinstance(modules[name], nn.Conv2d)
        ]
        self.channel_mean = [mean for mean, _ in stats]
        self.channel_std = [std for _, std in stats]


def _trainer(tmp_path, callbacks: list[pl.Callback], **options: object) -> pl.Trainer:
    settings = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    return pl.Trainer(**{**settings, **options})


def test_a_fit_starts_from_weights_with_unit_channels(tmp_path) -> None:
    torch.manual_seed(1)
    module, loader = mark_untrained(PlainNet()), _loader()
    init_data = torch.cat([x for x, _ in loader])  # 96 samples: all of them are init data (samples=256)
    probe = AtTrainStart(init_data)
    callback = MagicInitCallback(between=False)
    _trainer(tmp_path, [callback, probe]).fit(module, loader)
    assert callback.initialized and callback.report is not None
    for mean, std in zip(probe.channel_mean, probe.channel_std):  # Part 1: every channel mean 0, std 1
        torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-3)


def test_the_fit_starts_from_what_init_gives_on_the_train_data(tmp_path) -> None:
    torch.manual_seed(2)
    module, loader = mark_untrained(PlainNet()), _loader()
    direct = copy.deepcopy(module)
    magicinit.init_(direct, loader, seed=0)
    probe = AtTrainStart(torch.zeros(1, 3, 6, 6))
    callback = MagicInitCallback()  # seed 0 by default
    _trainer(tmp_path, [callback, probe]).fit(module, loader)
    assert callback.report.rate_spread_before > 2 * callback.report.rate_spread_after
    for name, tensor in direct.state_dict().items():
        torch.testing.assert_close(probe.weights[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("first_fit_initialized", [True, False])
def test_a_resumed_fit_keeps_the_checkpoint_weights(tmp_path, first_fit_initialized: bool) -> None:
    # without the callback in the first fit, the checkpoint holds no callback state: the resume alone counts
    torch.manual_seed(3)
    trainer = _trainer(tmp_path, [MagicInitCallback()] if first_fit_initialized else [])
    trainer.fit(mark_untrained(PlainNet()), _loader())
    checkpoint = tmp_path / "after-one-epoch.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]

    resumed_module = PlainNet()  # fresh random weights, which the checkpoint replaces
    probe = AtTrainStart(torch.zeros(1, 3, 6, 6))
    second = MagicInitCallback()
    _trainer(tmp_path, [second, probe], max_epochs=2).fit(resumed_module, _loader(), ckpt_path=checkpoint)
    assert second.report is None and second.initialized == first_fit_initialized
    for name, tensor in saved.items():  # training resumed from exactly the checkpoint's weights
        torch.testing.assert_close(probe.weights[name], tensor, rtol=0, atol=0)


class MarkedNet(PlainNet):
    """PlainNet that marks its weights untrained as the last line of ``__init__``."""

    def __init__(self) -> None:
        super().__init__()
        mark_untrained(self)


def _trained_checkpoint(tmp_path, module_class: type[PlainNet], callbacks: list[pl.Callback]):
    """Fits a new ``module_class`` for an epoch, saves a checkpoint, and drops every object of that fit (checked):
    only the file is left, as in a new process. Returns the file and the state dict it holds."""
    module = mark_untrained(module_class())
    trainer = _trainer(tmp_path, callbacks)
    trainer.fit(module, _loader())
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    module_left = weakref.ref(module)
    del module, trainer, callbacks
    gc.collect()
    assert module_left() is None
    return checkpoint, torch.load(checkpoint, weights_only=False)["state_dict"]


@pytest.mark.parametrize("first_fit_initialized", [True, False])
def test_a_module_restored_by_load_from_checkpoint_keeps_its_weights(tmp_path, first_fit_initialized: bool) -> None:
    # without the callback in the first fit, the checkpoint holds nothing of magicinit: it loads all the same
    torch.manual_seed(8)
    checkpoint, saved = _trained_checkpoint(tmp_path, MarkedNet, [MagicInitCallback()] if first_fit_initialized else [])
    restored = MarkedNet.load_from_checkpoint(checkpoint)  # strict: the checkpoint has no key the module lacks
    probe = AtTrainStart(torch.zeros(1, 3, 6, 6))
    second = MagicInitCallback()
    _trainer(tmp_path, [second, probe]).fit(restored, _loader())  # a new fit, not a resumed one
    assert second.report is None and not second.initialized
    for name, tensor in saved.items():  # training went on from exactly the checkpoint's weights
        torch.testing.assert_close(probe.weights[name], tensor, rtol=0, atol=0)


def test_an_unmarked_module_is_refused_with_the_remedy(tmp_path) -> None:
    torch.manual_seed(9)
    checkpoint, saved = _trained_checkpoint(tmp_path, PlainNet, [MagicInitCallback()])
    restored = PlainNet.load_from_checkpoint(checkpoint)  # looks just like PlainNet()
    with pytest.raises(
        magicinit.MagicInitError,
        match=r"PlainNet is not marked untrained, and a module restored by PlainNet.load_from_checkpoint\(...\) "
        r"looks just like a new one.*mark_untrained\(module\) before trainer.fit.*"
        r"leave MagicInitCallback out of a fit that starts from trained weights",
    ):
        _trainer(tmp_path, [MagicInitCallback()]).fit(restored, _loader())
    for name, tensor in saved.items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=0, atol=0)


class Augmented(Dataset):
    """96 samples, each with noise drawn from torch's, Python's and numpy's global generators when it is read,
    as random augmentations draw."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 3, 6, 6, generator=generator)
        self.y = torch.randint(0, 4, (96,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.rand(()) + random.random() + float(numpy.random.rand())
        return self.x[index] + noise, self.y[index]


class FirstBatches(pl.Callback):
    """Records the batches of epoch 0 as training gets them."""

    def __init__(self) -> None:
        self.batches: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 0:
            self.batches.append([tensor.clone() for tensor in batch])


def _first_batches_of_a_seeded_run(tmp_path, callbacks: list[pl.Callback], loader_options: dict[str, object]):
    pl.seed_everything(10)
    module = mark_untrained(PlainNet())
    loader = DataLoader(Augmented(), batch_size=16, shuffle=True, **loader_options)
    recorder = FirstBatches()
    _trainer(tmp_path, [*callbacks, recorder], limit_train_batches=3, enable_checkpointing=False).fit(module, loader)
    return recorder.batches


@pytest.mark.parametrize(
    "loader_options",
    [
        pytest.param(dict, id="global-generators"),
        pytest.param(lambda: {"generator": torch.Generator().manual_seed(3)}, id="own-generator"),
        pytest.param(
            lambda: {"num_workers": 1, "persistent_workers": True}, marks=pytest.mark.slow, id="persistent-workers"
        ),
    ],
)
def test_a_seeded_run_sees_the_same_batches_with_the_callback(tmp_path, loader_options) -> None:
    without = _first_batches_of_a_seeded_run(tmp_path, [], loader_options())
    callback = MagicInitCallback(samples=32)  # reads two of the shuffled loader's batches
    with_callback = _first_batches_of_a_seeded_run(tmp_path, [callback], loader_options())
    assert callback.report is not None and len(without) == len(with_callback) == 3
    for batch, batch_with_callback in zip(without, with_callback):
        for tensor, tensor_with_callback in zip(batch, batch_with_callback):
            torch.testing.assert_close(tensor_with_callback, tensor, rtol=0, atol=0)


def test_a_second_fit_does_not_initialize_again(tmp_path) -> None:
    torch.manual_seed(4)
    module, callback = mark_untrained(PlainNet()), MagicInitCallback()
    _trainer(tmp_path, [callback]).fit(module, _loader())
    trained = state_copy(module)
    probe = AtTrainStart(torch.zeros(1, 3, 6, 6))
    _trainer(tmp_path, [callback, probe]).fit(module, _loader())
    for name, tensor in trained.items():
        torch.testing.assert_close(probe.weights[name], tensor, rtol=0, atol=0)


def test_the_same_callback_initializes_a_new_module(tmp_path) -> None:
    torch.manual_seed(6)
    callback = MagicInitCallback(between=False)
    _trainer(tmp_path, [callback]).fit(mark_untrained(PlainNet()), _loader())
    fresh, loader = mark_untrained(PlainNet()), _loader()
    probe = AtTrainStart(torch.cat([x for x, _ in loader]))
    _trainer(tmp_path, [callback, probe]).fit(fresh, loader)
    torch.testing.assert_close(probe.channel_std[-1], torch.ones_like(probe.channel_std[-1]), rtol=1e-3, atol=1e-3)


class LateRestoring(pl.strategies.SingleDeviceStrategy):
    """Restores checkpoints after on_fit_start, as FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_a_strategy_that_restores_after_setup_is_refused_with_the_remedy(tmp_path) -> None:
    module = mark_untrained(PlainNet())
    before = state_copy(module)
    trainer = _trainer(
        tmp_path,
        [MagicInitCallback()],
        strategy=LateRestoring(device=torch.device("cpu")),
        accelerator="cpu",
        devices=1,
    )
    with pytest.raises(
        magicinit.MagicInitError,
        match=r"LateRestoring strategy .* magicinit.init_\(module, data\) "
        r"before trainer.fit",
    ):
        trainer.fit(module, _loader())
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_init_data_given_to_the_callback_is_used(tmp_path) -> None:
    torch.manual_seed(5)
    module, own = mark_untrained(PlainNet()), 3.0 + 2.0 * torch.randn(64, 3, 6, 6)  # not the train data's distribution
    probe = AtTrainStart(own)
    _trainer(tmp_path, [MagicInitCallback(own, between=False), probe]).fit(module, _loader())
    torch.testing.assert_close(probe.channel_std[0], torch.ones_like(probe.channel_std[0]), rtol=1e-3, atol=1e-3)


def test_an_unknown_option_names_itself() -> None:
    with pytest.raises(TypeError, match=r"'sampels' is not an option of magicinit.init_ \(it takes sampler, "):
        MagicInitCallback(sampels=512)


class SaveWeightsAtTrainStart(pl.Callback):
    """Each rank saves its module's weights when training starts."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(
            {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            self.folder / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
@pytest.mark.parametrize("between", [False, True])
def test_ddp_ranks_share_statistics_and_start_from_the_same_weights(tmp_path, between: bool) -> None:
    """Two CPU processes (ddp_spawn, gloo), each with half the train data: both start training from the same
    weights; with Part 1 alone, those of Part 1 on all the data in one process (the statistics were shared)."""
    torch.manual_seed(7)
    module, loader = mark_untrained(PlainNet()), _loader()
    single, drawn = copy.deepcopy(module), state_copy(module)
    magicinit.init_(single, loader, seed=0, between=between)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[MagicInitCallback(between=between), SaveWeightsAtTrainStart(tmp_path)],
    )
    trainer.fit(module, loader)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        if not between:  # Part 2's noise is drawn per rank: the same estimate, not the same numbers
            torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-5)
        assert not torch.equal(ranks[0][name], drawn[name]), name  # initialized, not torch's draw
