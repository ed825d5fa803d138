"""Unit tests of fedsim.data.partition (hypothesis properties live in tests/property)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedsim.data.partition import (
    Partition,
    dirichlet,
    fingerprint,
    heterogeneity_line,
    iid,
    make_partition,
    natural,
    partition_params,
    partition_stats,
    quantity,
    shards,
)

LABELS = np.repeat(np.arange(10), 100)


def _check_complete(p: Partition, n: int) -> None:
    allidx = np.concatenate(p.indices)
    assert all(i.dtype == np.int64 for i in p.indices)
    assert all(np.all(np.diff(i) > 0) for i in p.indices)  # sorted, no repeats
    assert len(allidx) == len(np.unique(allidx)) == n
    assert p.dropped == 0


@pytest.mark.parametrize("make", [
    lambda rng: iid(1000, 7, rng),
    lambda rng: dirichlet(LABELS, 7, 0.3, rng),
    lambda rng: shards(LABELS, 7, 2, rng),
    lambda rng: quantity(1000, 7, rng),
    lambda rng: quantity(1000, 7, rng, distribution="powerlaw"),
])
def test_partitions_are_disjoint_complete_and_deterministic(make):
    a, b = make(np.random.default_rng(3)), make(np.random.default_rng(3))
    _check_complete(a, 1000)
    assert a.num_clients == 7
    assert fingerprint(a) == fingerprint(b)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert fingerprint(make(np.random.default_rng(4))) != fingerprint(a)


def test_iid_sizes_are_balanced():
    sizes = [len(i) for i in iid(103, 10, np.random.default_rng(0)).indices]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_min_size_is_repaired_not_resampled():
    p = dirichlet(LABELS, 20, 0.01, np.random.default_rng(0), min_size=30)
    _check_complete(p, 1000)
    assert min(len(i) for i in p.indices) >= 30


def test_repair_handles_tight_budget():
    # Exactly one sample per client: every client but a few starts empty.
    p = dirichlet(np.zeros(50, np.int64), 50, 0.01, np.random.default_rng(1))
    assert [len(i) for i in p.indices] == [1] * 50


@pytest.mark.parametrize("call", [
    lambda: iid(10, 4, np.random.default_rng(0), min_size=3),
    lambda: dirichlet(LABELS[:10], 4, 1.0, np.random.default_rng(0), min_size=3),
    lambda: shards(LABELS[:10], 4, 2, np.random.default_rng(0), min_size=3),
    lambda: quantity(10, 4, np.random.default_rng(0), min_size=3),
])
def test_min_size_too_large_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"only 10 samples for 4 clients x min_size 3"):
        call()


def test_invalid_parameters():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 3, 0.0, rng)
    with pytest.raises(ValueError, match="num_clients"):
        iid(10, 0, rng)
    with pytest.raises(ValueError, match="min_size"):
        iid(10, 2, rng, min_size=0)
    with pytest.raises(ValueError, match="lognormal' or 'powerlaw"):
        quantity(10, 2, rng, distribution="zipfian")


def _mean_tv(alpha: float) -> float:
    return float(np.mean([
        partition_stats(dirichlet(LABELS, 10, alpha, np.random.default_rng(s)), LABELS, 10)
        ["mean_tv_distance"] for s in range(5)]))


def test_heterogeneity_decreases_with_alpha():
    tv = [_mean_tv(a) for a in (0.1, 1.0, 100.0)]
    assert tv[0] > tv[1] > tv[2]
    assert tv[2] < 0.1 and tv[0] > 0.5


def test_shards_limit_classes_per_client():
    for seed in range(5):
        p = shards(LABELS, 13, 3, np.random.default_rng(seed))
        _check_complete(p, 1000)
        assert all(len(np.unique(LABELS[i])) <= 3 for i in p.indices)
        # every class is held by floor or ceil of 13 * 3 / 10 clients
        holders = np.bincount(np.concatenate([np.unique(LABELS[i]) for i in p.indices]))
        assert set(holders.tolist()) <= {3, 4}


def test_shards_cannot_cover_all_classes():
    with pytest.raises(ValueError, match="cannot cover the 10 classes"):
        shards(LABELS, 3, 2, np.random.default_rng(0))


def test_shards_caps_classes_per_client_at_number_of_classes():
    p = shards(np.array([0, 1] * 10), 3, 5, np.random.default_rng(0))
    _check_complete(p, 20)


def test_quantity_sizes_are_skewed():
    for seed in range(3):
        p = quantity(20000, 20, np.random.default_rng(seed), sigma=2.0)
        sizes = [len(i) for i in p.indices]
        assert max(sizes) / min(sizes) > 20
    sizes = [len(i) for i in quantity(20000, 20, np.random.default_rng(0), sigma=0.0).indices]
    assert max(sizes) / min(sizes) < 1.2


def test_natural_clients_and_dropped():
    ids = np.array([5, 5, 5, 2, 2, 9, 9, 9, 9, 7])
    p = natural(ids, np.random.default_rng(0), min_size=2)
    assert p.client_ids == (2, 5, 9) and p.dropped == 1
    assert [i.tolist() for i in p.indices] == [[3, 4], [0, 1, 2], [5, 6, 7, 8]]
    sub = natural(ids, np.random.default_rng(0), num_clients=2, min_size=2)
    assert len(sub.client_ids) == 2 and set(sub.client_ids) <= {2, 5, 9}
    assert sub.dropped + sum(len(i) for i in sub.indices) == len(ids)
    assert sub.client_ids == natural(ids, np.random.default_rng(0), num_clients=2,
                                     min_size=2).client_ids
    with pytest.raises(ValueError, match="3 ids have >= 2 samples"):
        natural(ids, np.random.default_rng(0), num_clients=4, min_size=2)


def test_make_partition_dispatch_and_errors():
    rng = np.random.default_rng(0)
    p = make_partition("dirichlet", labels=LABELS, num_clients=5, rng=rng, alpha=1.0)
    assert p.kind == "dirichlet" and p.num_clients == 5
    for kind in ("iid", "shards", "quantity"):
        assert make_partition(kind, labels=LABELS, num_clients=5, rng=rng).kind == kind
    ids = np.arange(1000) // 100
    assert make_partition("natural", labels=LABELS, num_clients=None, rng=rng,
                          ids=ids).num_clients == 10
    with pytest.raises(ValueError, match="unknown partition kind"):
        make_partition("pathological", labels=LABELS, num_clients=4, rng=rng)
    with pytest.raises(ValueError, match=r"unknown parameters \['beta'\]"):
        make_partition("dirichlet", labels=LABELS, num_clients=4, rng=rng, beta=1)
    with pytest.raises(ValueError, match="train_ids is None"):
        make_partition("natural", labels=LABELS, num_clients=4, rng=rng)
    with pytest.raises(ValueError, match="needs num_clients"):
        make_partition("iid", labels=LABELS, num_clients=None, rng=rng)
    assert partition_params("dirichlet") == {"alpha": 0.5, "min_size": 1}


def test_fingerprint_format():
    p = Partition(indices=(np.array([0, 2], np.int64), np.array([1], np.int64)), dropped=0,
                  kind="iid")
    h = hashlib.sha256()
    for arr in ([0, 2], [1]):
        h.update(len(arr).to_bytes(8, "little") + b"".join(i.to_bytes(8, "little") for i in arr))
    assert fingerprint(p) == h.hexdigest()
    # Client boundaries matter.
    q = Partition(indices=(np.array([0], np.int64), np.array([1, 2], np.int64)), dropped=0,
                  kind="iid")
    assert fingerprint(q) != fingerprint(p)


def test_partition_stats_and_line():
    labels = np.array([0, 0, 1, 1])
    p = Partition(indices=(np.array([0, 1]), np.array([2, 3])), dropped=0, kind="shards")
    stats = partition_stats(p, labels, 3)
    assert json.loads(json.dumps(stats)) == stats
    assert stats["label_histograms"] == [[2, 0, 0], [0, 2, 0]]
    assert stats["mean_tv_distance"] == pytest.approx(0.5)
    assert (stats["sizes"], stats["size_min"], stats["size_max"]) == ([2, 2], 2, 2)
    line = heterogeneity_line(stats)
    assert line == ("partition shards: 2 clients, sizes 2–2 (mean 2), "
                    "mean TV distance to global labels 0.50, 0 dropped")
    iid_stats = partition_stats(iid(1000, 4, np.random.default_rng(0)), LABELS, 10)
    assert iid_stats["mean_tv_distance"] < 0.1
