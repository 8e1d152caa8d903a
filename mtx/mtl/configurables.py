"""Registers every mtl factory with gin as ``mtl.<name>``; imported by the CLI.

The library itself never imports gin: ``mtx.mtl`` functions take plain
arguments. Gin files then write, e.g.::

    train.mtl_transforms = [@mtl.uncertainty_weighting(), @mtl.pcgrad()]
    mtl.uncertainty_weighting.num_tasks = 3
    mtl.pcgrad.reduction = 'mean'
"""

import gin

from mtx import mtl

for _name, _fn in sorted(mtl.METHODS.items()):
  gin.external_configurable(_fn, name=_name, module='mtl')
gin.external_configurable(mtl.masked, name='masked', module='mtl')
