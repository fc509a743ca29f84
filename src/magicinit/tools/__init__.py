"""The tools around the method: the ``magicinit`` command, the demo, built-in nets, data-file readers,
figures and baseline initializations.

The library itself (``magicinit`` and ``magicinit._core``) never imports this
package; it serves the command line, the demo, ``bench/``, ``examples/`` and
the tests.
"""
