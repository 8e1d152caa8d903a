"""``python -m mtx train ...`` is the same as ``mtx train ...``."""

from mtx.cli.main import main

main()
