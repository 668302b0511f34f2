"""The test helpers themselves, where a wrong helper would make other tests pass or fail for the wrong reason."""
import numpy as np
from helpers import center_crop_resize


def test_center_crop_resize_keeps_the_centre():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 150:450] = 255  # the central square is white, the sides black
    out = center_crop_resize(image, 100)
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    assert out.min() == 255
