"""The method's internals; the public API is what ``magicinit/__init__.py`` exports.

Nothing here is a stable interface: modules, names and signatures may change
between releases. Each part of the method has its own module (see
docs/method.md): ``within`` (Part 1), ``rates`` and ``between`` with ``graph``
(Part 2), ``samplers`` (Part 3), ``diagnose`` (Part 4); ``initialize`` holds
the entry points, ``session`` and ``context`` what every call works with.
"""
