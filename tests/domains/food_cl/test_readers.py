"""Food readers on tiny files written in exactly the published layouts, and their errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from domains.food_cl.readers import DatasetFormatError, read_food101, read_image_folder, read_image_list
from suite.data import DataFormatError


def _jpeg(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _food101(root, train=("apple_pie/1005649", "apple_pie/1014775", "baby_back_ribs/1005293"),
             test=("apple_pie/101251", "baby_back_ribs/1007102")):
    """food-101/{images/<class>/<id>.jpg, meta/classes.txt, meta/labels.txt, meta/train.txt, meta/test.txt}."""
    for line in (*train, *test):
        _jpeg(root / "images" / f"{line}.jpg")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    (root / "meta" / "labels.txt").write_text("Apple pie\nBaby back ribs\n")
    (root / "meta" / "train.txt").write_text("".join(f"{x}\n" for x in train))
    (root / "meta" / "test.txt").write_text("".join(f"{x}\n" for x in test))


def test_food101_layout(tmp_path):
    root = tmp_path / "food-101"
    _food101(root)
    splits = read_food101(root)
    assert set(splits) == {"train", "test"}
    train = splits["train"]
    assert train.classes == ["apple_pie", "baby_back_ribs"]
    assert train.files == ["images/apple_pie/1005649.jpg", "images/apple_pie/1014775.jpg", "images/baby_back_ribs/1005293.jpg"]
    assert train.labels.tolist() == [0, 0, 1]  # the position in classes.txt
    assert train.path(2).is_file() and splits["test"].counts().tolist() == [1, 1]


def test_food101_agrees_with_torchvision(tmp_path):
    # torchvision's Food101 reads meta/<split>.json ({class: ["class/id", ...]}) of the same archive
    from torchvision.datasets import Food101

    root = tmp_path / "food-101"
    _food101(root)
    for split in ("train", "test"):
        lines = (root / "meta" / f"{split}.txt").read_text().split()
        by_class = {c: [x for x in lines if x.startswith(c + "/")] for c in ("apple_pie", "baby_back_ribs")}
        (root / "meta" / f"{split}.json").write_text(json.dumps(by_class))
    ours = read_food101(root)
    for split in ("train", "test"):
        theirs = Food101(str(tmp_path), split=split)
        assert [str(ours[split].path(i)) for i in range(len(ours[split]))] == [str(p) for p in theirs._image_files]
        assert ours[split].labels.tolist() == theirs._labels and ours[split].classes == theirs.classes


def test_food101_bad_input(tmp_path):
    root = tmp_path / "food-101"
    _food101(root)
    (root / "meta" / "train.txt").write_text("apple_pie/1005649\napple_pie_1014775\n")
    with pytest.raises(DatasetFormatError, match=r"train\.txt, line 2: 'apple_pie_1014775' is not of the form <class>/<id>") as err:
        read_food101(root)
    assert isinstance(err.value, DataFormatError) and err.value.path.endswith("train.txt")  # the suite's reader error
    (root / "meta" / "train.txt").write_text("pizza/1\n")
    with pytest.raises(DatasetFormatError, match=r"train\.txt, line 1: class 'pizza' is not in .*classes\.txt"):
        read_food101(root)
    (root / "meta" / "train.txt").write_text("apple_pie/999\n")
    with pytest.raises(DatasetFormatError, match=r"line 1: image .*apple_pie/999\.jpg not found"):
        read_food101(root)
    (root / "meta" / "train.txt").write_text("apple_pie/101251\n")  # also in test.txt
    already = r"test\.txt, line 1: 'apple_pie/101251' is already listed in .*train\.txt, line 1"
    with pytest.raises(DatasetFormatError, match=already):
        read_food101(root)
    (root / "meta" / "classes.txt").unlink()
    with pytest.raises(DatasetFormatError, match=r"classes\.txt: file not found \(expected one class name per line"):
        read_food101(root)
    assert issubclass(DatasetFormatError, ValueError)


def test_food101_unlisted_images_are_reported(tmp_path):
    root = tmp_path / "food-101"
    _food101(root)
    _jpeg(root / "images" / "apple_pie" / "extra.jpg")
    with pytest.warns(UserWarning, match=r"1 files under images/ are in no split list.*apple_pie/extra\.jpg"):
        splits = read_food101(root)
    assert len(splits["train"]) + len(splits["test"]) == 5


def test_long_tailed_list_files(tmp_path):
    # the DIME / Food-101-LT form ("./data/food101/<class>/<id>.jpg <label>") and VFN186's spaces in paths
    for rel in ("data/food101/pad_thai/024492.jpg", "data/food101/pad_thai/024493.jpg", "data/food101/dumplings/035656.jpg",
                "data/vfn/french fries/1.jpg"):
        _jpeg(tmp_path / rel)
    lt = tmp_path / "train_lt.txt"
    lt.write_text("./data/food101/pad_thai/024492.jpg 1\ndata/food101/pad_thai/024493.jpg 1\n\n"
                  "./data/food101/dumplings/035656.jpg 0\ndata/vfn/french fries/1.jpg 2\n")
    images = read_image_list(lt)
    assert images.files[0] == "data/food101/pad_thai/024492.jpg" and images.files[3] == "data/vfn/french fries/1.jpg"
    assert images.labels.tolist() == [1, 1, 0, 2]
    assert images.classes == ["dumplings", "pad_thai", "french fries"]  # named after their folders
    assert images.counts().tolist() == [1, 2, 1]
    named = read_image_list(lt, tmp_path, class_names=["a", "b", "c"])
    assert named.classes == ["a", "b", "c"] and named.path(0).is_file()


@pytest.mark.parametrize("line, message", [
    ("data/food101/pad_thai/024492.jpg", r"line 1: .* has no label field"),
    ("data/food101/pad_thai/024492.jpg seventy", r"line 1: label field 'seventy' is not an integer"),
    ("data/food101/pad_thai/024492.jpg -1", r"line 1: label -1 is negative"),
    ("data/food101/pad_thai/missing.jpg 3", r"line 1: image .*missing\.jpg not found \(paths are read relative to"),
])
def test_list_file_bad_input(tmp_path, line, message):
    _jpeg(tmp_path / "data/food101/pad_thai/024492.jpg")
    lt = tmp_path / "train_lt.txt"
    lt.write_text(line + "\n")
    with pytest.raises(DatasetFormatError, match=message):
        read_image_list(lt)


def test_list_file_duplicates_and_names(tmp_path):
    _jpeg(tmp_path / "a/x.jpg")
    lt = tmp_path / "list.txt"
    lt.write_text("a/x.jpg 0\na/x.jpg 0\n")
    with pytest.raises(DatasetFormatError, match=r"line 2: 'a/x\.jpg' is already listed on line 1"):
        read_image_list(lt)
    lt.write_text("a/x.jpg 4\n")
    with pytest.raises(DatasetFormatError, match=r"label 4 has no name \(2 class names given\)"):
        read_image_list(lt, class_names=["p", "q"])


def test_image_folder(tmp_path):
    root = tmp_path / "train"
    _jpeg(root / "sushi" / "1.jpg")
    _jpeg(root / "sushi" / "nested" / "2.PNG")  # walked recursively, extensions case-insensitive (torchvision)
    _jpeg(root / "ramen" / "3.jpeg")
    images = read_image_folder(root)
    assert images.classes == ["ramen", "sushi"]  # sorted, as torchvision's find_classes
    assert images.files == ["ramen/3.jpeg", "sushi/1.jpg", "sushi/nested/2.PNG"]
    assert images.labels.tolist() == [0, 1, 1]
    again = read_image_folder(root, classes=["sushi", "ramen"])  # another split keeps train's order
    assert dict(zip(again.files, again.labels.tolist())) == {"sushi/1.jpg": 0, "sushi/nested/2.PNG": 0, "ramen/3.jpeg": 1}


def test_image_folder_agrees_with_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    for rel in ("tacos/a.jpg", "tacos/deep/b.png", "churros/c.jpeg", "churros/d.jpg"):
        _jpeg(tmp_path / rel)
    ours, theirs = read_image_folder(tmp_path), ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes
    assert sorted((str(ours.path(i)), int(ours.labels[i])) for i in range(len(ours))) == sorted(theirs.samples)


def test_image_folder_bad_input(tmp_path):
    root = tmp_path / "train"
    _jpeg(root / "sushi" / "1.jpg")
    (root / "sushi" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetFormatError, match=r"1 files are not images \(expected extensions .*\.jpg.*sushi/notes\.txt"):
        read_image_folder(root)
    (root / "sushi" / "notes.txt").unlink()
    (root / "ramen").mkdir()
    with pytest.raises(DatasetFormatError, match=r"ramen: class folder holds no images"):
        read_image_folder(root)
    with pytest.raises(DatasetFormatError, match=r"class folders differ .*missing \['udon'\]"):
        read_image_folder(root, classes=["ramen", "sushi", "udon"])
    _jpeg(root / "loose.jpg")
    with pytest.raises(DatasetFormatError, match=r"files \['loose\.jpg'\] lie outside the class folders"):
        read_image_folder(root)
    with pytest.raises(DatasetFormatError, match=r"folder not found"):
        read_image_folder(tmp_path / "nowhere")
