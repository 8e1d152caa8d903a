"""mtx's gin files, installed with the package (``pip install .``) so that
``mtx train --gin_file=gin_configs/demo.gin`` works from any directory."""
