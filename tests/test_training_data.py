"""Issue 20, the data half: every layout users bring, bad data refused by name, the by-case split."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from medico_adapters import phantom
from medico_adapters.training import data
from medico_adapters.training.data import DataError
from tests.test_io import _write_dicom_series

SHAPE = (8, 40, 48)


def _save(array, path, spacing=(1.0, 1.0, 1.0), origin=None):
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
        if origin is not None:
            image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _case(seed=0, shape=SHAPE):
    return phantom.make_phantom(shape, seed=seed, anatomy=phantom.vary(seed))


def test_decathlon_folder_read_with_monai(tmp_path):
    root = phantom.write_cohort(tmp_path / "Task", 3, SHAPE)
    ds = data.discover(root)
    assert ds.layout == "decathlon" and [c.name for c in ds.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    assert ds.label_names[6] == "liver" and ds.modality == "CT"
    slices, record = data.load_slices(ds, ds.cases, objects=(6,), slices_per_case=2)
    assert [s.case for s in slices] == ["phantom_000"] * 2 + ["phantom_001"] * 2 + ["phantom_002"] * 2
    assert all(s.pixels.dtype == np.uint8 and set(np.unique(s.labels)) <= {0, 6} for s in slices)
    assert record["phantom_000"]["normalisation"]["name"] == "soft_tissue"  # CT from dataset.json


def test_nnunet_v2_folder(tmp_path):
    for name in ("a", "b"):
        ph = _case()
        _save(ph.volume, tmp_path / "imagesTr" / f"{name}_0000.nii.gz")
        _save(ph.labels, tmp_path / "labelsTr" / f"{name}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 6, "lung": 3}, "file_ending": ".nii.gz",
    }))
    ds = data.discover(tmp_path)
    assert ds.layout == "nnunet" and [c.name for c in ds.cases] == ["a", "b"]
    assert ds.label_names == {6: "liver", 3: "lung"} and ds.modality == "MRI"
    slices, record = data.load_slices(ds, ds.cases, objects=data.resolve_objects(["liver"], ds.label_names))
    assert record["a"]["normalisation"]["method"] == "percentile"  # MR: percentiles
    assert all(set(np.unique(s.labels)) <= {0, 6} for s in slices)


@pytest.mark.parametrize("image_suffix,label_name", [(".nrrd", "{}_seg.nrrd"), (".mha", "{}-label.mha"), (".nii.gz", "{}.nii.gz")])
def test_two_folders_matched_by_name(tmp_path, image_suffix, label_name):
    for i in range(2):
        ph = _case(i)
        _save(ph.volume, tmp_path / "images" / f"case{i}{image_suffix}")
        _save(ph.labels, tmp_path / "labels" / label_name.format(f"case{i}"))
    _save(_case(5).volume, tmp_path / "images" / f"unlabelled{image_suffix}")
    ds = data.discover(tmp_path)
    assert ds.layout == "folders" and [c.name for c in ds.cases] == ["case0", "case1"]
    assert any("without a label map" in n and "unlabelled" in n for n in ds.notes)
    assert data.load_slices(ds, ds.cases)[0]


def test_dicom_series_folder_with_label_map(tmp_path):
    ph = _case()
    ref = sitk.GetImageFromArray(ph.volume)
    ref.SetSpacing((0.8, 0.8, 2.5))
    ref.SetOrigin((10.0, -5.0, 3.0))
    (tmp_path / "scans" / "patient1").mkdir(parents=True)
    _write_dicom_series(ref, tmp_path / "scans" / "patient1")
    label = sitk.GetImageFromArray(ph.labels)
    label.CopyInformation(ref)
    (tmp_path / "seg").mkdir()
    sitk.WriteImage(label, str(tmp_path / "seg" / "patient1.nii.gz"))
    ds = data.discover(tmp_path / "scans", tmp_path / "seg")
    assert [c.name for c in ds.cases] == ["patient1"] and ds.cases[0].image.is_dir()
    slices, _ = data.load_slices(ds, ds.cases, objects=(6,), slices_per_case=1)
    assert len(slices) == 1 and (slices[0].labels == 6).any()


def test_2d_png_pairs(tmp_path):
    from PIL import Image

    ph = _case()
    for i in range(2):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(phantom.window(ph.volume[3 + i])).save(tmp_path / "images" / f"slice{i}.png")
        Image.fromarray(ph.labels[3 + i]).save(tmp_path / "masks" / f"slice{i}_mask.png")
    ds = data.discover(tmp_path)
    slices, record = data.load_slices(ds, ds.cases)
    assert [s.index for s in slices] == [0, 0] and slices[0].pixels.shape == SHAPE[1:]
    assert record["slice0"]["normalisation"]["method"] == "none"  # uint8 PNGs are used as they are


def test_napari_tiff_labels_take_the_image_geometry(tmp_path):
    import tifffile

    ph = _case()
    _save(ph.volume, tmp_path / "images" / "ct.nii.gz", spacing=(0.7, 0.7, 3.0))
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "ct.tif", ph.labels)  # as napari saves a labels layer
    ds = data.discover(tmp_path)
    slices, _ = data.load_slices(ds, ds.cases, objects=(5,))
    assert slices and all((s.labels == 5).any() for s in slices)


def test_slicer_seg_nrrd_cropped_and_named(tmp_path):
    ph = _case()
    _save(ph.volume, tmp_path / "images" / "ct.nrrd", spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0))
    liver = (ph.labels == 6).astype(np.uint8) * 2  # Slicer numbers segments itself
    zs, ys, xs = np.nonzero(liver)
    crop = liver[zs.min():zs.max() + 1, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    seg = sitk.GetImageFromArray(crop)
    seg.SetSpacing((0.5, 0.5, 2.0))
    seg.SetOrigin((1.0 + 0.5 * xs.min(), 2.0 + 0.5 * ys.min(), 3.0 + 2.0 * zs.min()))
    seg.SetMetaData("Segment0_Name", "Liver")
    seg.SetMetaData("Segment0_LabelValue", "2")
    seg.SetMetaData("Segment0_Layer", "0")
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(seg, str(tmp_path / "labels" / "ct.seg.nrrd"))
    ds = data.discover(tmp_path)
    assert ds.cases[0].label.name == "ct.seg.nrrd"
    slices, _ = data.load_slices(ds, ds.cases, slices_per_case=None)
    assert ds.label_names[2] == "Liver"
    placed = np.zeros(ph.labels.shape, bool)
    for s in slices:
        placed[s.index] = s.labels == 2
    assert np.array_equal(placed, liver == 2)  # back on the image grid, voxel for voxel


def test_slicer_seg_nrrd_in_layers_or_unreadable_is_refused_by_name(tmp_path):
    _save(_case().volume, tmp_path / "images" / "ct.nrrd")
    path = tmp_path / "labels" / "ct.seg.nrrd"
    path.parent.mkdir()
    layers = sitk.GetImageFromArray(np.zeros((*SHAPE, 2), np.uint8), isVector=True)  # overlapping segments
    sitk.WriteImage(layers, str(path))
    ds = data.discover(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{path}: a segmentation with overlapping segments in several layers")):
        data.load_slices(ds, ds.cases, slices_per_case=None)
    path.write_text("not a segmentation")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable segmentation")):
        data.load_slices(ds, ds.cases, slices_per_case=None)


def _pair(tmp_path, image, label, image_spacing=(1, 1, 1), label_spacing=(1, 1, 1)):
    _save(image, tmp_path / "images" / "c.nii.gz", spacing=image_spacing)
    return _save(label, tmp_path / "labels" / "c.nii.gz", spacing=label_spacing)


@pytest.mark.parametrize("problem", ["shape", "spacing", "fraction", "empty", "unreadable"])
def test_bad_data_is_refused_naming_the_file(tmp_path, problem):
    ph = _case()
    labels = ph.labels
    kw = {}
    if problem == "shape":
        labels = labels[:, :-2]
    elif problem == "spacing":
        kw = {"label_spacing": (1.0, 1.0, 2.0)}
    elif problem == "fraction":
        labels = labels.astype(np.float32) * 0.5
    elif problem == "empty":
        labels = np.zeros_like(labels)
    label = _pair(tmp_path, ph.volume, labels, **kw)
    if problem == "unreadable":
        label.write_bytes(b"\x1f\x8b not really gzip")
    ds = data.discover(tmp_path)
    expected = {"shape": "shape", "spacing": "spacing", "fraction": "non-integer values (e.g. 0.5)",
                "empty": "no labelled voxel", "unreadable": "not a readable image"}[problem]
    with pytest.raises(DataError, match=re.escape(expected)) as info:
        data.load_slices(ds, ds.cases)
    assert str(label) in str(info.value) and "\n" not in str(info.value)


def test_unknown_object_names_list_the_known_ones():
    with pytest.raises(DataError, match=r"no such label \(known: liver \(6\)"):
        data.resolve_objects(["spleen"], {6: "liver"})
    assert data.resolve_objects(["Liver", "3"], {6: "liver"}) == (3, 6)


def test_split_is_by_case_seeded_and_independent_of_order():
    names = [f"case{i:02d}" for i in range(10)]
    train, val = data.split_cases(names, 0.3, seed=0)
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == names
    assert data.split_cases(list(reversed(names)), 0.3, seed=0) == (train, val)
    assert data.split_cases(names, 0.3, seed=1)[1] != val
    previous = {**{n: "train" for n in train}, **{n: "val" for n in val}}
    grown_train, grown_val = data.split_cases([*names, "new1", "new2"], 0.3, seed=0, previous=previous)
    assert set(val) <= set(grown_val) and set(train) <= set(grown_train)  # nobody changes sides
    assert data.split_cases(names, 0.0, seed=0) == (names, [])
    with pytest.raises(DataError, match="one case cannot be split"):
        data.split_cases(["only"], 0.2, seed=0)
