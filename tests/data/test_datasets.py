"""Tests for ``iseg.data.datasets`` (layouts, label reading, Context order, tags) and
``iseg.data.convert`` (COCO instances and Context .mat → label PNGs), on tiny generated datasets.

The ``make_*`` builders are also used by tests/evaluate/test_running.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iseg.data import data_path
from iseg.data.datasets import (
    DatasetError,
    LabelError,
    class_names,
    open_dataset,
    read_ids,
    read_tags,
    split_ids,
)
from iseg.masks import palette

# --- builders -----------------------------------------------------------------------------------


def _image(seed: int, h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save_label(label: np.ndarray, path: Path, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="L")
    if mode == "P":
        img = Image.fromarray(label.astype(np.uint8), mode="P")
        img.putpalette(palette())
    img.save(path)


def voc_label(i: int, h: int, w: int, classes=None) -> np.ndarray:
    """Background with a square of class ``1 + i % 20`` (or ``classes`` in vertical bands) and a
    255 border row."""
    label = np.zeros((h, w), np.uint8)
    classes = classes if classes is not None else [1 + i % 20]
    for k, c in enumerate(classes):
        label[4 : h - 4, 4 + k * 6 : 10 + k * 6] = c
    label[0, :] = 255
    return label


def label_image(i: int, label: np.ndarray) -> Image.Image:
    """An image whose red channel encodes the label (4 × class id; 255 → 0), saved losslessly
    by the builders, so that a fake pipeline can read the ground truth back."""
    rng = np.random.default_rng(i)
    rgb = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    rgb[..., 0] = np.where(label == 255, 0, label * 4)
    return Image.fromarray(rgb)


def make_voc(
    root: Path, ids, labels: str = "SegmentationClassAug", size=(24, 32), label_fn=voc_label,
    image_fn=None,
):
    """``root/VOCdevkit/VOC2012`` with JPEGs and grayscale (Aug) or palette (official) labels;
    with ``image_fn(i, label)`` the images are that, stored losslessly (PNG data in the .jpg)."""
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    out = {}
    for i, image_id in enumerate(ids):
        h, w = size if i % 2 == 0 else size[::-1]
        label = label_fn(i, h, w)
        if image_fn is None:
            _image(i, h, w).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        else:
            image_fn(i, label).save(base / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        _save_label(label, base / labels / f"{image_id}.png", "P" if labels == "SegmentationClass" else "L")
        out[image_id] = label
    return out


def context_label(image_id: str, h: int, w: int, order: str = "official") -> np.ndarray:
    """A label whose classes are those val_cls.txt lists for ``image_id`` (official ids), written
    in ``order``."""
    for line in data_path("voc_context", "val_cls.txt").read_text().splitlines():
        words = line.split()
        if words and words[0] == image_id:
            classes = [int(c) + 1 for c in words[1:]]
            break
    else:
        raise KeyError(image_id)
    if order == "mmseg":
        lut = json.loads(data_path("voc_context", "class_names.json").read_text())["mmseg_to_iseg_lut"]["lut"]
        inverse = {official: mm for mm, official in enumerate(lut)}
        classes = [inverse[c] for c in classes]
    label = np.zeros((h, w), np.uint8)
    for k, c in enumerate(classes):
        label[:, k * 3 : k * 3 + 3] = c
    return label


def make_context(root: Path, ids, order: str = "official", size=(24, 32), image_fn=None):
    """``root/VOCdevkit/VOC2010`` with labels in ``order``; ``image_fn(i, official label)`` as
    in :func:`make_voc`."""
    base = root / "VOCdevkit" / "VOC2010"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(ids):
        h, w = size
        if image_fn is None:
            _image(i, h, w).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        else:
            image_fn(i, context_label(image_id, h, w)).save(base / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        _save_label(context_label(image_id, h, w, order), base / "SegmentationClassContext" / f"{image_id}.png")


COCO_LABELS = {
    "a": "coco_seg_anno/{num}.png",
    "b": "SegmentationClass/{split}2014/{id}.png",
    "b-flat": "SegmentationClass/{id}.png",
    "c": "annotations/{split}2017/{num}_instanceTrainIds.png",
}
COCO_IMAGES = {"a": "{split}2014/{id}.jpg", "b": "images/{split}2014/{id}.jpg",
               "b-flat": "{split}2014/{id}.jpg", "c": "{split}2017/{num}.jpg"}  # fmt: skip


def make_coco(root: Path, ids, layout: str = "a", size=(24, 32), label_fn=None):
    out = {}
    for i, image_id in enumerate(ids):
        fields = {"id": image_id, "num": image_id[-12:], "split": image_id.split("_")[1][:-4]}
        h, w = size
        image_path = root / COCO_IMAGES[layout].format(**fields)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        _image(i, h, w).save(image_path, quality=95)
        label = label_fn(i, h, w) if label_fn else voc_label(i, h, w, [1 + (7 * i) % 80, 80])
        _save_label(label, root / COCO_LABELS[layout].format(**fields))
        out[image_id] = label
    return out


# --- VOC -----------------------------------------------------------------------------------------

VOC_IDS = split_ids("voc", "train")[:3]


@pytest.mark.parametrize("parent", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_found_from_any_parent(tmp_path, parent):
    labels = make_voc(tmp_path, VOC_IDS)
    ds = open_dataset("voc", tmp_path / parent, VOC_IDS[0])
    assert ds.num_classes == 21 and "SegmentationClassAug" in ds.layout
    assert ds.image_path(VOC_IDS[1]) == tmp_path / "VOCdevkit/VOC2012/JPEGImages" / f"{VOC_IDS[1]}.jpg"
    np.testing.assert_array_equal(ds.read_label(VOC_IDS[1]), labels[VOC_IDS[1]])


def test_voc_palette_labels_read_as_indices(tmp_path):
    labels = make_voc(tmp_path, VOC_IDS, labels="SegmentationClass")
    ds = open_dataset("voc", tmp_path, VOC_IDS[0])
    assert "SegmentationClass" in ds.layout and "Aug" not in ds.layout
    with Image.open(ds.label_path(VOC_IDS[2])) as img:
        assert img.mode == "P"  # the palette's colours are not the classes
    np.testing.assert_array_equal(ds.read_label(VOC_IDS[2]), labels[VOC_IDS[2]])


def test_voc_class_names_are_prompt_names():
    names = class_names("voc")
    assert len(names) == 20 and names[0] == "plane" and names[-1] == "tv monitor"


def test_wrong_root_and_missing_folders_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"root {tmp_path / 'nope'} not found"):
        open_dataset("voc", tmp_path / "nope")
    with pytest.raises(DatasetError, match="no JPEGImages/ folder in .*VOCdevkit/VOC2012"):
        open_dataset("voc", tmp_path)
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no SegmentationClassAug/ or SegmentationClass/ folder"):
        open_dataset("voc", tmp_path)
    (tmp_path / "VOC2012" / "SegmentationClass").mkdir()
    with pytest.raises(DatasetError, match=r"image .*JPEGImages/2007_000032\.jpg not found"):
        open_dataset("voc", tmp_path, "2007_000032")


def test_label_out_of_range_names_the_file(tmp_path):
    make_voc(tmp_path, VOC_IDS)
    ds = open_dataset("voc", tmp_path, VOC_IDS[0])
    bad = np.zeros((5, 5), np.uint8)
    bad[2, 2] = 21  # VOC is 0..20 and 255
    _save_label(bad, ds.label_path(VOC_IDS[0]))
    with pytest.raises(LabelError, match=rf"{VOC_IDS[0]}\.png: label value 21 outside \[0, 21\)"):
        ds.read_label(VOC_IDS[0])
    Image.new("RGB", (5, 5)).save(ds.label_path(VOC_IDS[1]))
    with pytest.raises(LabelError, match="grayscale or palette"):
        ds.read_label(VOC_IDS[1])
    data = ds.label_path(VOC_IDS[2]).read_bytes()
    ds.label_path(VOC_IDS[2]).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(LabelError, match=f"{VOC_IDS[2]}.png: cannot read"):
        ds.read_label(VOC_IDS[2])


# --- COCO ----------------------------------------------------------------------------------------

COCO_IDS = split_ids("coco14", "train")[:2]
COCO_VAL = split_ids("coco14", "val_5k")[:2]


@pytest.mark.parametrize("layout", ["a", "b", "b-flat", "c"])
def test_coco_layouts(tmp_path, layout):
    ids = COCO_VAL if layout == "c" else COCO_IDS  # COCO-Object: val2017 under 2014 names
    labels = make_coco(tmp_path, ids, layout)
    ds = open_dataset("coco14", tmp_path, ids[0])
    assert ds.num_classes == 81
    for image_id in ids:
        assert ds.image_path(image_id).is_file()
        np.testing.assert_array_equal(ds.read_label(image_id), labels[image_id])
    assert class_names("coco14")[0] == "people"


def test_coco_missing_labels_folder(tmp_path):
    (tmp_path / "train2014").mkdir()
    with pytest.raises(DatasetError, match="no coco_seg_anno/, SegmentationClass/ or annotations/train2017/"):
        open_dataset("coco14", tmp_path, COCO_IDS[0])
    (tmp_path / "coco_seg_anno").mkdir()
    with pytest.raises(DatasetError, match=rf"image .*{COCO_IDS[0]}\.jpg not found"):
        open_dataset("coco14", tmp_path, COCO_IDS[0])


# --- Context -------------------------------------------------------------------------------------

CONTEXT_IDS = split_ids("voc_context", "val")[:4]


@pytest.mark.parametrize("order", ["official", "mmseg"])
def test_context_order_detected_and_mapped(tmp_path, order):
    make_context(tmp_path, CONTEXT_IDS, order)
    ds = open_dataset("voc_context", tmp_path, CONTEXT_IDS[0], context_ids=CONTEXT_IDS)
    assert ds.order == order
    label = ds.read_label("2008_000002")  # {0, 11, 20, 58} in the official order (DATASETS.md)
    assert set(np.unique(label).tolist()) == {0, 11, 20, 58}


def test_context_order_override_and_undecidable(tmp_path):
    make_context(tmp_path, CONTEXT_IDS, "mmseg")
    forced = open_dataset("voc_context", tmp_path, CONTEXT_IDS[0], context_order="official")
    assert forced.order == "official"
    assert set(np.unique(forced.read_label("2008_000002")).tolist()) == {0, 50, 55, 58}  # raw mmseg ids
    # labels that match neither order: the error asks for the flag
    _save_label(np.full((4, 4), 33, np.uint8), forced.label_path(CONTEXT_IDS[0]))
    with pytest.raises(DatasetError, match="--context-order"):
        open_dataset("voc_context", tmp_path, CONTEXT_IDS[0], context_ids=CONTEXT_IDS[:1])


# --- lists and tags ------------------------------------------------------------------------------


def test_split_lists_have_the_papers_sizes():
    assert len(split_ids("voc", "train")) == 1464 and len(split_ids("voc", "val")) == 1449
    assert len(split_ids("voc_context", "val")) == 5105 and len(split_ids("coco14", "val_5k")) == 5000


def test_read_ids_and_tags(tmp_path):
    with pytest.raises(DatasetError, match="split list .*missing.txt not found"):
        read_ids(tmp_path / "missing.txt")
    (tmp_path / "ids.txt").write_text("a\n\nb extra words\n")
    assert read_ids(tmp_path / "ids.txt") == ["a", "b"]
    (tmp_path / "tags.txt").write_text("a 3 0 3\nb\n")
    assert read_tags(tmp_path / "tags.txt", 21) == {"a": (1, 4), "b": ()}
    (tmp_path / "bad.txt").write_text("a 1\nb 20\n")
    with pytest.raises(DatasetError, match=r"bad.txt:2: class index 20 outside \[0, 20\)"):
        read_tags(tmp_path / "bad.txt", 21)
    published = read_tags(data_path("ovs_labels", "voc_context_val_tagclip.txt"), 60)
    assert published["2008_000002"] == (11, 20, 27, 28, 39, 45, 58)


# --- converters ----------------------------------------------------------------------------------


def _rle_free_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' numpy 2 copy= warning
def test_coco_converter(tmp_path):
    pytest.importorskip("pycocotools")
    from iseg.data.convert import coco_labels

    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [{"id": 9, "width": 20, "height": 10, "file_name": "COCO_train2014_000000000009.jpg"},
              {"id": 25, "width": 8, "height": 6, "file_name": "COCO_train2014_000000000025.jpg"}]  # fmt: skip
    annotations = [
        # a small person inside a large car: the person must stay visible (larger painted first)
        {"id": 1, "image_id": 9, "category_id": 1, "area": 16.0, "iscrowd": 0,
         "segmentation": _rle_free_polygon(2, 2, 6, 6), "bbox": [2, 2, 4, 4]},
        {"id": 2, "image_id": 9, "category_id": 3, "area": 100.0, "iscrowd": 0,
         "segmentation": _rle_free_polygon(0, 0, 10, 10), "bbox": [0, 0, 10, 10]},
        {"id": 3, "image_id": 9, "category_id": 90, "area": 20.0, "iscrowd": 0,
         "segmentation": _rle_free_polygon(14, 2, 18, 7), "bbox": [14, 2, 4, 5]},
    ]  # fmt: skip
    path = tmp_path / "instances_train2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    written, skipped = coco_labels(path, tmp_path / "coco_seg_anno")
    assert (written, skipped) == (2, 0)
    label = np.asarray(Image.open(tmp_path / "coco_seg_anno" / "000000000009.png"))
    assert label.shape == (10, 20)
    assert label[4, 4] == 1  # person: COCO category 1 → label 1
    assert label[8, 8] == 3  # car: category 3 → 3
    assert label[4, 16] == 80  # toothbrush: category 90 → 80, even when the file lists 3 categories
    assert label[0, 19] == 0
    assert not np.asarray(Image.open(tmp_path / "coco_seg_anno" / "000000000025.png")).any()
    assert coco_labels(path, tmp_path / "coco_seg_anno") == (0, 2)  # resumes: nothing rewritten
    # and the reader takes the converter's output as layout (a)
    (tmp_path / "train2014").mkdir()
    _image(0, 10, 20).save(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    ds = open_dataset("coco14", tmp_path, "COCO_train2014_000000000009")
    np.testing.assert_array_equal(ds.read_label("COCO_train2014_000000000009"), label)


def test_context_converter(tmp_path):
    from scipy.io import savemat

    from iseg.data.convert import context_labels

    (tmp_path / "trainval").mkdir()
    label_map = np.array([[2, 9, 427], [0, 5, 458]], np.uint16)  # 2 aeroplane, 9 bag, 427 tvmonitor, 458 wood
    savemat(tmp_path / "trainval" / "2008_000002.mat", {"LabelMap": label_map})
    savemat(tmp_path / "trainval" / "2008_000003.mat", {"Other": label_map})
    with pytest.raises(ValueError, match="2008_000003.mat: no LabelMap"):
        context_labels(tmp_path / "trainval", tmp_path / "out")
    out = np.asarray(Image.open(tmp_path / "out" / "2008_000002.png"))
    np.testing.assert_array_equal(out, [[1, 21, 20], [0, 0, 59]])  # 5 is not one of the 59: 0


# --- unsupervised benchmarks --------------------------------------------------------------------


def test_cocostuff27_fine_to_coarse_and_cityscapes_ids(tmp_path):
    (tmp_path / "val2017").mkdir()
    _image(0, 6, 8).save(tmp_path / "val2017" / "000000000139.jpg")
    fine = np.array([[0, 71, 91, 255], [181, 0, 0, 0]], np.uint8)  # person, fine 71, 91, ignore; 181
    _save_label(fine, tmp_path / "stuffthingmaps" / "val2017" / "000000000139.png")
    ds = open_dataset("cocostuff27", tmp_path, "000000000139")
    np.testing.assert_array_equal(ds.read_label("000000000139"), [[9, 0, 17, 255], [24, 9, 9, 9]])
    _save_label(np.array([[200]], np.uint8), tmp_path / "stuffthingmaps" / "val2017" / "bad.png")
    with pytest.raises(LabelError, match="bad.png: label value 200"):
        ds.read_label("bad")
    from iseg.data.datasets import cityscapes_ids

    with pytest.raises(DatasetError, match="no leftImg8bit/val/ folder"):
        cityscapes_ids(tmp_path)
    for frame in ("lindau/lindau_000000_000019", "frankfurt/frankfurt_000000_000294"):
        path = tmp_path / "leftImg8bit" / "val" / f"{frame}_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(0, 4, 8).save(path)
    assert cityscapes_ids(tmp_path) == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]


def _coco_file(path, categories, annotations, size=(10, 20)):
    images = [{"id": 9, "width": size[1], "height": size[0], "file_name": "COCO_train2014_000000000009.jpg"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_converter_fixed_ids_overlaps_and_crowds(tmp_path):
    """Issue 21 §2: a subset of categories keeps COCO's ids (dog 18 → 17, toothbrush 90 → 80);
    where masks overlap the smaller area wins, equal areas the higher annotation id; a crowd
    region (RLE) gets its category by the same rule."""
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    from iseg.data.convert import coco_category_table, coco_labels

    table = coco_category_table()
    official = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
                28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
                54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
                81, 82, 84, 85, 86, 87, 88, 89, 90]  # fmt: skip
    assert table == {c: k for k, c in enumerate(official, 1)}
    crowd = np.zeros((10, 20), np.uint8, order="F")
    crowd[0:4, 10:20] = 1
    rle = mask_utils.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    categories = [{"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}]
    annotations = [
        # two equal areas overlapping on columns 4..5: the higher id (7, toothbrush) is on top
        {"id": 7, "image_id": 9, "category_id": 90, "area": 24.0, "iscrowd": 0,
         "segmentation": _rle_free_polygon(4, 0, 8, 6), "bbox": [4, 0, 4, 6]},
        {"id": 3, "image_id": 9, "category_id": 18, "area": 24.0, "iscrowd": 0,
         "segmentation": _rle_free_polygon(2, 0, 6, 6), "bbox": [2, 0, 4, 6]},
        # a crowd of people (area 40) under a smaller dog (area 4): the dog wins the overlap
        {"id": 1, "image_id": 9, "category_id": 1, "area": 40.0, "iscrowd": 1, "segmentation": rle,
         "bbox": [10, 0, 10, 4]},
        {"id": 2, "image_id": 9, "category_id": 18, "area": 4.0, "iscrowd": 0,
         "segmentation": _rle_free_polygon(12, 1, 14, 3), "bbox": [12, 1, 2, 2]},
    ]  # fmt: skip
    path = _coco_file(tmp_path / "instances.json", categories, annotations)
    coco_labels(path, tmp_path / "out")
    label = np.asarray(Image.open(tmp_path / "out" / "000000000009.png"))
    assert label[3, 3] == 17 and label[3, 7] == 80  # dog alone, toothbrush alone
    assert label[3, 5] == 80  # the overlap of equal areas: annotation 7 over annotation 3
    assert label[2, 13] == 17 and label[0, 18] == 1  # the small dog over the crowd; the crowd's rest
    assert label[8, 18] == 0


def test_coco_converter_unknown_category_is_one_line(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from iseg.cli import main

    annotations = [{"id": 1, "image_id": 9, "category_id": 91, "area": 4.0, "iscrowd": 0,
                    "segmentation": _rle_free_polygon(0, 0, 2, 2), "bbox": [0, 0, 2, 2]}]  # fmt: skip
    path = _coco_file(tmp_path / "instances.json", [{"id": 91, "name": "thing"}], annotations)
    assert main(["data", "coco", "--instances", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "category id 91 is not one of the 80 COCO categories" in err[0]
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize(
    "content",
    [b"not a mat file at all", "struct", "float"],
    ids=["not-a-mat", "labelmap-struct", "labelmap-fractional"],
)
def test_context_converter_malformed_mat_is_one_line(tmp_path, capsys, content):
    from scipy.io import savemat

    from iseg.cli import main

    (tmp_path / "trainval").mkdir()
    mat = tmp_path / "trainval" / "2008_000002.mat"
    if isinstance(content, bytes):
        mat.write_bytes(content)
    elif content == "struct":
        savemat(mat, {"LabelMap": {"a": np.ones((2, 2))}})
    else:
        savemat(mat, {"LabelMap": np.array([[1.5, 2.0]])})
    code = main(["data", "context", "--mat-dir", str(tmp_path / "trainval"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("iseg: error: ") and "2008_000002.mat" in err[0]


def test_data_full_disk_is_one_line_and_keeps_finished_files(tmp_path, capsys, monkeypatch):
    """Issue 18 §2: the write that fails leaves no temporary file; the PNGs written before it stay."""
    from scipy.io import savemat

    from iseg.cli import main
    from iseg.data import convert

    (tmp_path / "trainval").mkdir()
    for name in ("2008_000002", "2008_000003"):
        savemat(tmp_path / "trainval" / f"{name}.mat", {"LabelMap": np.array([[2, 9]], np.uint16)})
    real = open
    calls = []

    def full_disk(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        if "x" in mode:
            calls.append(path)
            if len(calls) == 2:
                f.close()
                raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", full_disk)
    code = main(["data", "context", "--mat-dir", str(tmp_path / "trainval"), "--out", str(tmp_path / "out"), "--quiet"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "2008_000003.png" in err[0]
    assert "no space left on device" in err[0] and "rerun the same command to resume" in err[0]  # the runner's line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["2008_000002.png"]  # no temp left
    assert convert  # the module whose writer was exercised


def test_cocostuff27_diffsegs_own_layout(tmp_path):
    """Issue 21 §3: DiffSeg's folders (``val2017/`` with ``annotation_val2017/``) are accepted."""
    (tmp_path / "val2017").mkdir()
    _image(0, 6, 8).save(tmp_path / "val2017" / "000000000139.jpg")
    _save_label(np.array([[0, 71], [255, 181]], np.uint8), tmp_path / "annotation_val2017" / "000000000139.png")
    ds = open_dataset("cocostuff27", tmp_path, "000000000139")
    assert ds.label_path("000000000139") == tmp_path / "annotation_val2017" / "000000000139.png"
    np.testing.assert_array_equal(ds.read_label("000000000139"), [[9, 0], [255, 24]])


def test_list_ids_stay_inside(tmp_path):
    from iseg.data.datasets import read_ids

    # iseg.runner.check_plain_name's rule (NUL, "..") plus no hidden names
    for bad in ("../x", "a/b", "/abs", "a\\b", ".hidden", "c/../d", "..", "a\0b", "~x"):
        (tmp_path / "ids.txt").write_text(f"2007_000032\n{bad}\n")
        with pytest.raises(DatasetError, match=r"ids.txt:2: image id"):
            read_ids(tmp_path / "ids.txt")
    (tmp_path / "ids.txt").write_text("frankfurt/frankfurt_000000_000294\n")
    assert read_ids(tmp_path / "ids.txt", folders=True) == ["frankfurt/frankfurt_000000_000294"]
    for bad in ("frankfurt/../x", "/frankfurt/x", "frankfurt//x", "frankfurt/x\0y", "frankfurt/.x"):
        (tmp_path / "ids.txt").write_text(f"{bad}\n")
        with pytest.raises(DatasetError, match="is not a folder and a name"):
            read_ids(tmp_path / "ids.txt", folders=True)


@pytest.mark.parametrize("broken", ["no-area", "no-height", "bad-segmentation"])
def test_coco_converter_malformed_entries_are_one_line(tmp_path, capsys, broken):
    pytest.importorskip("pycocotools")
    from iseg.cli import main

    ann = {"id": 1, "image_id": 9, "category_id": 1, "area": 4.0, "iscrowd": 0,
           "segmentation": _rle_free_polygon(0, 0, 2, 2), "bbox": [0, 0, 2, 2]}  # fmt: skip
    if broken == "no-area":
        del ann["area"]
    elif broken == "bad-segmentation":
        ann["segmentation"] = "not a polygon"
    path = _coco_file(tmp_path / "instances.json", [{"id": 1, "name": "person"}], [ann])
    if broken == "no-height":
        data = json.loads(path.read_text())
        del data["images"][0]["height"]
        path.write_text(json.dumps(data))
    code = main(["data", "coco", "--instances", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("iseg: error:") and "instances.json" in err[0]
