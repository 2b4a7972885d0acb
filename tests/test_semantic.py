"""Issue 21: the semantic head, its model file, and ``segment --model`` on volumes and images.

The heads are trained for a few steps on the random-weight stand-in: this proves shapes, class
order, files, geometry and slab-wise inference, not accuracy (benchmarks/bench_semantic.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medico_adapters import automatic, phantom
from medico_adapters.errors import CheckpointError, ImageError
from medico_adapters.training.semantic import SemanticHead, SemanticModel, class_map, load_model

SHAPE = (8, 48, 48)


def test_head_output_shape_and_class_order():
    torch.manual_seed(0)
    head = SemanticHead(classes=4, dims=2)
    embeddings = torch.randn(2, 1, 256, 64, 64)
    pixels = torch.randn(2, 3, 40, 56)
    logits = head(embeddings, pixels, input_size=(731, 1024))
    assert logits.shape == (2, 4, 40, 56)
    three = SemanticHead(classes=3, dims=3, context=2)
    assert three(torch.randn(1, 5, 256, 64, 64), torch.randn(1, 3, 30, 30), (1024, 1024)).shape == (1, 3, 30, 30)
    with pytest.raises(RuntimeError):
        three(torch.randn(1, 3, 256, 64, 64), torch.randn(1, 3, 30, 30), (1024, 1024))  # needs 2 * 2 + 1 slices
    labels = np.array([[0, 6, 3], [7, 6, 9]])
    assert class_map(labels, [0, 3, 6, 7]).tolist() == [[0, 2, 1], [3, 2, 0]]  # table order; 9 is not a class


@pytest.mark.parametrize("window", ["soft_tissue", (400.0, 40.0), "percentile", "microsam", None])
def test_the_model_keeps_the_normalisation_its_slices_had(window):
    """What a model stores as its window is what segment --model normalises with: the same record."""
    from medico_adapters.io import normalise
    from medico_adapters.training.semantic_run import json_key

    volume = phantom.make_phantom(SHAPE).volume
    array = volume.clip(0, 255).astype(np.uint8) if window is None else volume
    _, record = normalise(array, window)
    assert json_key(record) == window


def test_lora_and_full_tasks_validate_on_stored_embeddings():
    """lora/full training samples hold encoder inputs, validation samples stored embeddings (as
    semantic_run builds them): a step runs the encoder, validation must not."""
    from medico_adapters.training.semantic import SemanticTask, normalised_pixels

    class Sam(torch.nn.Module):  # a stand-in encoder with SAM's 1 x 256 x 64 x 64 output
        def __init__(self):
            super().__init__()
            self.image_encoder = torch.nn.Conv2d(3, 256, 16, stride=16)

    torch.manual_seed(0)
    sam, head = Sam(), SemanticHead(classes=2, dims=2, width=16)
    labels = np.zeros(SHAPE[1:], dtype=np.int64)
    labels[10:30, 12:40] = 6
    pixels = phantom.make_phantom(SHAPE).volume[0].clip(0, 255).astype(np.uint8)
    truth, rgb = class_map(labels, [0, 6]), normalised_pixels(pixels)
    train = [([torch.randn(1, 3, 1024, 1024)], rgb, truth, (1024, 1024))]
    val = [(torch.randn(1, 256, 64, 64), rgb, truth, (1024, 1024))]
    task = SemanticTask(head, [(0, "background"), (6, "liver")], train, val, batch=1, encoder=sam,
                        extra_params=list(sam.parameters()))
    task.step(np.random.default_rng(0), 0)
    assert sam.image_encoder.weight.grad is not None  # the step ran the encoder
    assert task.validate() is not None  # and validation read the stored embeddings as they are


def test_model_file_round_trip_with_its_class_table(tmp_path, vit_b_state):
    torch.manual_seed(1)
    head = SemanticHead(classes=3, dims=3, context=1, width=32)
    model = SemanticModel(head, [(0, "background"), (6, "liver"), (3, "lung")], "soft_tissue", vit_b_state,
                          trained={"steps": 3})
    path = tmp_path / "organs.pt"
    torch.save(model.state(), path)
    loaded = load_model(path)
    assert loaded.classes == [(0, "background"), (6, "liver"), (3, "lung")] and loaded.window == "soft_tissue"
    assert loaded.dims == 3 and loaded.context == 1 and loaded.trained == {"steps": 3}
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in loaded.head.state_dict().items())
    assert all(torch.equal(v, vit_b_state[k]) for k, v in loaded.sam_state.items())
    check = subprocess.run([sys.executable, "-m", "medico_adapters", "check", path, "--json"], capture_output=True, text=True)
    assert check.returncode == 0 and json.loads(check.stdout)["format"] == "semantic"  # its SAM part is a full vit_b


def test_interactive_checkpoints_and_mismatched_tables_are_refused(tmp_path, checkpoints, vit_b_state):
    with pytest.raises(CheckpointError, match="an interactive SAM checkpoint, not a semantic model"):
        load_model(checkpoints["plain"])
    head = SemanticHead(classes=3)
    bad = SemanticModel(head, [(0, "background"), (6, "liver")], None, {}).state()
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="the head has 3 outputs but the class table 2 classes"):
        load_model(tmp_path / "bad.pt")
    (tmp_path / "text.pt").write_text("not a model")
    with pytest.raises(CheckpointError, match="not a readable model file"):
        load_model(tmp_path / "text.pt")


@pytest.fixture(scope="module")
def models(tmp_path_factory, vit_b_state):
    """A 2D and a 3D model on the stand-in's weights (heads untrained: the plumbing is the point)."""
    root = tmp_path_factory.mktemp("semantic")
    classes = [(0, "background"), (3, "lung"), (5, "bone"), (6, "liver")]
    paths = {}
    for dims in (2, 3):
        torch.manual_seed(dims)
        model = SemanticModel(SemanticHead(len(classes), dims, context=1, width=32), classes, "soft_tissue", vit_b_state)
        paths[dims] = root / f"organs{dims}d.pt"
        torch.save(model.state(), paths[dims])
    ph = phantom.make_phantom(SHAPE, seed=2, anatomy=phantom.vary(2))
    image = sitk.GetImageFromArray(ph.volume)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.0, 30.5, 7.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    sitk.WriteImage(image, str(root / "ct.nrrd"))
    paths["image"] = root / "ct.nrrd"
    paths["store"] = root / "store"
    return paths


def test_slab_wise_equals_whole_volume_and_keeps_the_geometry(tmp_path, models):
    whole = automatic.segment_labels(models["image"], tmp_path / "whole.nii.gz", models[3], slab=SHAPE[0],
                                     store_root=models["store"], backend="torch", progress=False)
    assert whole["embeddings"]["computed"] == SHAPE[0]
    slabs = automatic.segment_labels(models["image"], tmp_path / "slabs.seg.nrrd", models[3], slab=3,
                                     store_root=models["store"], backend="torch", progress=False)
    assert slabs["embeddings"] == {"computed": 0, "from_store": SHAPE[0], "most_held": 5}  # 3 + a neighbour each side
    a = sitk.ReadImage(str(tmp_path / "whole.nii.gz"))
    b = sitk.ReadImage(str(tmp_path / "slabs.seg.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    source = sitk.ReadImage(str(models["image"]))
    for out in (a, b):
        assert out.GetSize() == source.GetSize()
        assert np.allclose(out.GetSpacing(), source.GetSpacing()) and np.allclose(out.GetOrigin(), source.GetOrigin())
        assert np.allclose(out.GetDirection(), source.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(a))) <= {0, 3, 5, 6}  # label values, not class indices
    table = json.loads((tmp_path / "whole.json").read_text(encoding="utf-8"))
    assert table["classes"] == [{"value": 0, "name": "background"}, {"value": 3, "name": "lung"},
                                {"value": 5, "name": "bone"}, {"value": 6, "name": "liver"}]
    assert a.GetMetaData("descrip") == "classes 3=lung 5=bone 6=liver"
    assert [b.GetMetaData(f"Segment{i}_Name") for i in range(3)] == ["lung", "bone", "liver"]  # Slicer's fields
    assert [b.GetMetaData(f"Segment{i}_LabelValue") for i in range(3)] == ["3", "5", "6"]
    assert b.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"


def test_2d_model_on_a_2d_image_and_the_3d_one_refused(tmp_path, models):
    from PIL import Image

    ph = phantom.make_phantom(SHAPE, seed=2, anatomy=phantom.vary(2))
    png = tmp_path / "slice.png"
    Image.fromarray(phantom.window(ph.volume[4])).save(png)
    report = automatic.segment_labels(png, tmp_path / "labels.png", models[2], store_root=models["store"],
                                      backend="torch", progress=False)
    assert report["dims"] == 2 and np.asarray(Image.open(tmp_path / "labels.png")).shape == SHAPE[1:]
    with pytest.raises(ImageError, match="a 2D image, but organs3d.pt is a 3D model"):
        automatic.segment_labels(png, tmp_path / "x.png", models[3], store_root=models["store"], progress=False)
    with pytest.raises(ImageError, match="a 2D model, but --dims 3 was asked for"):
        automatic.segment_labels(models["image"], tmp_path / "x.nii.gz", models[2], dims=3, progress=False)


def test_segment_model_cli_one_line_errors(tmp_path, models, checkpoints):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "medico_adapters", "segment", *map(str, args)], capture_output=True,
                              text=True, env={**os.environ, "MEDICO_EMBEDDING_STORE": str(models["store"])})

    proc = run(models["image"], "-o", tmp_path / "x.nii.gz", "--model", checkpoints["plain"])
    assert proc.returncode == 1 and "an interactive SAM checkpoint, not a semantic model" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "x.nii.gz").exists()
    proc = run(models["image"], "-o", tmp_path / "x.nii.gz", "--model", models[2], "--point", "4,20,20")
    assert proc.returncode == 1 and "without prompts" in proc.stderr
    proc = run(models["image"], "-o", tmp_path / "labels.nii.gz", "--model", models[2], "--backend", "torch", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["embeddings"]["computed"] == 0 and report["classes_file"].endswith("labels.json")


def test_finetune_semantic_then_resume_with_a_corrected_case_added(tmp_path, checkpoints):
    import shutil

    data = tmp_path / "data"
    phantom.write_cohort(data, 2, SHAPE)  # one training case, one validation case: each slice costs a ViT-B pass
    store = tmp_path / "store"
    args = ["finetune", data, "--semantic", "--dims", "3", "--classes", "liver,bone", "-o", tmp_path / "organs.pt",
            "--checkpoint", checkpoints["plain"], "--slices-per-case", "1", "--val-fraction", "0.5", "--store", store,
            "--backend", "torch", "--val-every", "2", "--json"]

    def run(*extra):
        proc = subprocess.run([sys.executable, "-m", "medico_adapters", *map(str, args), *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    first = run("--iterations", "3")
    assert first["task"] == "semantic" and first["steps"] == 3
    assert set(first["evaluation"]["after"]["per_class"]) == {"liver", "bone"}
    model = load_model(tmp_path / "organs.pt")
    assert model.classes == [(0, "background"), (5, "bone"), (6, "liver")] and model.dims == 3 and model.window == "soft_tissue"
    for png in ("organs-curves.png", "organs-slices.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| **mean** |" in (tmp_path / "organs-report.md").read_text(encoding="utf-8")

    # a corrected case joins the data (here: another phantom under a new name), training goes on
    corrected = phantom.make_phantom(SHAPE, seed=7, anatomy=phantom.vary(7))
    for sub, array in (("imagesTr", corrected.volume), ("labelsTr", corrected.labels)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(data / sub / "corrected_001.nii.gz"))
    manifest = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    manifest["training"].append({"image": "./imagesTr/corrected_001.nii.gz", "label": "./labelsTr/corrected_001.nii.gz"})
    (data / "dataset.json").write_text(json.dumps(manifest))
    second = run("--iterations", "5", "--resume")
    record = json.loads((tmp_path / "organs.json").read_text(encoding="utf-8"))
    assert second["steps"] == 5 and record["resumed_from"] == 3
    for name in first["split"]["train"]:
        assert name in second["split"]["train"]  # earlier cases keep their side
    assert "corrected_001" in second["split"]["train"] + second["split"]["val"]
    shutil.rmtree(store)
