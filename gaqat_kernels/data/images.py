"""Image datasets in DomainBed's ImageFolder layout (``root/<domain>/<class>/*.jpg``) and PACS straight from
its per-domain zips (members ``PACS/<domain>/<class>/*.jpg``, as in ../shared/data/pacs128)."""
from __future__ import annotations

import io
import os
import zipfile
from typing import Dict, List, Optional, Sequence

from PIL import Image

from .base import FileDomain, MultiDomainDataset
from .transforms import EvalTransform, TrainTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
KNOWN_DOMAINS: Dict[str, List[str]] = {
    "PACS": ["art_painting", "cartoon", "photo", "sketch"],
    "VLCS": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
    "OfficeHome": ["Art", "Clipart", "Product", "Real World"],
    "TerraIncognita": ["location_100", "location_38", "location_43", "location_46"],
    "DomainNet": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
}


def _layout_error(name: str, root: str, detail: str) -> FileNotFoundError:
    domains = KNOWN_DOMAINS.get(name, ["<domain>"])
    return FileNotFoundError(
        f"data root: {detail}. Expected {name} in DomainBed's layout: {root}/<domain>/<class>/<image> with "
        f"domains {domains}" + (" (or, for PACS, the per-domain zips art_painting.zip, ...)" if name == "PACS" else ""))


def _same_classes(name: str, root: str, classes, found, where: str):
    """``found`` if it is the first domain's class list or equals it; else a layout error naming ``where``."""
    if classes is not None and found != classes:
        raise _layout_error(name, root, f"{where} has classes {found}, the first domain has {classes}")
    return found


def _folder_domains(name: str, root: str, domains: Sequence[str]):
    classes = None
    files, labels = [], []
    for d in domains:
        droot = os.path.join(root, d)
        found = sorted(c for c in os.listdir(droot) if os.path.isdir(os.path.join(droot, c)))
        if not found:
            raise _layout_error(name, root, f"domain folder {droot!r} has no class folders")
        classes = _same_classes(name, root, classes, found, f"domain {d!r}")
        f, l = [], []
        for k, c in enumerate(classes):
            for fn in sorted(os.listdir(os.path.join(droot, c))):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    f.append(os.path.join(droot, c, fn))
                    l.append(k)
        if not f:
            raise _layout_error(name, root, f"domain folder {droot!r} holds no images")
        files.append(f)
        labels.append(l)
    return classes, files, labels


def _zip_domains(name: str, root: str, domains: Sequence[str]):
    classes, members, labels, archives = None, [], [], []
    for d in domains:
        path = os.path.join(root, d + ".zip")
        archive = zipfile.ZipFile(path)
        names = sorted(n for n in archive.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
        parts = [n.split("/") for n in names]
        found = sorted({p[-2] for p in parts if len(p) >= 2})
        if not names:
            raise _layout_error(name, root, f"{path} holds no images")
        classes = _same_classes(name, root, classes, found, path)
        members.append(names)
        labels.append([classes.index(p[-2]) for p in parts])
        archives.append(path)
    return classes, members, labels, archives


class _ZipReader:
    """Reads members of one zip; reopens the archive in each worker process (zip handles do not fork well)."""

    def __init__(self, path: str, members: List[str]):
        self.path, self.members, self._archive, self._pid = path, members, None, None

    def __call__(self, i: int) -> Image.Image:
        if self._archive is None or self._pid != os.getpid():
            self._archive, self._pid = zipfile.ZipFile(self.path), os.getpid()
        with self._archive.open(self.members[i]) as f:
            return Image.open(io.BytesIO(f.read())).convert("RGB")

    def __getstate__(self):
        return {"path": self.path, "members": self.members, "_archive": None, "_pid": None}


def _open_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def image_folder_dataset(name: str, root: str, image_size: int = 224,
                         domains: Optional[Sequence[str]] = None) -> MultiDomainDataset:
    """A DomainBed image dataset: ``root/<domain>/<class>/*`` folders, or ``root/<domain>.zip`` files.

    ``domains`` defaults to DomainBed's domain list for ``name`` (PACS, VLCS, OfficeHome, TerraIncognita,
    DomainNet); for other names, every sub-folder (or zip) of ``root``.
    """
    if root is None or not os.path.isdir(root):
        raise _layout_error(name, str(root), f"{root!r} is not a directory")
    entries = os.listdir(root)
    if domains is None:
        domains = KNOWN_DOMAINS.get(name) or sorted(
            e[:-4] if e.endswith(".zip") else e for e in entries
            if os.path.isdir(os.path.join(root, e)) or e.endswith(".zip"))
    domains = list(domains)
    if not domains:
        raise _layout_error(name, root, "no domains found")
    evaluate = EvalTransform(image_size)
    if all(os.path.isdir(os.path.join(root, d)) for d in domains):
        classes, files, labels = _folder_domains(name, root, domains)
        loaders = [lambda i, f=f: _open_image(f[i]) for f in files]
    elif all(os.path.isfile(os.path.join(root, d + ".zip")) for d in domains):
        classes, members, labels, archives = _zip_domains(name, root, domains)
        loaders = [_ZipReader(a, m) for a, m in zip(archives, members)]
    else:
        missing = [d for d in domains if not os.path.exists(os.path.join(root, d))
                   and not os.path.exists(os.path.join(root, d + ".zip"))]
        raise _layout_error(name, root, f"missing domains {missing}")
    return MultiDomainDataset(name, domains, [FileDomain(load, lab, evaluate) for load, lab in zip(loaders, labels)],
                              (3, image_size, image_size), len(classes), train_transform=TrainTransform(image_size))
