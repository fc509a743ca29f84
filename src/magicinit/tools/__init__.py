"""The tools around the method: the ``magicinit`` command, the demo, built-in nets, data-file readers,
figures and baseline initializations.

The library itself (``magicinit``) never imports this package; the command
line, the demo and ``bench/`` do.
"""
