"""``python -m mtx train ...`` is the same as ``mtx train ...``."""
from mtx.train.cli import main

main()
