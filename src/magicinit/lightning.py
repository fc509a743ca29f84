"""PyTorch Lightning integration: initialize a ``LightningModule`` when its fit starts.

``pip install 'magicinit[lightning]'``, then::

    from magicinit.lightning import MagicInitCallback

    trainer = lightning.Trainer(callbacks=[MagicInitCallback(samples=512)])
    trainer.fit(module, train_loader)      # initialized from train_loader, then trained
    trainer.fit(module, train_loader, ckpt_path="last")   # resumed: left as the checkpoint has it

The callback works with ``lightning`` (``lightning.pytorch``) or, where only
that is installed, the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

import weakref
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
except ImportError:  # the package's older name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities.rank_zero import rank_zero_info
    except ImportError as error:
        raise ImportError("magicinit.lightning needs PyTorch Lightning: pip install 'magicinit[lightning]'") from error

from ._core.errors import MagicInitError
from ._core.initialize import init_
from ._core.options import KEYWORDS
from ._core.report import Report

__all__ = ["MagicInitCallback"]


class MagicInitCallback(pl.Callback):
    """Runs ``magicinit.init_`` on the ``LightningModule`` at the start of ``Trainer.fit``.

    The init data is the fit's train dataloader (its first ``samples`` samples,
    256 by default) unless ``data`` is given. With several processes (DDP),
    every rank reads its own part of the data and the statistics are those of
    all ranks together (``init_``'s ``process_group="default"``), with one
    seed, so all ranks end with the same weights. A fit that resumes from a
    checkpoint (``trainer.fit(..., ckpt_path=...)``) is left alone, and so is a
    module this callback already initialized (a second ``fit``). The report
    goes to Lightning's console on rank zero (``rank_zero_info``), its rate
    spreads to the trainer's loggers (``magicinit/rate_spread_before``,
    ``magicinit/rate_spread_after``), and it is kept as ``self.report``.

    Strategies that shard or wrap the parameters before ``on_fit_start`` and
    restore checkpoints after it (FSDP, DeepSpeed, model parallel) are refused
    with an error: initialize the module with ``magicinit.init_`` before
    ``fit`` there.

    Args:
        data: the init data (a tensor, a list of batches or a DataLoader); None
            takes the fit's train dataloader.
        seed: the seed of the filters and the noise (default 0: the same weights
            on every run); None draws it from torch's global generator (of rank
            zero, with several processes).
        **init_options: passed to ``magicinit.init_`` (``samples``, ``sampler``,
            ``forward``, ``skip``, ``scale_mode``, ...).

    Example:
        >>> trainer = lightning.Trainer(callbacks=[MagicInitCallback(samples=512)])  # doctest: +SKIP
    """

    def __init__(self, data: Any = None, *, seed: int | None = 0, **init_options: Any) -> None:
        unknown = sorted(set(init_options) - set(KEYWORDS))
        if unknown:
            raise TypeError(
                f"MagicInitCallback: {', '.join(map(repr, unknown))} is not an option of magicinit.init_ "
                f"(it takes {', '.join(name for name in KEYWORDS if name != 'seed')})"
            )
        self.data = data
        self.init_options: dict[str, Any] = {"seed": seed, **init_options}
        self.report: Report | None = None
        self.initialized = False  # by this callback, or (restored from a checkpoint) by the run that saved it
        self._module: weakref.ref[pl.LightningModule] | None = None  # the module it initialized

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialize ``pl_module`` unless the fit resumes or this callback initialized it before."""
        if trainer.strategy.restore_checkpoint_after_setup:
            raise MagicInitError(
                f"MagicInitCallback: the {type(trainer.strategy).__name__} strategy shards or wraps the parameters "
                "before on_fit_start and restores checkpoints after it; initialize the module with "
                "magicinit.init_(module, data) before trainer.fit instead"
            )
        resumed = trainer.ckpt_path is not None
        if resumed or (self._module is not None and self._module() is pl_module):
            why = f"the fit resumes from {trainer.ckpt_path}" if resumed else "this callback initialized it before"
            rank_zero_info(f"magicinit: not initializing {type(pl_module).__name__}: {why}")
            return
        data = self.data if self.data is not None else _train_dataloader(trainer)
        self.report = init_(pl_module, data, **self.init_options)
        self.initialized, self._module = True, weakref.ref(pl_module)
        rank_zero_info(f"magicinit: initialized {type(pl_module).__name__}\n{self.report}")
        metrics = {
            f"magicinit/{name}": value
            for name in ("rate_spread_before", "rate_spread_after")
            if (value := getattr(self.report, name)) is not None
        }
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the callback: whether it initialized the module."""
        return {"initialized": self.initialized}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a checkpoint whether the run that saved it initialized its module (informative: a
        resumed fit is never initialized again)."""
        self.initialized = self.initialized or bool(state_dict.get("initialized", False))


def _train_dataloader(trainer: pl.Trainer) -> Any:
    """The fit's train dataloader, loaded now if the fit loop has not yet (as Lightning itself does
    for ``estimated_stepping_batches``)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    loader = trainer.train_dataloader
    if loader is None or isinstance(loader, (dict, list, tuple)):
        found = "no" if loader is None else f"{len(loader)}"
        raise MagicInitError(
            f"MagicInitCallback: the fit has {found} train dataloaders, not one; pass the init "
            "data as MagicInitCallback(data=...)"
        )
    return loader
