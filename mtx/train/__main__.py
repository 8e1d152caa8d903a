"""``python -m mtx.train --gin_file=...`` is the same as ``mtx train --gin_file=...``."""
import sys

from mtx.train.cli import COMMANDS, main

args = sys.argv[1:]
main(args if args and args[0] in COMMANDS else ["train"] + args)
