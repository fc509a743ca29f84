"""The one exception type of magicinit."""

from __future__ import annotations


class MagicInitError(RuntimeError):
    """Raised for input magicinit cannot work with.

    Messages name the layer (its qualified module name) or the argument at
    fault and say what to do instead. Whenever this error is raised the model
    has been restored to exactly the state it had before the call.
    """


MagicInitError.__module__ = "magicinit"  # where users import it from (tracebacks, pickling)
