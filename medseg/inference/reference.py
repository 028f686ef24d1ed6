"""The MONAI-only reference pipeline the Predictor is checked and benchmarked against.

What a MONAI user writes for the same model card (as a MONAI bundle's inference config would):
``Orientation`` + ``Spacing`` (a ``Compose`` that records its operations), intensity
normalisation, :func:`monai.inferers.sliding_window_inference` driving the network in eager
PyTorch under ``torch.no_grad``, softmax, ``Compose.inverse`` on the probabilities (MONAI's
``Invertd`` mechanism), argmax. It shares no code with :class:`~medseg.inference.Predictor`
beyond the card's normalisation function, so agreement between the two is evidence.
"""

from __future__ import annotations

import numpy as np
import torch

from medseg.io.image import Image
from medseg.package import ModelCard
from medseg.preprocess import RAS_LABELS, normalize_intensity


def monai_reference(
    network: torch.nn.Module, card: ModelCard, image: Image, overlap: float | None = None, sw_batch_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Segment a single-channel 3D ``image`` the plain MONAI way.

    Returns:
        ``(labels, probabilities)``: class indices ``(I, J, K)`` (int64) and float32
        probabilities ``(K, I, J, K)``, both on the input grid.
    """
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, Orientation, Spacing

    preprocess = Compose(
        [Orientation(axcodes=card.orientation, labels=RAS_LABELS), Spacing(pixdim=card.spacing, mode="bilinear")]
    )
    source = MetaTensor(
        torch.from_numpy(np.asarray(image.array, dtype=np.float32)[None]), affine=torch.as_tensor(image.affine)
    )
    model_grid = preprocess(source)
    normalized = normalize_intensity(model_grid.as_tensor(), card.normalization)
    with torch.no_grad():
        logits = sliding_window_inference(
            normalized[None],
            tuple(card.patch_size),
            sw_batch_size,
            network.eval(),
            card.overlap if overlap is None else overlap,
            "gaussian",
        )[0]
    probabilities = MetaTensor(
        torch.softmax(logits.as_tensor() if isinstance(logits, MetaTensor) else logits, dim=0),
        meta=model_grid.meta,
        applied_operations=model_grid.applied_operations,
    )
    restored = preprocess.inverse(probabilities)
    restored = restored.as_tensor().float()
    return restored.argmax(0).numpy(), restored.numpy()
