"""Readers of the food image layouts, each checked against its published description.

* Food-101 (Bossard et al., ECCV 2014; the ``food-101`` archive's README): ``images/<class>/<id>.jpg``,
  ``meta/classes.txt`` (one class name per line, its position is the label), ``meta/train.txt``
  and ``meta/test.txt`` with ``<class>/<id>`` lines (no extension; 750 / 250 images per class).
  ``meta/labels.txt`` (display names) is not needed. A ``meta/val.txt`` in the same form is read
  when present (the generated sets write one).
* Long-tailed list files (``train_lt.txt`` / ``test.txt`` of ImageNet-LT, Liu et al. CVPR 2019, and
  of Food-101-LT / VFN186-LT as the DIME code ships them): one ``<path> <label>`` line per image,
  the label an integer, the path relative to a data root. Paths may hold spaces (VFN186 does):
  the label is the last whitespace-separated field.
* ImageFolder trees (torchvision's ``ImageFolder``): ``<root>/<class>/**/<file>`` with an image
  extension; classes are the sorted sub-folder names.

Bad input raises :class:`DatasetFormatError` naming the file, the line or field, and the form
expected. Nothing is dropped silently: a listed image that does not exist, a file in an
ImageFolder class that is not an image, a duplicated line are errors, and images in a Food-101
``images/`` folder that no split lists are reported in a warning. (The DIME reference replaces an
unreadable image by a random other one or by a black image and rewrites spaces in VFN paths to
underscores; here both are errors that name the file.)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from suite.data import DataFormatError


class DatasetFormatError(DataFormatError):
    """Input data that does not have the expected form (the suite's :class:`~suite.data.DataFormatError`,
    a ``ValueError``); the message says where (file, line or field) and what form was expected."""

    def __init__(self, message: str, path: str | Path | None = None, field: str | None = None) -> None:
        ValueError.__init__(self, message)  # the message already names the file, the field and the form
        self.path = str(path) if path is not None else message.split(": ", 1)[0].split(", line ", 1)[0]
        self.field = field


@dataclass
class ImageList:
    """The images of one split: ``files`` relative to ``root``, integer ``labels``, class names by label."""

    root: Path
    files: list[str]
    labels: np.ndarray
    classes: list[str]
    source: str  # the file or folder that listed them, for messages

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def subset(self, idx: Sequence[int] | np.ndarray) -> "ImageList":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageList(self.root, [self.files[i] for i in idx], self.labels[idx], self.classes, self.source)

    def counts(self) -> np.ndarray:
        """Images per class (length ``len(classes)``)."""
        return np.bincount(self.labels, minlength=len(self.classes))


def _lines(path: Path, form: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found (expected {form})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({err}); expected {form}") from err
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# ------------------------------------------------------------------------------------------------
# Food-101
def read_food101(root: str | Path) -> dict[str, ImageList]:
    """``{"train", "test"[, "val"]}`` of a Food-101 folder (the one holding ``images/`` and ``meta/``)."""
    root = Path(root)
    meta = root / "meta"
    if not (root / "images").is_dir():
        raise DatasetFormatError(f"{root}: no images/ folder (expected the Food-101 layout images/<class>/<id>.jpg, meta/)")
    class_lines = _lines(meta / "classes.txt", "one class name per line, e.g. apple_pie")
    classes: list[str] = []
    for n, name in class_lines:
        if "/" in name or len(name.split()) != 1:
            raise DatasetFormatError(f"{meta / 'classes.txt'}, line {n}: class name {name!r} must be one word without '/'")
        if name in classes:
            raise DatasetFormatError(f"{meta / 'classes.txt'}, line {n}: class {name!r} is listed twice")
        classes.append(name)
    if not classes:
        raise DatasetFormatError(f"{meta / 'classes.txt'}: no classes listed")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        list_file = meta / f"{split}.txt"
        if split == "val" and not list_file.is_file():
            continue
        files, labels = [], []
        for n, line in _lines(list_file, "lines <class>/<id> such as apple_pie/1005649"):
            name, sep, image_id = line.partition("/")
            where = f"{list_file}, line {n}"
            if not sep or not image_id or "/" in image_id or " " in line:
                raise DatasetFormatError(f"{where}: {line!r} is not of the form <class>/<id> (e.g. apple_pie/1005649)")
            if name not in index:
                raise DatasetFormatError(f"{where}: class {name!r} is not in {meta / 'classes.txt'}")
            rel = f"images/{line}.jpg"
            if rel in seen:
                raise DatasetFormatError(f"{where}: {line!r} is already listed in {seen[rel]}")
            if not (root / rel).is_file():
                raise DatasetFormatError(f"{where}: image {root / rel} not found")
            seen[rel] = where
            files.append(rel)
            labels.append(index[name])
        splits[split] = ImageList(root, files, np.array(labels, dtype=np.int64), classes, str(list_file))
    unlisted = [str(p.relative_to(root)) for p in sorted((root / "images").rglob("*"))
                if p.is_file() and str(p.relative_to(root)) not in seen]
    if unlisted:
        warnings.warn(f"{root}: {len(unlisted)} files under images/ are in no split list and are not used, "
                      f"e.g. {unlisted[:3]}", stacklevel=2)
    return splits


# ------------------------------------------------------------------------------------------------
# "<path> <label>" list files (ImageNet-LT, Food-101-LT, VFN186)
def read_image_list(list_file: str | Path, root: str | Path | None = None, class_names: Sequence[str] | None = None) -> ImageList:
    """Read ``<path> <label>`` lines; paths are relative to ``root`` (default: the list's folder).

    Class names come from ``class_names`` when given, else from the folder holding each class's
    images when that folder is the same for all of them (``pad_thai/024492.jpg 70`` names class
    70 ``pad_thai``), else ``class_<label>``.
    """
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    form = "lines '<path> <label>' with an integer label >= 0, e.g. 'train/pad_thai/024492.jpg 70'"
    files, labels, seen = [], [], {}
    for n, line in _lines(list_file, form):
        where = f"{list_file}, line {n}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DatasetFormatError(f"{where}: {line!r} has no label field; expected {form}")
        rel, label = parts
        try:
            value = int(label)
        except ValueError:
            raise DatasetFormatError(f"{where}: label field {label!r} is not an integer; expected {form}") from None
        if value < 0:
            raise DatasetFormatError(f"{where}: label {value} is negative; expected {form}")
        rel = rel[2:] if rel.startswith("./") else rel
        if rel in seen:
            raise DatasetFormatError(f"{where}: {rel!r} is already listed on line {seen[rel]}")
        if not (root / rel).is_file():
            raise DatasetFormatError(f"{where}: image {root / rel} not found (paths are read relative to {root})")
        seen[rel] = n
        files.append(rel)
        labels.append(value)
    if not files:
        raise DatasetFormatError(f"{list_file}: no images listed; expected {form}")
    labels_arr = np.array(labels, dtype=np.int64)
    n_classes = int(labels_arr.max()) + 1
    if class_names is not None:
        if len(class_names) < n_classes:
            raise DatasetFormatError(f"{list_file}: label {n_classes - 1} has no name ({len(class_names)} class names given)")
        names = list(class_names)
    else:
        names = []
        for c in range(n_classes):
            parents = {Path(files[i]).parent.name for i in np.flatnonzero(labels_arr == c)}
            names.append(parents.pop() if len(parents) == 1 else f"class_{c}")
    return ImageList(root, files, labels_arr, names, str(list_file))


# ------------------------------------------------------------------------------------------------
# ImageFolder
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def read_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageList:
    """``<root>/<class>/**/<image>`` (torchvision's ImageFolder); ``classes`` fixes names and order.

    As in torchvision, classes are the sorted sub-folder names and folders are walked recursively.
    Unlike torchvision, a non-image file, a file directly in ``root`` or an empty class folder is
    an error rather than skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: folder not found (expected an ImageFolder tree <root>/<class>/<image>)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    loose = sorted(e.name for e in os.scandir(root) if e.is_file())
    if loose:
        raise DatasetFormatError(f"{root}: files {loose[:3]} lie outside the class folders (expected <root>/<class>/<image>)")
    names = list(classes) if classes is not None else found
    if not names:
        raise DatasetFormatError(f"{root}: no class folders (expected an ImageFolder tree <root>/<class>/<image>)")
    if set(found) != set(names):
        raise DatasetFormatError(
            f"{root}: class folders differ from the expected classes: missing {sorted(set(names) - set(found))[:5]}, "
            f"unexpected {sorted(set(found) - set(names))[:5]}"
        )
    files, labels = [], []
    for label, name in enumerate(names):
        own, bad = [], []
        for dirpath, _, filenames in os.walk(root / name, followlinks=True):
            for f in sorted(filenames):
                rel = str((Path(dirpath) / f).relative_to(root))
                (own if _is_image(f) else bad).append(rel)
        if bad:
            raise DatasetFormatError(f"{root}: {len(bad)} files are not images (expected extensions "
                                     f"{', '.join(IMG_EXTENSIONS)}), e.g. {bad[:3]}")
        if not own:
            raise DatasetFormatError(f"{root / name}: class folder holds no images")
        files += sorted(own)
        labels += [label] * len(own)
    return ImageList(root, files, np.array(labels, dtype=np.int64), names, str(root))


def check_same_classes(lists: Iterable[tuple[str, ImageList]]) -> None:
    """Every split must hold at least one image of every class (test accuracy needs them all)."""
    for name, split in lists:
        missing = np.flatnonzero(split.counts() == 0)
        if len(missing):
            raise DatasetFormatError(
                f"{split.source}: the {name} split has no images of classes {[split.classes[i] for i in missing[:5]]}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(split.classes)})"
            )
