"""Property tests of the partitioners: disjoint, complete, deterministic, min_size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.data.partition import fingerprint, make_partition

FAST = settings(max_examples=50, deadline=None)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 120))
    num_classes = draw(st.integers(1, 6))
    labels = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    return {
        "labels": labels,
        "num_clients": draw(st.integers(1, 15)),
        "min_size": draw(st.integers(1, 6)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


PARAMS = {
    "iid": st.just({}),
    "dirichlet": st.builds(lambda a: {"alpha": a}, st.floats(0.01, 100.0)),
    "shards": st.builds(lambda c: {"classes_per_client": c}, st.integers(1, 4)),
    "quantity": st.builds(lambda s, d: {"sigma": s, "distribution": d},
                          st.floats(0.0, 3.0), st.sampled_from(["lognormal", "powerlaw"])),
}


def _run(kind, prob, params):
    return make_partition(kind, labels=prob["labels"], num_clients=prob["num_clients"],
                          rng=np.random.default_rng(prob["seed"]), min_size=prob["min_size"],
                          **params)


@pytest.mark.parametrize("kind", sorted(PARAMS))
@FAST
@given(data=st.data())
def test_partition_properties(kind, data):
    prob, params = data.draw(problems()), data.draw(PARAMS[kind])
    n, k, m = len(prob["labels"]), prob["num_clients"], prob["min_size"]
    if n < k * m:
        with pytest.raises(ValueError, match=f"only {n} samples for {k} clients"):
            _run(kind, prob, params)
        return
    try:
        p = _run(kind, prob, params)
    except ValueError as exc:  # shards: too few clients to cover every class
        assert kind == "shards" and "cannot cover" in str(exc)
        return
    allidx = np.concatenate(p.indices)
    assert p.num_clients == k and p.dropped == 0
    assert np.array_equal(np.sort(allidx), np.arange(n))  # disjoint and complete
    assert min(len(i) for i in p.indices) >= m
    assert all(np.all(np.diff(i) > 0) for i in p.indices)
    assert fingerprint(_run(kind, prob, params)) == fingerprint(p)


@FAST
@given(ids=st.lists(st.integers(0, 12), min_size=1, max_size=150),
       min_size=st.integers(1, 5), want=st.integers(0, 14), seed=st.integers(0, 1000))
def test_natural_properties(ids, min_size, want, seed):
    ids = np.array(ids)
    uniq, counts = np.unique(ids, return_counts=True)
    eligible = int((counts >= min_size).sum())
    num_clients = None if want == 0 else want

    def run():
        return make_partition("natural", labels=np.zeros(len(ids), np.int64),
                              num_clients=num_clients, rng=np.random.default_rng(seed),
                              ids=ids, min_size=min_size)

    if eligible == 0 or (num_clients or 0) > eligible:
        with pytest.raises(ValueError, match="ids have"):
            run()
        return
    p = run()
    allidx = np.concatenate(p.indices)
    assert len(allidx) == len(np.unique(allidx))
    assert len(allidx) + p.dropped == len(ids)
    assert p.num_clients == (num_clients or eligible)
    for cid, idx in zip(p.client_ids, p.indices):
        assert np.all(ids[idx] == cid) and len(idx) >= min_size
        assert len(idx) == int((ids == cid).sum())
    assert fingerprint(run()) == fingerprint(p)
