"""Connected components: 8-connectivity within an image, never across images."""

import numpy as np
import pytest

from residual_core.metrics.regions import anomalous_pixel_regions


def test_diagonal_pixels_join_and_images_stay_apart():
    masks = np.zeros((3, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 4, 4] = True  # a second, one-pixel region
    masks[2, 0, 0] = masks[2, 1, 1] = True  # same pattern in another image: separate region
    regions, sizes = anomalous_pixel_regions(masks)
    assert sizes.tolist() == [0, 2, 1, 2]
    # flat order of masks[masks]: (0,0,0), (0,1,1), (0,4,4), (2,0,0), (2,1,1)
    assert regions.tolist() == [1, 1, 2, 3, 3]


def test_all_normal_batch_and_bad_shape():
    regions, sizes = anomalous_pixel_regions(np.zeros((2, 4, 4), dtype=bool))
    assert regions.size == 0 and sizes.tolist() == [0]
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        anomalous_pixel_regions(np.zeros((4, 4), dtype=bool))
