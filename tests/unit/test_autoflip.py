"""AutoFLIP's pure core (fedsim/algorithms/autoflip.py) and the models' unit maps (spec A1-A3,
A6-A9, A13), by hand on small arrays and on the built-in MLP, CNN and CharLSTM.

Each test's docstring names the wrong implementation it catches.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.algorithms.autoflip import (EarlyStopping, apply_mask, explore, hybrid_mask, mask_digest,
                                        mask_grad_samples_, mask_grads_, mask_optimizer_state_, mask_params_,
                                        maskable_names, merge_deviations, normalize, random_mask, structured_mask,
                                        torch_masks, unstructured_mask)
from fedsim.models import CNN, MLP, CharLSTM
from fedsim.models.units import Slice, UnitLayer, check_unit_map, neurons

SEED = 1234


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def small_cnn() -> CNN:
    torch.manual_seed(SEED)
    return CNN((1, 8, 8), 10, channels=(4, 8), hidden=16)


def small_lstm(layers: int = 1) -> CharLSTM:
    torch.manual_seed(SEED)
    return CharLSTM((12,), 20, embed=4, hidden=6, layers=layers)


def random_guidance(shapes, seed=SEED, *, levels: int | None = None, explorers: int = 1):
    """G from random squared deviations; ``levels`` quantises D to force many ties."""
    rng = np.random.default_rng(seed)
    deviations = {}
    for k in range(explorers):
        d = {}
        for n, s in shapes.items():
            x = rng.random(s)
            if levels:
                x = np.floor(x * levels) / levels
            d[n] = (x ** 2).astype(np.float32)
        deviations[k] = d
    return normalize(merge_deviations(deviations))


def maskable_total(shapes, maskable="weights"):
    return sum(math.prod(shapes[n]) for n in maskable_names(shapes, maskable))


def kept_flat(mask, names):
    return np.concatenate([mask[n].reshape(-1) for n in names])


# ---------------------------------------------------------------------------------------------
# A1

def test_mask_is_binary_shape_exact_and_digest_is_shared():
    """A1: catches a continuous (scaling) mask, a mask missing a tensor, or a build that is not
    deterministic (two builds from the same G differ, so clients would get different masks)."""
    for model in (small_cnn(), small_lstm()):
        shapes = shapes_of(model)
        G = random_guidance(shapes)
        a = hybrid_mask(G, shapes, sparsity=0.3, structured_sparsity=0.2, unit_map=model.unit_map())
        b = hybrid_mask(copy.deepcopy(G), dict(shapes), sparsity=0.3, structured_sparsity=0.2,
                        unit_map=model.unit_map())
        assert list(a.mask) == list(shapes)
        for n, m in a.mask.items():
            assert m.dtype == np.bool_ and m.shape == shapes[n]
            assert a.structured[n].dtype == np.bool_ and a.structured[n].shape == shapes[n]
        assert mask_digest(a.mask) == mask_digest(b.mask) == mask_digest({n: m.copy() for n, m in a.mask.items()})
        flipped = {n: m.copy() for n, m in a.mask.items()}
        first = next(iter(flipped))
        flipped[first].flat[0] = not flipped[first].flat[0]
        assert mask_digest(flipped) != mask_digest(a.mask)


# ---------------------------------------------------------------------------------------------
# A2

@pytest.mark.parametrize("tenths", [1, 2, 3, 4, 5])
def test_exact_rank_prunes_exactly_floor_tp_n(tenths):
    """A2: catches a count from a quantile (or ceil/round instead of floor), biases counted in the
    maskable set, and per-tensor counts that do not add up to the global count."""
    for model in (MLP((1, 8, 8), 10, hidden=(32, 16)), small_cnn(), small_lstm()):
        shapes = shapes_of(model)
        G = random_guidance(shapes, seed=tenths)
        r = hybrid_mask(G, shapes, sparsity=tenths / 10)
        n = maskable_total(shapes)
        assert r.total_maskable == n
        assert r.pruned == (tenths * n) // 10
        assert sum(r.counts.values()) == r.pruned
        assert sum(r.counts[k] for k in r.maskable) == r.pruned
        for k in shapes:
            if len(shapes[k]) < 2:
                assert r.mask[k].all() and r.counts[k] == 0


def test_sparsity_count_reads_the_decimal():
    """Catches ``math.floor(0.29 * 100) == 28``: a float product that lands just below an integer."""
    shapes = {"w": (10, 10)}
    G = {"w": np.arange(100, dtype=np.float64).reshape(10, 10) / 99}
    assert hybrid_mask(G, shapes, sparsity=0.29).pruned == 29
    assert hybrid_mask(G, shapes, sparsity=0.57).pruned == 57


@pytest.mark.parametrize("tp", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_quantile_gt_bound_with_ties(tp):
    """A2 (quantile_gt): catches ``G >= τ`` (keeps ties, prunes too little) and a quantile other
    than the linear-interpolated one; the excess over the exact count is bounded by the ties at τ.
    (Under linear interpolation the pruned count is at least ⌊T_p N⌋ and at most
    ⌊T_p (N−1)⌋ + 1 + #{G = τ}.)"""
    shapes = shapes_of(small_cnn())
    G = random_guidance(shapes, seed=7, levels=6)              # heavy ties
    names = maskable_names(shapes)
    g = np.concatenate([G[n].reshape(-1) for n in names])
    n = g.size
    tau = np.quantile(g, tp)
    ties = int(np.count_nonzero(g == tau))
    r = hybrid_mask(G, shapes, sparsity=tp, selection="quantile_gt")
    assert r.pruned == int(np.count_nonzero(g <= tau))
    assert r.pruned >= math.floor(tp * n + 1e-9)
    assert r.pruned <= math.floor(tp * (n - 1)) + 1 + ties
    assert sum(r.counts.values()) == r.pruned


def test_exact_rank_breaks_ties_by_flat_index_across_tensors():
    """Catches an unstable sort (numpy's default quicksort), ties broken by value order, or
    tensors visited in sorted-name rather than canonical order."""
    shapes = {"z.weight": (3, 4), "a.weight": (2, 5), "a.bias": (5,)}
    G = {n: np.ones(s) for n, s in shapes.items()}
    r = hybrid_mask(G, shapes, sparsity=0.5)                     # 22 maskable, prune 11
    flat = kept_flat(r.mask, ["z.weight", "a.weight"])
    assert flat.tolist() == [False] * 11 + [True] * 11
    rng = np.random.default_rng(3)
    G = {n: rng.integers(0, 3, s) / 2 for n, s in shapes.items()}
    g = np.concatenate([G[n].reshape(-1) for n in ["z.weight", "a.weight"]])
    order = sorted(range(g.size), key=lambda i: (g[i], i))[:6]
    r = hybrid_mask(G, shapes, sparsity=6 / 22 + 1e-12)
    assert sorted(np.flatnonzero(~kept_flat(r.mask, ["z.weight", "a.weight"])).tolist()) == sorted(order)


def test_exact_rank_counts_the_remaining_entries_after_the_structured_step():
    """Catches k computed from |P_M| instead of N_rem, or structured zeros re-ranked as candidates."""
    model = small_cnn()
    shapes = shapes_of(model)
    G = random_guidance(shapes)
    r = hybrid_mask(G, shapes, sparsity=0.3, structured_sparsity=0.25, unit_map=model.unit_map())
    names = r.maskable
    structured_zeros = int(np.count_nonzero(~kept_flat(r.structured, names)))
    n_rem = r.total_maskable - structured_zeros
    assert structured_zeros > 0
    assert r.pruned == structured_zeros + math.floor(0.3 * n_rem)
    for n in shapes:
        assert not (r.mask[n] & ~r.structured[n]).any()           # never revives a structured zero


# ---------------------------------------------------------------------------------------------
# A3

@pytest.mark.parametrize("selection", ["exact_rank", "quantile_gt"])
@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("ts", [0.0, 0.25])
def test_masks_are_nested_in_the_sparsity(selection, levels, ts):
    """A3: catches tie-breaking that is random per build, or a ranking whose order depends on the
    sparsity (with many ties the kept set at a higher sparsity would not be a subset of the kept
    set at a lower one)."""
    model = small_cnn()
    shapes = shapes_of(model)
    G = random_guidance(shapes, seed=11, levels=levels)
    unit_map = model.unit_map() if ts else None
    previous = None
    for tp in (0.0, 0.05, 0.1, 0.3, 0.31, 0.5, 0.8, 0.95):
        m = hybrid_mask(G, shapes, sparsity=tp, structured_sparsity=ts, unit_map=unit_map, selection=selection).mask
        if previous is not None:
            for n in shapes:
                assert not (m[n] & ~previous[n]).any(), (tp, n)
        previous = m


# ---------------------------------------------------------------------------------------------
# A6

def test_minmax_is_per_tensor_and_constant_tensors_keep_everything():
    """A6: catches a global instead of per-tensor normalisation, and the reference's NaN on a
    zero-spread tensor (0/0)."""
    rng = np.random.default_rng(5)
    dbar = {"a": rng.random((4, 5)), "b": 1000.0 * rng.random(7), "c": np.full((3, 3), 0.25), "d": np.zeros(2)}
    G = normalize(dbar)
    for n in ("a", "b"):
        assert G[n].min() == 0.0 and G[n].max() == 1.0
        assert G[n].dtype == np.float64
        np.testing.assert_array_equal(G[n], (dbar[n] - dbar[n].min()) / (dbar[n].max() - dbar[n].min()))
    for n in ("c", "d"):
        assert np.all(G[n] == 1.0) and not np.isnan(G[n]).any()
    alone = normalize({"a": dbar["a"]})
    np.testing.assert_array_equal(alone["a"], G["a"])


def test_robust_normalisation():
    """Catches a robust mode that divides by the standard deviation, or by a zero IQR (inf/NaN)."""
    x = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    q1, med, q3 = 1.0, 2.0, 3.0
    np.testing.assert_array_equal(normalize({"x": x}, "robust")["x"], (x - med) / (q3 - q1))
    flat = np.array([5.0, 5.0, 5.0, 5.0, 9.0])                  # IQR 0 -> divide by 1
    out = normalize({"x": flat}, "robust")["x"]
    assert np.all(np.isfinite(out)) and out.tolist() == [0.0, 0.0, 0.0, 0.0, 4.0]
    with pytest.raises(ValueError, match="normalization"):
        normalize({"x": x}, "zscore")


def test_quantile_gt_every_spread_tensor_loses_and_keeps_one():
    """A6 (quantile_gt): catches a τ taken per tensor from the wrong end, or a mask computed with
    ``>=`` so a tensor's arg-min survives; every tensor with spread loses ≥1 and keeps ≥1 entry."""
    for model in (small_cnn(), small_lstm(2)):
        shapes = shapes_of(model)
        G = random_guidance(shapes, seed=2)
        for tp in (0.1, 0.3, 0.5):
            for maskable in ("weights", "all"):
                r = hybrid_mask(G, shapes, sparsity=tp, selection="quantile_gt", maskable=maskable)
                for n in r.maskable:
                    if G[n].max() > G[n].min():
                        assert 1 <= r.counts[n] < G[n].size, (n, tp)


# ---------------------------------------------------------------------------------------------
# exploration, A7, A13

def make_data(cid: int, n: int = 24, d: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(100 + cid)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def epochs_of(x, y, batch=8):
    """A deterministic epoch source: the same batches every call."""
    def epochs():
        return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    return epochs


def tiny_linear() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def adam(params):
    return torch.optim.Adam(params, lr=0.05)


def test_early_stopping_on_a_scripted_sequence():
    """A13: catches stopping on ``<=`` improvements (equal is not better), a counter that is not
    reset on improvement, or an off-by-one in the patience."""
    losses = [5.0, 4.0, 4.0, 3.0, 3.5, 3.0, 3.2, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.6, 0.5, 0.7, 0.1]
    # strict improvements at epochs 0, 1, 3, 7, 11 (and 16)
    for patience, expected in {1: 2, 2: 5, 3: 6, 4: 15, 5: None}.items():
        es, stop = EarlyStopping(patience), None
        for i, v in enumerate(losses):
            if es.update(v):
                stop = i
                break
        assert stop == expected, patience
    assert [EarlyStopping(0).update(v) for v in (2.0,)] == [False]
    es = EarlyStopping(0)
    assert [es.update(v) for v in (2.0, 1.0, 1.0)] == [False, False, True]
    with pytest.raises(ValueError):
        EarlyStopping(-1)


def test_explore_stops_patience_epochs_after_the_last_improvement():
    """A13 through explore(): catches early stopping on the last minibatch's loss (the reference's
    monitor) instead of the epoch mean, and epochs_run counting the warm-up."""
    model = nn.Linear(1, 1)
    # two batches per epoch: the epoch means improve only at epochs 0, 1 and 3; the last batch
    # alone would keep improving
    script = [(6.0, 4.0), (4.0, 3.0), (5.0, 2.5), (2.0, 2.0), (3.0, 1.9), (3.0, 1.8), (3.0, 1.7), (0.1, 0.1)]
    state = {"epoch": -1, "batch": 0}

    def epochs():
        state["epoch"] += 1
        state["batch"] = 0
        return [(torch.ones(2, 1), torch.zeros(2)), (torch.ones(2, 1), torch.zeros(2))]

    def loss_fn(out, y):
        value = script[state["epoch"] - 1][state["batch"]]        # epoch 0 is the warm-up
        state["batch"] += 1
        return out.sum() * 0.0 + value

    r = explore(model, epochs, adam, loss_fn, explore_epochs=8, patience=3, warmup_epochs=1)
    assert r.losses == pytest.approx([5.0, 3.5, 3.75, 2.0, 2.45, 2.4, 2.35])   # improves last at epoch 3
    assert r.epochs_run == 7 and r.warmup_epochs == 1 and r.final_loss == pytest.approx(2.35)
    state["epoch"] = -1
    r = explore(model, epochs, adam, loss_fn, explore_epochs=20, patience=2, warmup_epochs=1)
    assert r.epochs_run == 3 + 1 + 2 and r.examples_seen == 4 * (1 + 6)


def test_explore_matches_a_hand_loop_and_never_aliases_or_mutates():
    """Catches the reference's scout aliasing (a state_dict() snapshot shares storage, so Adam's
    in-place steps make θ_base == θ_k and D ≡ 0), training the caller's model in place, and a base
    taken before the warm-up."""
    model = tiny_linear()
    before = copy.deepcopy(model.state_dict())
    x, y = make_data(0)
    r = explore(model, epochs_of(x, y), adam, F.cross_entropy, explore_epochs=3, patience=10, warmup_epochs=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())

    ref = copy.deepcopy(model)
    opt = adam(list(ref.parameters()))

    def epoch():
        for xb, yb in epochs_of(x, y)():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ref(xb), yb).backward()
            opt.step()

    for _ in range(2):
        epoch()
    base = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for _ in range(3):
        epoch()
    assert list(r.deviations) == [n for n, _ in model.named_parameters()]
    for n, p in ref.named_parameters():
        expected = ((p.detach().double() - base[n].double()) ** 2).float().numpy()
        assert r.deviations[n].dtype == np.float32
        np.testing.assert_array_equal(r.deviations[n], expected)
        assert r.deviations[n].max() > 0
    assert (r.epochs_run, r.warmup_epochs, r.examples_seen) == (3, 2, 5 * 24)


def test_explore_skips_frozen_parameters_and_keeps_the_global_rng():
    """Catches deviations reported for frozen tensors, and exploration drawing from the global RNG
    (which would shift the training phase's random streams away from FedAvg's, A4)."""
    model = tiny_linear()
    model[0].bias.requires_grad_(False)
    x, y = make_data(1)
    rng_state = torch.get_rng_state()
    r = explore(model, epochs_of(x, y), adam, F.cross_entropy, explore_epochs=2, patience=1,
                return_params=True)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert "0.bias" not in r.deviations and set(r.deviations) == set(r.params) == {"0.weight", "2.weight", "2.bias"}


def test_explorer_order_gives_bit_identical_guidance():
    """A7: catches sequential exploration on one shared model (the reference trains the server's
    model across explorers) and a float sum in arrival order; one explorer gives MinMax(D)."""
    model = tiny_linear()
    runs = {}
    for cid in (3, 0, 2, 1):
        x, y = make_data(cid)
        runs[cid] = explore(model, epochs_of(x, y), adam, F.cross_entropy, explore_epochs=3, patience=2).deviations
    again = explore(model, epochs_of(*make_data(2)), adam, F.cross_entropy, explore_epochs=3, patience=2).deviations
    for n in again:
        np.testing.assert_array_equal(again[n], runs[2][n])      # alone == after three other explorers
    forward = normalize(merge_deviations({k: runs[k] for k in (0, 1, 2, 3)}))
    backward = normalize(merge_deviations({k: runs[k] for k in (3, 1, 0, 2)}))
    for n in forward:
        assert forward[n].tobytes() == backward[n].tobytes()
    w = {0: 24, 1: 12, 2: 6, 3: 3}
    a = merge_deviations(runs, w)
    b = merge_deviations({k: runs[k] for k in (2, 3, 0, 1)}, {k: 3 * v for k, v in w.items()})
    for n in a:
        assert a[n].tobytes() == b[n].tobytes()
    one = normalize(merge_deviations({7: runs[0]}))
    for n, d in runs[0].items():
        d = d.astype(np.float64)
        np.testing.assert_array_equal(one[n], (d - d.min()) / (d.max() - d.min()))


def test_merge_sums_in_client_id_order_whatever_the_arrival_order():
    """A7: catches summing in arrival (dict) order; these values round differently by order."""
    b = np.float32(3 * 2.0 ** -55)
    d = {0: {"w": np.array([1.0], np.float32)}, 1: {"w": np.array([b])}, 2: {"w": np.array([b])},
         3: {"w": np.zeros(1, np.float32)}}
    q = 0.25 * float(b)
    naive = [(q + q) + 0.25, (0.25 + q) + q]
    assert naive[0] != naive[1]                                   # order does matter here
    for order in ((0, 1, 2, 3), (2, 1, 0, 3), (3, 2, 1, 0)):
        assert merge_deviations({k: d[k] for k in order})["w"][0] == naive[1]


def test_merge_weights_and_errors():
    """Catches unnormalised n_k weights and silently merging tensors of different shapes."""
    d = {0: {"w": np.array([1.0, 0.0])}, 1: {"w": np.array([0.0, 1.0])}}
    assert merge_deviations(d)["w"].tolist() == [0.5, 0.5]
    assert merge_deviations(d, {0: 3, 1: 1})["w"].tolist() == [0.75, 0.25]
    with pytest.raises(ValueError, match="shape"):
        merge_deviations({0: {"w": np.zeros(2)}, 1: {"w": np.zeros(3)}})
    with pytest.raises(ValueError, match="weight"):
        merge_deviations(d, {0: 1.0})


# ---------------------------------------------------------------------------------------------
# A8

@pytest.mark.parametrize("method", ["minmax", "robust"])
def test_scale_invariance_is_bit_exact(method):
    """A8: catches an epsilon in a denominator (``/(max − min + 1e-12)``) or any additive constant,
    which makes G, and so the ranking at near-ties, depend on the deviations' scale."""
    model = small_cnn()
    shapes = shapes_of(model)
    rng = np.random.default_rng(9)
    deviations = {k: {n: (rng.random(s) ** 4 * 1e-3).astype(np.float32) for n, s in shapes.items()} for k in range(3)}
    G0 = normalize(merge_deviations(deviations), method)
    masks0 = [hybrid_mask(G0, shapes, sparsity=0.3, structured_sparsity=0.2, unit_map=model.unit_map(),
                          selection=sel).mask for sel in ("exact_rank", "quantile_gt")]
    for c in (2.0 ** -10, 2.0 ** 3, 2.0 ** 10):
        scaled = {k: {n: (v * np.float32(c)).astype(np.float32) for n, v in d.items()} for k, d in deviations.items()}
        G = normalize(merge_deviations(scaled), method)
        for n in G0:
            assert G[n].tobytes() == G0[n].tobytes(), (c, n)
        for sel, m0 in zip(("exact_rank", "quantile_gt"), masks0):
            m = hybrid_mask(G, shapes, sparsity=0.3, structured_sparsity=0.2, unit_map=model.unit_map(),
                            selection=sel).mask
            assert mask_digest(m) == mask_digest(m0)


# ---------------------------------------------------------------------------------------------
# A9: structured step and unit maps

def hand_net():
    """Linear(4 -> 3) -> ReLU -> Linear(3 -> 2); the hidden layer is the only unit layer."""
    shapes = {"l1.weight": (3, 4), "l1.bias": (3,), "l2.weight": (2, 3), "l2.bias": (2,)}
    unit_map = (neurons("l1", 3, [Slice("l2.weight", 1)]),)
    return shapes, unit_map


def test_structured_step_by_hand():
    """A9: catches scoring on the weight rows alone (not the mean over all fan-in entries incl.
    the bias), removing the highest scores, leaving fan-out columns or the bias alive, and
    touching the output layer's rows or bias."""
    shapes, unit_map = hand_net()
    G = {"l1.weight": np.array([[0.5] * 4, [0.45] * 4, [0.9] * 4]), "l1.bias": np.array([0.0, 1.0, 0.2]),
         "l2.weight": np.zeros((2, 3)), "l2.bias": np.zeros(2)}
    # means over 5 fan-in entries: u0 = 0.4, u1 = 0.56, u2 = 0.76 (weights alone would pick u1)
    masks, removed = structured_mask(G, shapes, unit_map, 0.34)
    assert removed == {"l1": [0]}
    assert masks["l1.weight"].tolist() == [[False] * 4, [True] * 4, [True] * 4]
    assert masks["l1.bias"].tolist() == [False, True, True]
    assert masks["l2.weight"].tolist() == [[False, True, True], [False, True, True]]
    assert masks["l2.bias"].all()
    r = hybrid_mask(G, shapes, sparsity=0.0, structured_sparsity=0.34, unit_map=unit_map)
    assert r.removed_units == {"l1": [0]} and r.counts == {"l1.weight": 4, "l1.bias": 1, "l2.weight": 2, "l2.bias": 0}
    assert r.pruned == 6 and r.total_maskable == 18


def test_structured_ties_by_unit_index_and_keeps_one_unit():
    """Catches ties broken by value order or from the end, and a layer removed entirely at T_s=1."""
    shapes, unit_map = hand_net()
    G = {n: np.full(s, 0.5) for n, s in shapes.items()}
    assert structured_mask(G, shapes, unit_map, 0.67)[1] == {"l1": [0, 1]}
    masks, removed = structured_mask(G, shapes, unit_map, 1.0)
    assert removed == {"l1": [0, 1]} and masks["l1.bias"].tolist() == [False, False, True]
    assert structured_mask(G, shapes, unit_map, 0.3)[1] == {"l1": []}


def test_structured_sparsity_without_a_unit_map_is_an_error():
    """A9: catches a structured step that is silently skipped when the model declares no unit_map."""
    shapes, _ = hand_net()
    G = {n: np.ones(s) for n, s in shapes.items()}
    with pytest.raises(ValueError, match="unit_map"):
        hybrid_mask(G, shapes, sparsity=0.3, structured_sparsity=0.2)
    assert hybrid_mask(G, shapes, sparsity=0.3, structured_sparsity=0.0).removed_units == {}


BUILTIN = [
    ("mlp", lambda: MLP((1, 8, 8), 10, hidden=(12, 8))),
    ("cnn8", small_cnn),
    ("cnn28", lambda: CNN((1, 28, 28), 10, channels=(4, 6), hidden=10)),
    ("lstm1", lambda: small_lstm(1)),
    ("lstm2", lambda: small_lstm(2)),
]


@pytest.mark.parametrize("name,build", BUILTIN, ids=[b[0] for b in BUILTIN])
def test_builtin_unit_maps_index_inside_and_removed_units_are_zero(name, build):
    """A9: catches unit-map slices outside their parameter (a wrong spatial block or gate
    stride), gate rows removed for only one of i, f, g, o, a removed unit whose fan-in, bias or
    fan-out entries survive, and an output layer that is pruned as a unit layer."""
    torch.manual_seed(SEED)
    model = build()
    shapes = shapes_of(model)
    unit_map = model.unit_map()
    check_unit_map(unit_map, shapes)
    G = random_guidance(shapes, seed=4)
    r = hybrid_mask(G, shapes, sparsity=0.0, structured_sparsity=0.25, unit_map=unit_map)
    for layer in unit_map:
        gone = r.removed_units[layer.name]
        assert len(gone) == min(math.floor(0.25 * layer.units), layer.units - 1) and len(gone) >= 1
        for u in range(layer.units):
            for s in layer.slices:
                entries = r.mask[s.param][s.where([u], len(shapes[s.param]))]
                if u in gone:
                    assert not entries.any(), (layer.name, u, s)
    expected = {n: np.ones(s, bool) for n, s in shapes.items()}    # nothing else is removed
    for layer in unit_map:
        for s in layer.slices:
            expected[s.param][s.where(r.removed_units[layer.name], len(shapes[s.param]))] = False
    assert mask_digest(expected) == mask_digest(r.structured) == mask_digest(r.mask)
    out_w, out_b = list(shapes)[-2:]
    assert r.mask[out_b].all()                                   # output layer: only fan-out columns
    assert r.mask[out_w].any(axis=1).all()
    assert not any(s.param == out_w and s.axis == 0 for layer in unit_map for s in layer.fan_in)
    params = dict(model.named_parameters())                      # apply it: those entries are 0.0
    mask_params_(params, r.mask)
    for layer in unit_map:
        for s in layer.slices:
            idx = s.where(r.removed_units[layer.name], len(shapes[s.param]))
            assert not np.any(params[s.param].detach().numpy()[idx]), (layer.name, s)
    if name.startswith("cnn"):                                   # GroupNorm affine entries go too
        for conv, norm in (("features.0", "features.1"), ("features.4", "features.5")):
            gone = r.removed_units[conv]
            assert not r.mask[f"{norm}.weight"][gone].any() and not r.mask[f"{norm}.bias"][gone].any()
            assert r.mask[f"{norm}.bias"].sum() == len(r.mask[f"{norm}.bias"]) - len(gone)
    if name.startswith("lstm"):
        h = model.lstm.hidden_size
        u = r.removed_units["lstm.l0"][0]
        rows = r.mask["lstm.weight_ih_l0"].any(axis=1)
        assert [bool(rows[g * h + u]) for g in range(4)] == [False] * 4
        assert rows.sum() == 4 * (h - len(r.removed_units["lstm.l0"]))
        assert not r.mask["lstm.bias_hh_l0"][[u, h + u, 2 * h + u, 3 * h + u]].any()
        assert not r.mask["lstm.weight_hh_l0"][:, u].any()
        assert not r.mask["head.weight"][:, r.removed_units[f"lstm.l{model.lstm.num_layers - 1}"]].any()


def _perturb(params, layer, units, value):
    with torch.no_grad():
        for s in layer.fan_in:
            p = params[s.param]
            idx = s.where(units, p.dim())
            p[idx] = value


@pytest.mark.parametrize("name,build", [b for b in BUILTIN if b[0] in ("mlp", "cnn8", "lstm2")],
                         ids=["mlp", "cnn8", "lstm2"])
def test_a_removed_unit_no_longer_reaches_the_output(name, build):
    """A9 functionally: revive a removed unit's fan-in (large values) and the output must not move,
    so its fan-out is really cut; catches fan-out columns of the wrong unit or the wrong flatten
    block. A kept unit moved the same way does change the output (the test is not vacuous).
    Conv channels are skipped here (GroupNorm couples a group's channels)."""
    torch.manual_seed(SEED)
    model = build().eval()
    shapes = shapes_of(model)
    unit_map = [u for u in model.unit_map() if not u.name.startswith("features")]
    r = hybrid_mask(random_guidance(shapes, seed=8), shapes, sparsity=0.0, structured_sparsity=0.4,
                    unit_map=unit_map)
    params = dict(model.named_parameters())
    mask_params_(params, r.mask)
    x = torch.randint(0, 20, (5, 12)) if name.startswith("lstm") else torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
    for layer in unit_map:
        gone = r.removed_units[layer.name]
        trial = copy.deepcopy(model)
        _perturb(dict(trial.named_parameters()), layer, gone, 0.7)
        with torch.no_grad():
            assert torch.allclose(trial(x), out, rtol=0, atol=1e-6), layer.name
        kept = [u for u in range(layer.units) if u not in gone][:1]
        trial = copy.deepcopy(model)
        _perturb(dict(trial.named_parameters()), layer, kept, 0.7)
        with torch.no_grad():
            assert (trial(x) - out).abs().max() > 1e-3, layer.name


@pytest.mark.parametrize("side", [8, 28])
def test_cnn_fan_out_block_follows_the_flatten_order(side):
    """Catches a fan-out block laid out as H, W, C (or a wrong h*w) after the flatten: the head's
    input columns of channel c must be exactly that channel's feature map."""
    torch.manual_seed(SEED)
    model = CNN((1, side, side), 10, channels=(4, 6), hidden=10)
    last = model.unit_map()[1]
    assert last.name == "features.4" and last.fan_out[0].param == "head.1.weight"
    feats = model.features(torch.rand(3, 1, side, side))
    flat = model.head[0](feats)
    for c in range(last.units):
        cols = last.fan_out[0].indices(c)
        assert torch.equal(flat[:, cols], feats[:, c].reshape(3, -1))


def test_unit_map_check_rejects_bad_slices():
    """Catches unit maps that name missing parameters, index past the end, or overlap gate repeats."""
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4)}
    check_unit_map((neurons("a", 4, [Slice("b.weight", 1)]),), shapes)
    with pytest.raises(ValueError, match="no parameter"):
        check_unit_map((neurons("a", 4, [Slice("c.weight", 1)]),), shapes)
    with pytest.raises(ValueError, match="need"):
        check_unit_map((neurons("a", 4, [Slice("b.weight", 1, block=2)]),), shapes)
    with pytest.raises(ValueError, match="overlap"):
        check_unit_map((UnitLayer("a", 2, (Slice("a.weight", 0, repeats=2, stride=1),)),), shapes)
    with pytest.raises(ValueError, match="axis"):
        check_unit_map((UnitLayer("a", 4, (Slice("a.bias", 1),)),), shapes)


# ---------------------------------------------------------------------------------------------
# maskable set, random baseline, numpy masking

def test_maskable_names():
    """Catches biases in the default maskable set, an order other than the given one, and a
    silently ignored misspelt exclude name."""
    shapes = shapes_of(small_lstm())
    assert maskable_names(shapes) == [n for n, s in shapes.items() if len(s) >= 2]
    assert maskable_names(shapes, "all") == list(shapes)
    assert "embed.weight" not in maskable_names(shapes, exclude=["embed.weight"])
    with pytest.raises(ValueError, match="exclude"):
        maskable_names(shapes, exclude=["embedding.weight"])


def test_random_mask_is_exact_uniform_and_seeded():
    """Catches a Bernoulli mask (inexact count), the reference's shrinking per-tensor budget, and
    a baseline that touches non-maskable tensors."""
    shapes = {"w1": (6, 5), "b1": (6,), "w2": (4, 6)}
    hits = np.zeros(54)
    for seed in range(400):
        m = random_mask(shapes, sparsity=0.3, rng=np.random.default_rng(seed))
        assert m["b1"].all()
        pruned = ~kept_flat(m, ["w1", "w2"])
        assert pruned.sum() == math.floor(0.3 * 54)
        hits += pruned
    freq = hits / 400
    assert abs(freq[:30].mean() - 16 / 54) < 0.03 and abs(freq[30:].mean() - 16 / 54) < 0.03
    a = random_mask(shapes, sparsity=0.3, rng=np.random.default_rng(1))
    b = random_mask(shapes, sparsity=0.3, rng=np.random.default_rng(1))
    assert mask_digest(a) == mask_digest(b)


def test_apply_mask_numpy():
    """Catches in-place mutation of the caller's arrays, dtype changes, and dropping unmasked names."""
    arrays = {"w": np.array([[1.0, -2.0], [3.0, 4.0]], np.float32), "step": np.array(3, np.int64)}
    mask = {"w": np.array([[True, False], [False, True]])}
    out = apply_mask(arrays, mask)
    assert out["w"].tolist() == [[1.0, 0.0], [0.0, 4.0]] and out["w"].dtype == np.float32
    assert np.signbit(out["w"]).sum() == 0                       # +0, not -0
    assert arrays["w"][0, 1] == -2.0 and out["step"] is arrays["step"]


def test_unstructured_mask_rejects_non_finite_guidance():
    """Catches NaN guidance ranked as if it were large (the reference prunes everything instead)."""
    with pytest.raises(ValueError, match="finite"):
        unstructured_mask({"w": np.array([[0.0, np.nan]])}, {"w": np.ones((1, 2), bool)}, ["w"], 0.5)


# ---------------------------------------------------------------------------------------------
# masking inside a training loop (torch)

def _train_steps(model, opt, x, y, steps, mask=None, *, mask_state=True):
    named = dict(model.named_parameters())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if mask is not None:
            mask_grads_({n: p.grad for n, p in named.items()}, mask)
        opt.step()
        if mask is not None and mask_state:
            mask_params_(named, mask)
            mask_optimizer_state_(opt, named, mask)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True),
], ids=["sgd-momentum", "adam", "adamw-amsgrad"])
def test_masked_training_keeps_params_grads_and_optimizer_state_at_zero(make_opt):
    """A5 on the client: catches momentum or Adam moments left alive at pruned positions (they
    revive the weights at the next step) and weight decay acting on masked entries."""
    model = tiny_linear()
    x, y = make_data(2)
    opt = make_opt(list(model.parameters()))
    _train_steps(model, opt, x, y, 2)                             # dense: state is non-zero everywhere
    shapes = shapes_of(model)
    mask = torch_masks(random_mask(shapes, sparsity=0.5, rng=np.random.default_rng(0), maskable="all"))
    named = dict(model.named_parameters())
    mask_params_(named, mask)
    mask_optimizer_state_(opt, named, mask)
    _train_steps(model, opt, x, y, 3, mask)
    for n, p in named.items():
        off = ~mask[n]
        assert torch.all(p.detach()[off] == 0) and torch.all(p.grad[off] == 0)
        assert p.detach()[mask[n]].abs().sum() > 0
        tensors = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        assert tensors
        for v in tensors:
            assert torch.all(v[off] == 0), n
            assert v[mask[n]].abs().sum() > 0


def test_gradient_masking_alone_revives_pruned_weights():
    """Catches relying on gradient masking only (spec §5): with a dense momentum buffer the pruned
    weights move again unless parameters and state are re-masked."""
    model = tiny_linear()
    x, y = make_data(2)
    opt = torch.optim.SGD(list(model.parameters()), lr=0.1, momentum=0.9)
    _train_steps(model, opt, x, y, 2)
    mask = random_mask(shapes_of(model), sparsity=0.5, rng=np.random.default_rng(0))
    named = dict(model.named_parameters())
    mask_params_(named, mask)
    _train_steps(model, opt, x, y, 1, mask, mask_state=False)
    assert any(torch.any(p.detach()[~torch.from_numpy(mask[n])] != 0) for n, p in named.items() if n in mask)


def test_mask_grad_samples_before_clipping():
    """A12's precondition: catches per-sample gradients left dense at pruned positions (they would
    use clip budget), a list-valued grad_sample left unmasked, and batch rows masked unevenly."""
    p = nn.Parameter(torch.zeros(2, 3))
    p.grad_sample = torch.ones(4, 2, 3)
    q = nn.Parameter(torch.zeros(3))
    q.grad_sample = [torch.ones(2, 3), torch.ones(1, 3)]
    mask = {"p": np.array([[True, False, True], [False, True, True]]), "q": np.array([False, True, True])}
    mask_grad_samples_({"p": p, "q": q}, mask)
    for b in range(4):
        assert p.grad_sample[b].tolist() == mask["p"].astype(float).tolist()
    assert all(t[:, 0].eq(0).all() and t[:, 1:].eq(1).all() for t in q.grad_sample)
    with pytest.raises(ValueError, match="shape"):
        mask_grads_({"p": torch.ones(3, 2)}, {"p": mask["p"]})


def test_mask_grad_samples_with_opacus():
    """The same on a real Opacus GradSampleModule (canonical names are the wrapped module's)."""
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(SEED)
    inner = nn.Linear(3, 2)
    gsm = opacus.GradSampleModule(inner)
    gsm(torch.randn(5, 3, requires_grad=True)).sum().backward()
    named = dict(inner.named_parameters())
    mask = {"weight": np.array([[True, False, True], [False, True, False]]), "bias": np.array([True, False])}
    assert named["weight"].grad_sample.shape == (5, 2, 3)
    mask_grad_samples_(named, mask)
    assert torch.all(named["weight"].grad_sample[:, ~torch.from_numpy(mask["weight"])] == 0)
    assert torch.all(named["bias"].grad_sample[:, 1] == 0) and torch.any(named["bias"].grad_sample[:, 0] != 0)
