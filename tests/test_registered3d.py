"""3D rigid transforms for registered 3D SSIM (the search itself is work in progress, issue 28)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from deepssim.ssim import registered3d as r3
from deepssim.ssim.volume import ssim3d


def test_torch_warp_matches_apply_rigid_and_the_inverse_undoes_it(rng):
    volume = ndimage.gaussian_filter(rng.normal(size=(20, 24, 22)), 2)
    tensor = torch.from_numpy(volume.astype(np.float32))[None, None]
    for flips, rotation, shift in (
        ((False,) * 3, (10, 0, 0), (2, 0, 0)),
        ((True, False, True), (5, -4, 3), (1, 2, -1)),
    ):
        expected = r3.apply_rigid(volume, flips, rotation, shift, order=1)
        theta = r3._theta(volume.shape, flips, np.array([rotation], float), np.array([shift], float))
        got = r3._warp(tensor, theta, float(volume.min()))[0, 0].numpy()
        assert np.abs(got - expected)[3:-3, 3:-3, 3:-3].max() < 1e-5
    smooth = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2.5)
    moved = r3.apply_rigid(smooth, (False,) * 3, (8, -5, 6), (4, -3, 5))
    inverse = r3.rotation_matrix((8, -5, 6)).T
    angles = (
        np.degrees(np.arctan2(inverse[2, 1], inverse[2, 2])),
        -np.degrees(np.arcsin(inverse[2, 0])),
        np.degrees(np.arctan2(inverse[1, 0], inverse[0, 0])),
    )
    back = r3.apply_rigid(moved, (False,) * 3, angles, -inverse @ np.array([4.0, -3.0, 5.0]))
    inner = (slice(10, -10),) * 3
    assert ssim3d(smooth[inner], back[inner]) > 0.999
