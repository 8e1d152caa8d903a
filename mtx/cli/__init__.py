"""The command line: ``mtx train|eval|infer|compile`` and the gin edge (configurables, settings objects)."""
