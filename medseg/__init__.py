"""medseg: medical image segmentation on MONAI and PyTorch.

Three entry points share one data path (see ``docs`` in the README):
``medseg train`` (training), ``medseg predict`` (batch inference over scanner exports) and
``medseg serve`` (PACS-adjacent REST service).
"""

__version__ = "0.1.0"
