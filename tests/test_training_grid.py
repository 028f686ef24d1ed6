"""Training sees what inference sees: the training chain (MONAI LoadImaged -> Orientationd ->
Spacingd -> normalisation) and the Predictor's path (medseg.io -> ModelGrid -> normalisation)
give the same model-grid array for real cases, within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medseg.data.transforms import preprocessing
from medseg.io import read_image
from medseg.package import Normalization
from medseg.preprocess import ModelGrid, normalize_intensity
from tests.conftest import shared_path


@pytest.mark.parametrize("case", ["hippocampus_001", "hippocampus_017", "hippocampus_204"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.3, 0.9, 1.1)])
def test_training_chain_and_model_grid_agree(case, spacing):
    image_path = shared_path("hippocampus", "imagesTr", f"{case}.nii.gz")
    label_path = shared_path("hippocampus", "labelsTr", f"{case}.nii.gz")
    normalization = Normalization(scheme="zscore")
    trained = Compose(preprocessing(spacing, normalization))({"image": str(image_path), "label": str(label_path)})[
        "image"
    ]
    image = read_image(image_path)
    grid = ModelGrid(image.shape, image.affine, spacing, "RAS")
    model_input = grid.to_model(torch.as_tensor(image.array[None], dtype=torch.float32))
    model_input[0] = normalize_intensity(model_input[0], normalization)
    trained = torch.as_tensor(trained).float()
    assert tuple(trained.shape) == tuple(model_input.shape)
    np.testing.assert_allclose(model_input, trained.numpy(), atol=1e-5, rtol=0)
