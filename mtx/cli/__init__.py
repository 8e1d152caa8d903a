"""The command line: ``mtx train|eval|infer|compile``, and gin's edge (every configurable
is registered in ``configurables``; the settings objects are ``mtx.train.settings``)."""
