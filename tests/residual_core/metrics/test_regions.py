"""Connected components: 8-connectivity within an image, never across images."""

import numpy as np
import pytest
import torch

from residual_core.metrics.regions import anomalous_pixel_regions, label_regions, labelled_pixel_regions


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


def _random_masks(seed: int, batch: int = 6, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.random((batch, size, size)) < rng.uniform(0.05, 0.6)
    masks[rng.random(batch) < 0.3] = False  # some normal images
    return masks


@pytest.mark.parametrize("seed", range(20))
def test_labels_numbered_per_image_give_the_batch_labelling(seed):
    """`label_regions` (each image apart, as decode tasks ship them) then `labelled_pixel_regions` gives
    the ids and sizes that labelling the binary batch gives, also for a subset of the images."""
    masks = _random_masks(seed)
    labels = label_regions(masks)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels > 0, masks)
    for rows in (slice(None), [0, 2, 5], [4, 1]):
        expected_region, expected_sizes = anomalous_pixel_regions(masks[rows])
        region, sizes, per_image = labelled_pixel_regions(torch.from_numpy(labels[rows]))
        np.testing.assert_array_equal(region.numpy(), expected_region)
        np.testing.assert_array_equal(sizes.numpy(), expected_sizes)
        assert per_image.tolist() == labels[rows].reshape(len(labels[rows]), -1).max(axis=1).tolist()


def test_over_255_regions_in_an_image_travel_as_int32():
    masks = np.zeros((2, 40, 40), dtype=bool)
    masks[1, ::2, ::2] = True  # 400 one-pixel regions
    labels = label_regions(masks)
    assert labels.dtype == np.int32 and labels.max() == 400
    region, sizes, _ = labelled_pixel_regions(torch.from_numpy(labels))
    expected_region, expected_sizes = anomalous_pixel_regions(masks)
    np.testing.assert_array_equal(region.numpy(), expected_region)
    np.testing.assert_array_equal(sizes.numpy(), expected_sizes)


def test_labels_of_an_all_normal_batch():
    labels = label_regions(np.zeros((3, 5, 5), dtype=bool))
    assert labels.dtype == np.uint8 and not labels.any()
    region, sizes, per_image = labelled_pixel_regions(torch.from_numpy(labels))
    assert region.numel() == 0 and sizes.tolist() == [0] and per_image.tolist() == [0, 0, 0]
