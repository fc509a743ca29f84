"""``python -m magicinit``: the ``magicinit`` command (``python -m magicinit demo`` runs the demo)."""

from .tools.cli import main

raise SystemExit(main())
