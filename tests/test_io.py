"""Geometry round trips for every format, normalisation choices, and one-line read errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medico_adapters.errors import ImageError
from medico_adapters.io import WINDOWS, Geometry, normalise, read_image, write_mask

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-10.0, 20.5, 3.0)
# a rotation about z, so direction is not the identity
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _volume(shape=(5, 12, 10), seed=0) -> sitk.Image:
    data = np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _assert_geometry(geom: Geometry, ref: sitk.Image, tol=1e-4):
    assert geom.size == ref.GetSize()
    np.testing.assert_allclose(geom.spacing, ref.GetSpacing(), atol=tol)
    np.testing.assert_allclose(geom.origin, ref.GetOrigin(), atol=tol)
    np.testing.assert_allclose(geom.direction, ref.GetDirection(), atol=tol)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_round_trip(tmp_path, suffix):
    ref = _volume()
    src = tmp_path / f"vol{suffix}"
    sitk.WriteImage(ref, str(src))
    loaded = read_image(src)
    assert loaded.is_volume and loaded.array.shape == (5, 12, 10)
    np.testing.assert_array_equal(loaded.array, sitk.GetArrayFromImage(ref))
    _assert_geometry(loaded.geometry, ref)

    mask = (loaded.array > 0).astype(np.uint8)
    out = write_mask(mask, tmp_path / f"mask{suffix}", loaded.geometry)
    back = sitk.ReadImage(str(out))
    _assert_geometry(Geometry.of(back), ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)


def test_dicom_series_round_trip(tmp_path):
    ref = _volume(shape=(4, 16, 16))
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # DICOM writers keep axis-aligned slices exactly
    folder = tmp_path / "series"
    folder.mkdir()
    _write_dicom_series(ref, folder)
    loaded = read_image(folder)
    assert loaded.array.shape == (4, 16, 16)
    np.testing.assert_array_equal(loaded.array, sitk.GetArrayFromImage(ref))
    _assert_geometry(loaded.geometry, ref, tol=1e-3)
    out = write_mask(np.ones((4, 16, 16), np.uint8), tmp_path / "mask.nrrd", loaded.geometry)
    _assert_geometry(Geometry.of(sitk.ReadImage(str(out))), ref, tol=1e-3)


def _write_dicom_series(image: sitk.Image, folder, skip=()):
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    direction = image.GetDirection()
    for z in range(image.GetDepth()):
        if z in skip:
            continue
        sl = image[:, :, z]
        origin = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0020|000e": series_uid,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0008|0060": "CT",
            "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(f"{v:.6f}" for v in direction[0:1] + direction[3:4] + direction[6:7] + direction[1:2] + direction[4:5] + direction[7:8]),
            "0020|0013": str(z + 1),
            "0028|0030": f"{SPACING[1]:.6f}\\{SPACING[0]:.6f}",
            "0018|0050": f"{SPACING[2]:.6f}",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{z + 1}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_2d_round_trip(tmp_path, suffix):
    grey = np.random.default_rng(1).integers(0, 255, size=(20, 30)).astype(np.uint8)
    src = tmp_path / f"img{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(src))
    loaded = read_image(src)
    assert not loaded.is_volume and not loaded.rgb
    np.testing.assert_array_equal(loaded.array, grey)
    out = write_mask((grey > 100).astype(np.uint8), tmp_path / f"mask{suffix}", loaded.geometry)
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == (30, 20)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), (grey > 100).astype(np.uint8))


def test_rgb_png_reads_as_rgb(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, size=(8, 9, 3)).astype(np.uint8)
    src = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(src))
    loaded = read_image(src)
    assert loaded.rgb and loaded.array.shape == (8, 9, 3)
    assert loaded.geometry.size == (9, 8)


def test_window_presets_and_percentile_are_recorded():
    ct = np.array([[-1000, -160, 40, 240, 3000]], dtype=np.int16)
    out, info = normalise(ct, "soft_tissue")
    assert info == {"method": "window", "name": "soft_tissue", "width": 400.0, "level": 40.0}
    assert out.tolist() == [[0, 0, 128, 255, 255]]
    for name in WINDOWS:
        assert normalise(ct, name)[1]["name"] == name
    out, info = normalise(ct, (100, 40))
    assert info["name"] == "custom"

    # percentile: whole volume, not per slice -> a dark slice stays dark
    vol = np.stack([np.full((4, 4), 10.0), np.linspace(0, 1000, 16).reshape(4, 4)])
    out, info = normalise(vol)
    assert info["method"] == "percentile" and info["scope"] == "volume"
    assert out[0].max() < 10 and out[1].max() == 255

    u8 = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert normalise(u8)[1]["method"] == "none"
    with pytest.raises(ImageError, match="--window 'liver'"):
        normalise(ct, "liver")


def test_missing_corrupt_and_4d(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not nifti" * 10)
    with pytest.raises(ImageError, match=r"bad\.nii\.gz: not a readable image") as err:
        read_image(bad)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(empty)
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(four))
    with pytest.raises(ImageError, match="4D image"):
        read_image(four)
    with pytest.raises(ImageError, match="DICOM"):
        read_image(tmp_path)  # a folder with no series


def test_zero_size_image(tmp_path):
    path = tmp_path / "zero.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 0 3\nElementType = MET_UCHAR\n"
        "ElementDataFile = LOCAL\n"
    )
    with pytest.raises(ImageError, match="zero.mha"):
        read_image(path)


def test_inconsistent_dicom_series(tmp_path):
    ref = _volume(shape=(5, 8, 8))
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    folder = tmp_path / "gappy"
    folder.mkdir()
    _write_dicom_series(ref, folder, skip=(2,))
    with pytest.raises(ImageError, match="inconsistent DICOM series"):
        read_image(folder)


def test_write_mask_checks_shape_and_suffix(tmp_path):
    geom = Geometry((4, 3), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ImageError, match="does not match"):
        write_mask(np.zeros((4, 3), np.uint8), tmp_path / "m.png", geom)
    with pytest.raises(ImageError, match="write masks to"):
        write_mask(np.zeros((3, 4), np.uint8), tmp_path / "m.jpg", geom)
