"""Reading the chest X-ray data and carving the validation split by patient.

Three sources are understood: the Kaggle folder layout (``train``, ``val``, ``test``), the Mendeley
layout (``train`` and ``test`` only), each with ``NORMAL`` and ``PNEUMONIA`` class folders, and
MedMNIST ``pneumoniamnist*.npz`` files. Images of one child must never sit on both sides of the
train/validation boundary, or validation scores measure memory instead of generalisation.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.errors import PneumoniaError
from runtime.paths import default_cache_dir

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
EXPECTED_LAYOUT = (
    "DIR/train/{NORMAL,PNEUMONIA}/*.jpeg and DIR/test/{NORMAL,PNEUMONIA}/*.jpeg "
    "(Kaggle's DIR/val/ is optional), or a MedMNIST pneumoniamnist*.npz file"
)
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),  # person1234_bacteria_5678.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),  # IM-0115-0001.jpeg, NORMAL2-IM-0927-0001.jpeg
)
# What else a Kermany file name tells: the pneumonia's cause, or the series a normal film came in, and the
# patient's number in that series (one numbering across train and test).
_SUBGROUP_PATTERNS = (
    (re.compile(r"^person(\d+)_bacteria_"), "bacterial pneumonia"),
    (re.compile(r"^person(\d+)_virus_"), "viral pneumonia"),
    (re.compile(r"^NORMAL2-IM-(\d+)-"), "normal, NORMAL2- series"),
    (re.compile(r"^IM-(\d+)-"), "normal, IM- series"),
)
VALIDATION_SCHEMES = ("grouped", "block")


class DataLayoutError(PneumoniaError, ValueError):
    """The data directory is empty or not in a layout this project reads."""


def patient_id(filename: str) -> str:
    """The patient a Kermany file name belongs to; unknown patterns count as their own patient."""
    name = os.path.basename(filename)
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return os.path.splitext(name)[0]


def series_number(filename: str) -> tuple[str, int | None]:
    """(subgroup, patient number) a Kermany file name encodes: bacterial/viral pneumonia or the series of a
    normal film, and the patient's number in it; ("other", None) for names that tell neither."""
    name = os.path.basename(filename)
    for pattern, group in _SUBGROUP_PATTERNS:
        match = pattern.match(name)
        if match:
            return group, int(match.group(1))
    return "other", None


def subgroup(filename: str) -> str:
    """The subgroup a Kermany file name encodes (bacterial/viral pneumonia, series of a normal film)."""
    return series_number(filename)[0]


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: labels (0 = NORMAL, 1 = PNEUMONIA) with either file paths or decoded images."""

    name: str
    labels: np.ndarray
    patients: np.ndarray
    paths: np.ndarray | None = None
    images: np.ndarray | None = None  # uint8, (N, H, W) or (N, H, W, C)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}

    def subgroups(self) -> np.ndarray | None:
        """Each image's :func:`subgroup`, or None when the file names tell none (MedMNIST, other names)."""
        if self.paths is None:
            return None
        groups = np.asarray([subgroup(p) for p in self.paths])
        return None if (groups == "other").all() else groups

    def subset(self, index: np.ndarray, name: str | None = None) -> Split:
        return Split(
            name=name or self.name,
            labels=self.labels[index],
            patients=self.patients[index],
            paths=None if self.paths is None else self.paths[index],
            images=None if self.images is None else self.images[index],
        )


@dataclasses.dataclass(frozen=True)
class DataSplits:
    train: Split
    val: Split
    test: Split
    layout: str  # "kaggle", "mendeley" or "medmnist"
    source: str
    unreadable: tuple[str, ...]
    fingerprint: str  # train + val (what training sees) and how they were split
    test_fingerprint: str

    @property
    def patient_overlap(self) -> int:
        return len(set(self.train.patients) & set(self.val.patients))


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """The given path, else ``$PNEUMONIA_DATA``; a clear error when neither is set."""
    chosen = str(path) if path else os.environ.get("PNEUMONIA_DATA", "")
    if not chosen:
        raise DataLayoutError(
            "no data given: pass --data DIR (or data.path in the config) or set PNEUMONIA_DATA; "
            f"expected {EXPECTED_LAYOUT}"
        )
    resolved = Path(chosen).expanduser()
    if not resolved.exists():
        raise DataLayoutError(f"data path does not exist: {resolved}; expected {EXPECTED_LAYOUT}")
    return resolved


def detect_layout(root: Path) -> tuple[str, Path]:
    """Return (layout, path): the layout name and the folder or file that holds the splits."""
    if root.is_file():
        if root.suffix == ".npz":
            return "medmnist", root
        raise DataLayoutError(f"{root} is a file but not an .npz; expected {EXPECTED_LAYOUT}")
    if (root / "train").is_dir():
        return ("kaggle" if (root / "val").is_dir() else "mendeley"), root
    npz = sorted(root.glob("pneumoniamnist*.npz"))
    if npz:
        # Prefer the largest resolution when several sizes sit in one cache dir.
        return "medmnist", max(npz, key=lambda p: p.stat().st_size)
    nested = [p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir() and p.name != "__MACOSX"]
    if len(nested) == 1:  # Kaggle's zip nests chest_xray/chest_xray/...
        return detect_layout(nested[0])
    raise DataLayoutError(f"no chest X-ray data found in {root}; expected {EXPECTED_LAYOUT}")


def _list_folder_split(folder: Path) -> tuple[list[str], list[int]]:
    missing = [c for c in CLASS_NAMES if not (folder / c).is_dir()]
    if missing:
        raise DataLayoutError(f"{folder} lacks class folder(s) {', '.join(missing)}; expected {EXPECTED_LAYOUT}")
    paths, labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        for entry in sorted(os.scandir(folder / name), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                paths.append(entry.path)
                labels.append(label)
    return paths, labels


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format not in {"JPEG", "PNG", "BMP", "GIF"}:
                return False
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means the file cannot be trained on
        return False


def find_unreadable(paths: list[str], workers: int | None = None) -> list[str]:
    """Paths that do not decode as an image the input pipeline can read (full decode, in threads)."""
    workers = workers or min(8, len(os.sched_getaffinity(0)) * 2)
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(_readable, paths, chunksize=64))
    return [p for p, good in zip(paths, ok) if not good]


def find_unreadable_cached(paths: list[str]) -> list[str]:
    """:func:`find_unreadable`, remembered in the cache dir for this exact set of files (path, size, modification
    time): every trial of a search lists the data, and decoding all of it each time cost seconds per trial."""
    import json

    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cached = default_cache_dir() / "unreadable" / f"{digest.hexdigest()[:32]}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    unreadable = find_unreadable(paths)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_name(f".{cached.name}.{os.getpid()}")
        temporary.write_text(json.dumps(unreadable))
        os.replace(temporary, cached)  # whole or absent, with trials writing side by side
    except OSError:
        pass  # a read-only cache only costs the decode next time
    return unreadable


def _folder_split(name: str, folder: Path, unreadable: set[str]) -> Split:
    paths, labels = _list_folder_split(folder)
    keep = [i for i, p in enumerate(paths) if p not in unreadable]
    paths = [paths[i] for i in keep]
    labels = [labels[i] for i in keep]
    return Split(
        name=name,
        labels=np.asarray(labels, dtype=np.int64),
        patients=np.asarray([patient_id(p) for p in paths]),
        paths=np.asarray(paths),
    )


def _npz_split(data: np.lib.npyio.NpzFile, name: str, source: Path) -> Split:
    try:
        images, labels = data[f"{name}_images"], data[f"{name}_labels"]
    except KeyError:
        raise DataLayoutError(
            f"{source} lacks {name}_images/{name}_labels; expected MedMNIST keys "
            "train_images, train_labels, val_images, val_labels, test_images, test_labels"
        ) from None
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise DataLayoutError(f"{source}: {name}_images must be uint8 (N, H, W[, C]) matching {name}_labels")
    # MedMNIST has no patient ids; each image stands for itself and its own val split is used.
    patients = np.asarray([f"{name}-{i:05d}" for i in range(len(labels))])
    return Split(name=name, labels=labels, patients=patients, images=images)


def grouped_split(pool: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Carve validation from ``pool`` by patient, stratified by class (one fold of k = 1/fraction)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1.0 / val_fraction))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_index, val_index = next(folds.split(np.zeros(len(pool)), pool.labels, pool.patients))
    return pool.subset(np.sort(train_index), "train"), pool.subset(np.sort(val_index), "val")


def block_split(pool: Split, val_fraction: float) -> tuple[Split, Split]:
    """Carve validation as the test split was drawn: in each class and series, the lowest-numbered patients
    (the ones next to the test split's block), whole patients, about the same share as :func:`grouped_split`.

    Kermany's test split holds the lowest block of each normal series and a contiguous block of bacterial
    patients, so a validation carved at random cannot show what differs there; the adjacent patients can.
    Bacterial and viral films share one numbering of children, so they are one series here. Names that tell
    no series or number ("other") are ordered by patient id.
    """
    if pool.paths is None:
        raise DataLayoutError("data.validation=block needs Kermany file names; MedMNIST keeps its own validation split")
    fraction = 1.0 / max(2, round(1.0 / val_fraction))  # the share of one of grouped_split's k folds
    named = [series_number(p) for p in pool.paths]
    # bacterial and viral films share one numbering of children (person123_bacteria_..., person123_virus_...)
    groups = np.asarray(["pneumonia" if group.endswith("pneumonia") else group for group, _ in named])
    numbers = np.asarray([-1 if number is None else number for _, number in named])
    held_out: set[str] = set()
    for label in (0, 1):
        for group in np.unique(groups[pool.labels == label]):
            member = np.flatnonzero((pool.labels == label) & (groups == group))
            order = member[np.lexsort((pool.patients[member], numbers[member]))]
            films = collections.Counter(pool.patients[member])
            taken = sum(films[patient] for patient in held_out)  # children already held out with another series
            for patient in dict.fromkeys(pool.patients[order]):  # ascending patient number, each once
                if taken >= fraction * len(member):
                    break
                if patient not in held_out:
                    held_out.add(patient)
                    taken += films[patient]
    val = np.isin(pool.patients, list(held_out))  # every film of a held-out child, whatever its series
    return pool.subset(np.flatnonzero(~val), "train"), pool.subset(np.flatnonzero(val), "val")


def stratified_subset(split: Split, limit: int, seed: int) -> Split:
    """At most ``limit`` images of ``split``, with its class balance (for smoke runs)."""
    if not limit or limit >= len(split):
        return split
    from sklearn.model_selection import train_test_split

    index, _ = train_test_split(
        np.arange(len(split)), train_size=limit, stratify=split.labels, random_state=seed
    )
    return split.subset(np.sort(index))


def _fingerprint(layout: str, source: Path, splits: list[Split], val_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{layout}|{val_fraction}|{seed}".encode())
    if layout == "medmnist":
        digest.update(f"{source.name}|{source.stat().st_size}".encode())
    for split in splits:
        for i, label in enumerate(split.labels):
            item = os.path.basename(split.paths[i]) if split.paths is not None else str(i)
            digest.update(f"{split.name}/{label}/{item}\n".encode())
    return digest.hexdigest()[:16]


def load_splits(
    path: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    seed: int = 42,
    max_train_images: int = 0,
    max_val_images: int = 0,
    check_files: bool = True,
    validation: str = "grouped",
) -> DataSplits:
    """List train/val/test of any supported layout; unreadable files are reported and left out.

    ``validation``: ``grouped`` (a seeded patient-grouped fold, :func:`grouped_split`) or ``block`` (the
    lowest-numbered patients of each series, :func:`block_split`); MedMNIST keeps its own validation split.
    """
    if validation not in VALIDATION_SCHEMES:
        raise DataLayoutError(f"validation must be one of {', '.join(VALIDATION_SCHEMES)}, got {validation!r}")
    layout, source = detect_layout(resolve_data_path(path))
    if layout == "medmnist":
        with np.load(source) as data:
            train, val, test = (_npz_split(data, name, source) for name in ("train", "val", "test"))
        unreadable: list[str] = []
    else:
        folders = {"train": source / "train", "test": source / "test"}
        if not folders["test"].is_dir():
            raise DataLayoutError(f"{source} has train/ but no test/; expected {EXPECTED_LAYOUT}")
        listed = {name: _list_folder_split(folder)[0] for name, folder in folders.items()}
        if layout == "kaggle":
            listed["val"] = _list_folder_split(source / "val")[0]
        all_paths = [p for paths in listed.values() for p in paths]
        unreadable = find_unreadable_cached(all_paths) if check_files else []
        bad = set(unreadable)
        train_pool = _folder_split("train", folders["train"], bad)
        if layout == "kaggle":  # Kaggle's 16-image val folder joins the pool the split is carved from
            extra = _folder_split("train", source / "val", bad)
            train_pool = Split(
                "train",
                np.concatenate([train_pool.labels, extra.labels]),
                np.concatenate([train_pool.patients, extra.patients]),
                paths=np.concatenate([train_pool.paths, extra.paths]),
            )
        test = _folder_split("test", folders["test"], bad)
        for split in (train_pool, test):
            missing = [n for n, c in split.counts().items() if c == 0]
            if missing:
                raise DataLayoutError(
                    f"{source}/{split.name} has no readable images of class {', '.join(missing)}; "
                    f"expected {EXPECTED_LAYOUT}"
                )
        if validation == "block":
            train, val = block_split(train_pool, val_fraction)
        else:
            train, val = grouped_split(train_pool, val_fraction, seed)
    fingerprint = _fingerprint(layout, source, [train, val], val_fraction, seed)
    test_fingerprint = _fingerprint(layout, source, [test], 0.0, 0)
    train = stratified_subset(train, max_train_images, seed)
    val = stratified_subset(val, max_val_images, seed)
    return DataSplits(train, val, test, layout, str(source), tuple(unreadable), fingerprint, test_fingerprint)


def series_ranges(splits: DataSplits) -> list[dict]:
    """Per split and file-name series: images, patients and the range of patient numbers (where names tell)."""
    rows = []
    for split in (splits.train, splits.val, splits.test):
        if split.paths is None:
            continue
        named = [series_number(p) for p in split.paths]
        for group in sorted({g for g, _ in named}):
            numbers = [n for g, n in named if g == group and n is not None]
            patients = {pat for pat, (g, _) in zip(split.patients, named) if g == group}
            rows.append({"split": split.name, "series": group, "images": sum(g == group for g, _ in named),
                         "patients": len(patients), "first": min(numbers, default=None),
                         "last": max(numbers, default=None)})
    return rows


def summarize(splits: DataSplits) -> dict:
    """What ``pneumonia data check`` prints: counts per split and class, patients, overlap."""
    per_split = {}
    for split in (splits.train, splits.val, splits.test):
        per_split[split.name] = {
            **split.counts(),
            "total": len(split),
            "patients": len(set(split.patients)),
        }
    return {
        "source": splits.source,
        "layout": splits.layout,
        "splits": per_split,
        "train_plus_val": len(splits.train) + len(splits.val),
        "patient_overlap": splits.patient_overlap,
        "series": series_ranges(splits),
        "unreadable": list(splits.unreadable),
        "fingerprint": splits.fingerprint,
        "test_fingerprint": splits.test_fingerprint,
    }
