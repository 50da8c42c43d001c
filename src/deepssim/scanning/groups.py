"""Patients, not only images: training images grouped by volume, folder or a key pattern.

``--group-by volume``: a NIfTI volume, a multi-frame file or a DICOM series folder is one group
(a 2D image file is its own group); ``folder``: the folder holding the image (a folder per patient
is a common layout); any other value is a regular expression with exactly one capturing group, which
takes the patient ID from each key, e.g. ``'sub-(\\d+)'``.
"""

from __future__ import annotations

import re

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.load import DICOM_SUFFIXES, ImageSet
from deepssim.scanning.decide import share


def group_of_each_image(images: ImageSet, group_by: str) -> list[str]:
    """The group (patient) of every image, in order."""
    if group_by == "volume":
        return [_volume(ref) for ref in images.refs]
    if group_by == "folder":
        return [ref.key.rsplit("/", 1)[0] if "/" in ref.key else "." for ref in images.refs]
    pattern = group_pattern(group_by)
    out = []
    for ref in images.refs:
        found = pattern.search(ref.key)
        if found is None:
            raise DeepSSIMError(f"--group-by '{group_by}' does not match the key {ref.key!r} ({ref.path})")
        if found.group(1) is None:
            raise DeepSSIMError(
                f"--group-by '{group_by}' matches the key {ref.key!r} ({ref.path}) without its group: "
                "the patient ID must come from the group for every key"
            )
        out.append(found.group(1))
    return out


def group_pattern(group_by: str) -> re.Pattern:
    """The compiled ``--group-by`` regex; DeepSSIMError (saying what to write) unless it compiles
    with exactly one capturing group."""
    try:
        pattern = re.compile(group_by)
    except re.error as error:
        raise DeepSSIMError(
            f"--group-by '{group_by}' is neither volume, folder nor a valid regex ({error})"
        ) from None
    if pattern.groups != 1:
        found = "no capturing group" if pattern.groups == 0 else f"{pattern.groups} capturing groups"
        raise DeepSSIMError(
            f"--group-by '{group_by}' has {found}; it needs exactly one, around the patient ID, e.g. "
            "'sub-(\\d+)' or '^(ants_r\\d+|[a-z]+)' (use (?:...) for any other group)"
        )
    return pattern


def _volume(ref) -> str:
    file_key = ref.key.split("#", 1)[0]
    single_dicom = ref.index is None and (ref.path.suffix.lower() in DICOM_SUFFIXES or not ref.path.suffix)
    if single_dicom:  # one file of a DICOM series: the series is its folder
        return file_key.rsplit("/", 1)[0] if "/" in file_key else "."
    return file_key


def group_summary(groups: list[str], memorised: np.ndarray) -> tuple[dict, list[dict]]:
    """Per group: images and images with a Duplicate; overall: groups with at least one, with a
    95% Wilson interval. ``memorised``: (N,) bool, training images with a Duplicate."""
    names = sorted(set(groups))
    index = {name: i for i, name in enumerate(names)}
    rows = np.array([index[g] for g in groups])
    images = np.bincount(rows, minlength=len(names))
    hit = np.bincount(rows, weights=memorised.astype(float), minlength=len(names)).astype(int)
    table = [
        {"group": name, "training_images": int(images[i]), "images_with_a_duplicate": int(hit[i])}
        for i, name in enumerate(names)
    ]
    table.sort(key=lambda row: (-row["images_with_a_duplicate"], row["group"]))
    return share(int((hit > 0).sum()), len(names)), table
