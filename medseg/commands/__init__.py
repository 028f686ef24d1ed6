"""Sub-commands of the ``medseg`` CLI, one module each (see :mod:`medseg.cli`)."""
