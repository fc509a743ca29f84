"""PyTorch Lightning integration: initialize a ``LightningModule`` when its fit starts.

``pip install 'magicinit[lightning]'``, then::

    from magicinit.lightning import MagicInitCallback, mark_untrained

    module = mark_untrained(Classifier())  # or mark_untrained(self) at the end of Classifier.__init__
    trainer = lightning.Trainer(callbacks=[MagicInitCallback(samples=512)])
    trainer.fit(module, train_loader)      # initialized from train_loader, then trained
    trainer.fit(module, train_loader, ckpt_path="last")   # resumed: left as the checkpoint has it

The callback initializes only a module marked by ``mark_untrained`` whose
weights are still those it marked: a module restored by
``Classifier.load_from_checkpoint(path)`` looks just like a new one, so an
unmarked module is refused with an error rather than risk replacing trained
weights, and a module whose weights changed since it was marked (trained, or
loaded after ``mark_untrained(self)`` in ``__init__``) is left as it is.

The callback works with ``lightning`` (``lightning.pytorch``) or, where only
that is installed, the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import random
import weakref
from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import torch
from torch import nn
from torch.nn.parameter import is_lazy

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

__all__ = ["MagicInitCallback", "mark_untrained"]

ModuleType = TypeVar("ModuleType", bound=nn.Module)

# The attribute mark_untrained sets on a module: the digest of its weights when it was marked.
UNTRAINED_MARK = "_magicinit_untrained_weights"


def mark_untrained(module: ModuleType) -> ModuleType:
    """Mark ``module``'s weights as new (untrained), so that ``MagicInitCallback`` may initialize it.

    The mark is a digest of the module's parameters, kept on the module as the attribute
    ``_magicinit_untrained_weights`` (it travels with the module to DDP processes and through
    ``copy.deepcopy``); nothing else of the module changes. ``MagicInitCallback`` initializes a module
    only while its weights are still the ones marked: once they change (trained, or loaded by
    ``load_state_dict``), the mark no longer holds and the callback leaves the module as it is.

    Call it on a new module before ``trainer.fit``, or as the last line of the module's ``__init__``:
    then ``Module.load_from_checkpoint(path)``, which builds the module and then loads the checkpoint's
    weights, gives a module whose weights differ from the marked ones, and the callback keeps them. Lazy
    layers (``nn.LazyLinear``) that a forward call builds before the fit count as changed: mark the module
    after that call.

    Args:
        module: the module whose current weights are new.

    Returns:
        ``module`` itself, marked.

    Example:
        >>> module = mark_untrained(Classifier())  # doctest: +SKIP
    """
    object.__setattr__(module, UNTRAINED_MARK, _weights_digest(module))
    return module


def _weights_digest(module: nn.Module) -> str:
    """A digest of the names, dtypes, shapes and bytes of ``module``'s parameters (not its buffers: a forward
    call in training mode changes batch norm's running statistics, and leaves the weights new)."""
    digest = hashlib.sha256()
    for name, tensor in module.named_parameters():
        if is_lazy(tensor) or tensor.is_meta:
            digest.update(f"{name}:no values;".encode())
            continue
        flat = tensor.detach()
        flat = flat.to_dense() if flat.layout != torch.strided else flat
        digest.update(f"{name}:{flat.dtype}:{tuple(flat.shape)};".encode())
        digest.update(flat.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


WeightsState = Literal["untrained", "changed", "unmarked"]


def _weights_state(module: nn.Module) -> WeightsState:
    """Whether ``module``'s weights are those ``mark_untrained`` marked, changed since, or never marked."""
    marked = getattr(module, UNTRAINED_MARK, None)
    if marked is None:
        return "unmarked"
    return "untrained" if marked == _weights_digest(module) else "changed"


@contextlib.contextmanager
def _random_state_kept(generators: list[torch.Generator]) -> Iterator[None]:
    """Restores on exit the global random generators (torch's, CUDA's where in use, Python's, numpy's) and
    ``generators``, so that reading the train dataloader and initializing leave a seeded run's batches as
    they were."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    python_state = random.getstate()
    own_states = [generator.get_state() for generator in generators]
    try:
        import numpy
    except ImportError:  # pragma: no cover - Lightning depends on numpy
        numpy_state = None
    else:
        numpy_state = numpy.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(python_state)
        for generator, state in zip(generators, own_states):
            generator.set_state(state)
        if numpy_state is not None:
            numpy.random.set_state(numpy_state)


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a DataLoader draws its order and worker seeds from, where it has its own."""
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    found = [getattr(owner, "generator", None) for owner in (loader, sampler, inner)]
    unique = {id(generator): generator for generator in found if isinstance(generator, torch.Generator)}
    return list(unique.values())


def _reading_copy(loader: Any) -> Any:
    """What the callback reads the init data from: ``loader`` itself, or, where it keeps its workers between
    epochs (``persistent_workers=True``), a shallow copy that starts workers of its own for this reading and
    stops them after: the loader's workers, and the batches they may have loaded ahead for epoch 0, stay
    untouched."""
    if not (isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers):
        return loader
    reader = copy.copy(loader)
    # DataLoader refuses to set persistent_workers once built; the copy is the callback's own
    reader.__dict__.update(persistent_workers=False, _iterator=None)
    return reader


class MagicInitCallback(pl.Callback):
    """Runs ``magicinit.init_`` on the ``LightningModule`` at the start of ``Trainer.fit``.

    The init data is the fit's train dataloader (its first ``samples`` samples,
    256 by default) unless ``data`` is given. With several processes (DDP),
    every rank reads its own part of the data and the statistics are those of
    all ranks together (``init_``'s ``process_group="default"``), with one
    seed, so all ranks end with the same weights. Reading the data and
    initializing leave the global random generators (torch's, Python's,
    numpy's) as they were: a seeded run sees the same batches with and without
    the callback.

    Which modules it initializes: only a module marked by ``mark_untrained``
    whose weights are still those it marked. A module restored by
    ``Module.load_from_checkpoint(path)`` cannot be told from a new one, so an
    unmarked module is refused with a ``MagicInitError`` (mark it if it is new,
    leave the callback out if its weights are trained); a marked module whose
    weights changed since (trained, or restored after ``mark_untrained(self)``
    in its ``__init__``) is left as it is. A fit that resumes from a
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
        >>> trainer.fit(mark_untrained(Classifier()), train_loader)  # doctest: +SKIP
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
        # the weights' state as the fit's setup found them, before the strategy moves or converts them
        self._weights_state: tuple[weakref.ref[pl.LightningModule], WeightsState] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check, before the strategy moves or converts the module, whether its weights are still the ones
        ``mark_untrained`` marked."""
        if stage == "fit":
            self._weights_state = (weakref.ref(pl_module), _weights_state(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialize ``pl_module`` if it is marked untrained and its weights are still the marked ones, unless
        the fit resumes or this callback initialized it before; refuse an unmarked module."""
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
        module_name = type(pl_module).__name__
        if self._weights_state is not None and self._weights_state[0]() is pl_module:
            state = self._weights_state[1]
        else:  # on_fit_start called without setup
            state = _weights_state(pl_module)
        if state == "unmarked":
            raise MagicInitError(
                f"MagicInitCallback: {module_name} is not marked untrained, and a module restored by "
                f"{module_name}.load_from_checkpoint(...) looks just like a new one, so initializing it could replace "
                "trained weights; mark a new module with magicinit.lightning.mark_untrained(module) before "
                "trainer.fit (or call mark_untrained(self) as the last line of its __init__, which also keeps the "
                "weights of a restored one), or leave MagicInitCallback out of a fit that starts from trained weights"
            )
        if state == "changed":
            rank_zero_info(
                f"magicinit: not initializing {module_name}: its weights changed since mark_untrained marked them "
                "(trained, or loaded from a checkpoint); they are kept"
            )
            return
        data = self.data if self.data is not None else _train_dataloader(trainer)
        with _random_state_kept(_loader_generators(data)):
            self.report = init_(pl_module, _reading_copy(data), **self.init_options)
        self.initialized, self._module = True, weakref.ref(pl_module)
        rank_zero_info(f"magicinit: initialized {module_name}\n{self.report}")
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
