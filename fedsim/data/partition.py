"""Partitioners: split a training set among federated clients.

Every partitioner is a pure function of its inputs and an explicit
``np.random.Generator``: the same generator state gives the same partition.
Each draws its random split once and then runs a deterministic repair that moves
samples from the largest clients to those below ``min_size`` (no
resample-until-it-fits loops, so termination is guaranteed).

Example:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(10), 50)
    >>> p = dirichlet(labels, 8, alpha=0.5, rng=np.random.default_rng(0))
    >>> sum(len(i) for i in p.indices)
    500
    >>> heterogeneity_line(partition_stats(p, labels, 10))[:32]
    'partition dirichlet: 8 clients, '

References:
    Dirichlet label skew: Hsu et al., arXiv 1909.06335. Shards: McMahan et al.,
    arXiv 1602.05629. Natural (role) clients: LEAF, Caldas et al., arXiv 1812.01097.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

_PARAMS: dict[str, dict[str, object]] = {
    "iid": {"min_size": 1},
    "dirichlet": {"alpha": 0.5, "min_size": 1},
    "shards": {"classes_per_client": 2, "min_size": 1},
    "quantity": {"distribution": "lognormal", "sigma": 1.0, "exponent": 1.5, "min_size": 1},
    "natural": {"min_size": 1},
}


@dataclass(frozen=True, eq=False)
class Partition:
    """Assignment of training-sample indices to clients.

    Attributes:
        indices: Per client, int64 indices into the train set, sorted ascending.
        dropped: Train samples assigned to no client (only ``natural`` drops).
        kind: Partitioner name (``iid``, ``dirichlet``, ``shards``, ``quantity``,
            ``natural``).
        client_ids: For ``natural``, the natural id of each client; else None.
    """

    indices: tuple[np.ndarray, ...]
    dropped: int
    kind: str
    client_ids: tuple[int, ...] | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.indices)


def _check_common(n: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if n < num_clients * min_size:
        raise ValueError(
            f"the data has only {n} samples for {num_clients} clients x min_size "
            f"{min_size} (= {num_clients * min_size}); lower num_clients or min_size"
        )


def _repair(groups: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move samples from the largest clients to those under ``min_size``.

    Deterministic; at most ``2 * len(groups)`` moves, because each move either
    fills a client or brings a donor down to ``min_size``. The caller has checked
    that the total is at least ``len(groups) * min_size``.
    """
    groups = list(groups)
    sizes = np.array([len(g) for g in groups])
    while sizes.min() < min_size:
        small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
        take = min(min_size - sizes[small], sizes[big] - min_size)
        moved, groups[big] = groups[big][-take:], groups[big][:-take]
        groups[small] = np.concatenate([groups[small], moved])
        sizes[small] += take
        sizes[big] -= take
    return groups


def _finish(groups: list[np.ndarray], kind: str, min_size: int, dropped: int = 0,
            client_ids: tuple[int, ...] | None = None) -> Partition:
    groups = _repair(groups, min_size)
    indices = tuple(np.sort(np.asarray(g, dtype=np.int64)) for g in groups)
    return Partition(indices=indices, dropped=dropped, kind=kind, client_ids=client_ids)


def iid(n: int, num_clients: int, rng: np.random.Generator, *, min_size: int = 1) -> Partition:
    """Uniformly random split into clients of equal size (±1).

    Args:
        n: Number of training samples.
        num_clients: Number of clients.
        rng: Source of randomness.
        min_size: Minimum samples per client.

    Returns:
        The partition.
    """
    _check_common(n, num_clients, min_size)
    return _finish(np.array_split(rng.permutation(n), num_clients), "iid", min_size)


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              *, min_size: int = 1) -> Partition:
    """Label skew: per class, client proportions drawn from ``Dir(alpha)``.

    Small ``alpha`` (0.1) gives clients dominated by a few classes; large
    ``alpha`` (100) approaches IID.

    Args:
        labels: Integer label per training sample.
        num_clients: Number of clients.
        alpha: Dirichlet concentration, > 0.
        rng: Source of randomness.
        min_size: Minimum samples per client (repaired after the draw).

    Returns:
        The partition.
    """
    labels = np.asarray(labels)
    _check_common(len(labels), num_clients, min_size)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(members)).astype(np.int64)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].append(chunk)
    groups = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    return _finish(groups, "dirichlet", min_size)


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
           rng: np.random.Generator, *, min_size: int = 1) -> Partition:
    """Pathological label skew: each client holds ``classes_per_client`` classes.

    Client windows of consecutive classes are cut from a random class order,
    so each class is held by an equal (±1) number of clients; every class's
    samples are split evenly among its holders (label-pure shards). A client
    has at most ``classes_per_client`` classes unless the ``min_size`` repair
    had to move samples. ``classes_per_client`` is capped at the number of
    classes present.

    Args:
        labels: Integer label per training sample.
        num_clients: Number of clients.
        classes_per_client: Classes per client, >= 1.
        rng: Source of randomness.
        min_size: Minimum samples per client.

    Returns:
        The partition.

    Raises:
        ValueError: If ``num_clients * classes_per_client`` cannot cover all classes.
    """
    labels = np.asarray(labels)
    _check_common(len(labels), num_clients, min_size)
    if classes_per_client < 1:
        raise ValueError(f"classes_per_client must be >= 1, got {classes_per_client}")
    classes = rng.permutation(np.unique(labels))
    per = min(classes_per_client, len(classes))
    if num_clients * per < len(classes):
        raise ValueError(
            f"shards: {num_clients} clients x {per} classes per client cannot cover the "
            f"{len(classes)} classes in the data; raise num_clients or classes_per_client"
        )
    slot_class = classes[np.arange(num_clients * per) % len(classes)]
    slot_client = rng.permutation(num_clients).repeat(per)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = slot_client[slot_class == c]
        members = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in zip(holders, np.array_split(members, len(holders))):
            parts[k].append(chunk)
    groups = [np.concatenate(p) for p in parts]
    return _finish(groups, "shards", min_size)


def quantity(n: int, num_clients: int, rng: np.random.Generator, *,
             distribution: str = "lognormal", sigma: float = 1.0, exponent: float = 1.5,
             min_size: int = 1) -> Partition:
    """Quantity skew: client sizes from a heavy-tailed law, labels IID.

    Weights are ``lognormal(0, sigma)`` or, for ``"powerlaw"``, Pareto with shape
    ``exponent`` (``1 + rng.pareto(exponent)``); sizes are one multinomial draw
    with those proportions, then repaired to ``min_size``.

    Args:
        n: Number of training samples.
        num_clients: Number of clients.
        rng: Source of randomness.
        distribution: ``"lognormal"`` or ``"powerlaw"``.
        sigma: Lognormal shape (larger = more skew).
        exponent: Pareto shape, > 0 (smaller = heavier tail).
        min_size: Minimum samples per client.

    Returns:
        The partition.
    """
    _check_common(n, num_clients, min_size)
    if distribution == "lognormal":
        if sigma < 0:
            raise ValueError(f"quantity sigma must be >= 0, got {sigma}")
        weights = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "powerlaw":
        if not exponent > 0:
            raise ValueError(f"quantity exponent must be > 0, got {exponent}")
        weights = 1.0 + rng.pareto(exponent, num_clients)
    else:
        raise ValueError(
            f"quantity distribution must be 'lognormal' or 'powerlaw', got {distribution!r}"
        )
    sizes = rng.multinomial(n, weights / weights.sum())
    groups = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
    return _finish(groups, "quantity", min_size)


def natural(ids: np.ndarray, rng: np.random.Generator, *, num_clients: int | None = None,
            min_size: int = 1) -> Partition:
    """One client per natural id (e.g. a Shakespeare role).

    Ids with fewer than ``min_size`` samples are dropped. If ``num_clients`` is
    smaller than the number of remaining ids, ``num_clients`` ids are picked with
    ``rng``; clients are in ascending id order. Samples of dropped or unpicked
    ids are counted in ``dropped``.

    Args:
        ids: Natural id per training sample.
        rng: Source of randomness (used only to pick ids).
        num_clients: Number of clients; None = every eligible id.
        min_size: Minimum samples for an id to become a client.

    Returns:
        The partition, with ``client_ids`` set.
    """
    ids = np.asarray(ids)
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    uniq, counts = np.unique(ids, return_counts=True)
    eligible = uniq[counts >= min_size]
    k = len(eligible) if num_clients is None else num_clients
    if k < 1 or k > len(eligible):
        raise ValueError(
            f"natural: {len(eligible)} ids have >= {min_size} samples (of {len(uniq)} ids), "
            f"cannot make {k} clients; lower num_clients or min_size"
        )
    chosen = np.sort(rng.choice(eligible, size=k, replace=False)) if k < len(eligible) else eligible
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], chosen, side="left")
    groups = [order[s:s + c] for s, c in zip(starts, counts[np.searchsorted(uniq, chosen)])]
    dropped = len(ids) - sum(len(g) for g in groups)
    return _finish(groups, "natural", min_size, dropped, tuple(int(c) for c in chosen))


def partition_params(kind: str) -> dict[str, object]:
    """Accepted keyword parameters of a partitioner kind and their defaults."""
    if kind not in _PARAMS:
        raise ValueError(f"unknown partition kind {kind!r}; choose one of {sorted(_PARAMS)}")
    return dict(_PARAMS[kind])


def make_partition(kind: str, *, labels: np.ndarray, num_clients: int | None,
                   rng: np.random.Generator, ids: np.ndarray | None = None,
                   **params: object) -> Partition:
    """Dispatch to a partitioner by name.

    Args:
        kind: ``iid``, ``dirichlet``, ``shards``, ``quantity`` or ``natural``.
        labels: Train labels (their length is the train-set size).
        num_clients: Number of clients (may be None only for ``natural``).
        rng: Source of randomness.
        ids: Natural id per train sample (required for ``natural``).
        **params: Partitioner parameters, see :func:`partition_params`.

    Returns:
        The partition.
    """
    unknown = sorted(set(params) - set(partition_params(kind)))
    if unknown:
        raise ValueError(f"partition {kind!r} got unknown parameters {unknown}; "
                         f"accepted: {sorted(_PARAMS[kind])}")
    opts = {**_PARAMS[kind], **params}
    if kind == "natural":
        if ids is None:
            raise ValueError("partition 'natural' needs per-sample ids, but the dataset has "
                             "none (train_ids is None); use a set with natural clients "
                             "(e.g. shakespeare) or another partition kind")
        return natural(ids, rng, num_clients=num_clients, **opts)  # type: ignore[arg-type]
    if num_clients is None:
        raise ValueError(f"partition {kind!r} needs num_clients")
    labels = np.asarray(labels)
    if kind == "iid":
        return iid(len(labels), num_clients, rng, **opts)  # type: ignore[arg-type]
    if kind == "quantity":
        return quantity(len(labels), num_clients, rng, **opts)  # type: ignore[arg-type]
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, rng=rng, **opts)  # type: ignore[arg-type]
    return shards(labels, num_clients, rng=rng, **opts)  # type: ignore[arg-type]


def fingerprint(p: Partition) -> str:
    """SHA-256 hex of the partition's index arrays, in client order.

    For each client: its length as int64 little-endian, then its indices as
    int64 little-endian (the length prefix marks client boundaries).
    """
    h = hashlib.sha256()
    for idx in p.indices:
        h.update(np.int64(len(idx)).astype("<i8").tobytes())
        h.update(np.ascontiguousarray(idx, dtype="<i8").tobytes())
    return h.hexdigest()


def partition_stats(p: Partition, labels: np.ndarray, num_classes: int) -> dict:
    """JSON-ready summary of a partition (sizes, label skew, fingerprint).

    ``mean_tv_distance`` is the mean over clients of the total-variation distance
    between the client's label distribution and that of the whole train set.

    Args:
        p: The partition.
        labels: Train labels (all of them, including dropped samples).
        num_classes: Number of classes (histogram length).

    Returns:
        Dict with kind, num_clients, fingerprint, sizes, dropped,
        label_histograms, mean_tv_distance, size_min, size_max, size_mean.
    """
    labels = np.asarray(labels)
    hists = np.array([np.bincount(labels[i], minlength=num_classes) for i in p.indices])
    sizes = hists.sum(axis=1)
    glob = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    tv = 0.5 * np.abs(hists / np.maximum(sizes, 1)[:, None] - glob).sum(axis=1)
    return {
        "kind": p.kind,
        "num_clients": p.num_clients,
        "fingerprint": fingerprint(p),
        "sizes": [int(s) for s in sizes],
        "dropped": int(p.dropped),
        "label_histograms": hists.astype(int).tolist(),
        "mean_tv_distance": float(tv.mean()),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(sizes.mean()),
    }


def heterogeneity_line(stats: dict) -> str:
    """One human-readable line from :func:`partition_stats` output."""
    return (
        f"partition {stats['kind']}: {stats['num_clients']} clients, sizes "
        f"{stats['size_min']}–{stats['size_max']} (mean {stats['size_mean']:.0f}), "
        f"mean TV distance to global labels {stats['mean_tv_distance']:.2f}, "
        f"{stats['dropped']} dropped"
    )
