"""``python -m magicinit``: the demo on built-in defaults."""

from .demo import main

main()
