"""The measured FLOPs counter (fedsim.train.flops, spec 2.4): per-sample forward MACs of conv, linear,
LSTM and embedding layers against hand computations, the three counts (dense, theoretical,
structured) including A9's figure, and that counting leaves the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.models import build_model
from fedsim.models.nets import CNN, CharLSTM
from fedsim.train.flops import FlopsReport, flops_report, forward_macs, step_flops, structured_part


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _mlp_with_removed_units(removed: int = 20) -> tuple[nn.Module, dict[str, np.ndarray]]:
    model = build_model("mlp", input_shape=(784,), num_classes=10, hidden=[100])
    (n1, l1), (n2, l2) = _linears(model)
    units = np.random.default_rng(0).choice(100, size=removed, replace=False)
    m1 = np.ones(tuple(l1.weight.shape), bool)
    m2 = np.ones(tuple(l2.weight.shape), bool)
    m1[units, :] = False          # fan-in rows of the removed hidden units
    m2[:, units] = False          # their fan-out columns
    return model, {f"{n1}.weight": m1, f"{n2}.weight": m2}


def test_a9_structured_mlp_figure():
    """A9: 784-100-10 with 20 hidden units removed gives structured MACs 784*80 + 80*10 (dense
    784*100 + 100*10). Catches a structured count that stays dense, one that only drops the fan-in
    rows (784*80 + 100*10) or the fan-out columns, and biases counted as MACs."""
    model, mask = _mlp_with_removed_units()
    dense = 784 * 100 + 100 * 10
    target = 784 * 80 + 80 * 10
    assert sum(forward_macs(model, (784,)).values()) == dense
    assert sum(forward_macs(model, (784,), mask).values()) == target
    for r in (flops_report(model, (784,), mask=mask, structured_mask=mask),
              flops_report(model, (784,), mask=mask)):           # structured part derived from the mask
        assert isinstance(r, FlopsReport)
        assert (r.dense, r.theoretical, r.structured) == (dense, target, target)
        assert r.structured_ratio == pytest.approx(target / dense)
        assert r.theoretical_ratio == pytest.approx(target / dense)


def test_a9_unstructured_zeros_do_not_count_as_structured():
    """On top of the 20 removed units, 50 scattered zeros in surviving rows lower the theoretical
    count by exactly 50 but leave the structured one at 784*80 + 80*10. Catches a structured count
    that is just nnz of the full mask, and a structured_part that drops partly masked rows."""
    model, mask = _mlp_with_removed_units()
    name1 = next(iter(mask))
    alive = np.flatnonzero(mask[name1].all(axis=1))
    rng = np.random.default_rng(1)
    flat = rng.choice(alive.size * 784, size=50, replace=False)
    full = {k: v.copy() for k, v in mask.items()}
    full[name1][alive[flat // 784], flat % 784] = False
    r = flops_report(model, (784,), mask=full)
    assert r.theoretical == 784 * 80 + 80 * 10 - 50
    assert r.structured == 784 * 80 + 80 * 10
    s = structured_part(full)
    assert torch.equal(s[name1], torch.as_tensor(mask[name1]))


def test_conv_padding_stride_groups_against_hand_computation():
    """Conv MACs = nnz(W) * H_out * W_out with H_out from padding, stride and dilation, and W of
    shape (out, in/groups, k, k). Catches counting over input positions, ignoring stride or padding,
    and ignoring groups (in_channels instead of in_channels/groups)."""
    conv = nn.Conv2d(3, 8, 5, stride=2, padding=1)              # 28 -> floor((28+2-5)/2)+1 = 13
    assert forward_macs(conv, (3, 28, 28)) == {"": 8 * 3 * 5 * 5 * 13 * 13}
    g = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
    # H: floor((28+4-4-1)/2)+1 = 14; W: floor((20+4-4-1)/2)+1 = 10; W has 8*2*3*3 entries
    assert forward_macs(g, (4, 28, 20)) == {"": 8 * 2 * 3 * 3 * 14 * 10}


def test_builtin_cnn_total():
    """The built-in CNN on (1, 28, 28): conv 3x3 pad 1 at 28x28 and 14x14, then Linear(32*7*7, 64)
    and Linear(64, 10). Catches pooling or GroupNorm counted as MACs and conv counted at the
    pooled size."""
    model = CNN((1, 28, 28), 10)
    macs = forward_macs(model, (1, 28, 28))
    expected = {"features.0": 16 * 1 * 9 * 28 * 28, "features.4": 32 * 16 * 9 * 14 * 14,
                "head.1": 32 * 7 * 7 * 64, "head.3": 64 * 10}
    assert {k: v for k, v in macs.items() if v} == expected
    assert sum(macs.values()) == 1_117_056


def test_char_lstm_and_masked_lstm_weights():
    """CharLSTM: 80 steps x (nnz(W_ih0)+nnz(W_hh0)+nnz(W_ih1)+nnz(W_hh1)) + the head once (last
    step only), embedding 0. Masking k LSTM entries lowers the count by exactly 80*k, k head entries
    by k. Catches per-step counting left out, the head counted per step, the embedding counted, and
    only layer 0 of a stacked LSTM counted."""
    model = CharLSTM((80,), 82, embed=8, hidden=16, layers=2)
    lstm_nnz = 4 * 16 * 8 + 4 * 16 * 16 + 4 * 16 * 16 + 4 * 16 * 16
    macs = forward_macs(model, (80,))
    assert macs == {"embed": 0, "lstm": 80 * lstm_nnz, "head": 16 * 82}
    mask = {"lstm.weight_ih_l0": torch.ones(64, 8, dtype=torch.bool),
            "lstm.weight_hh_l1": torch.ones(64, 16, dtype=torch.bool),
            "head.weight": torch.ones(82, 16, dtype=torch.bool)}
    mask["lstm.weight_ih_l0"][3, :5] = False
    mask["lstm.weight_hh_l1"][10:12, :] = False                # 32 entries
    mask["head.weight"][0, :7] = False
    masked = forward_macs(model, (80,), mask)
    assert masked["lstm"] == macs["lstm"] - 80 * (5 + 32)
    assert masked["head"] == macs["head"] - 7


class _SeqFirst(nn.Module):
    """Embedding then a batch_first=False LSTM (the model transposes) and a per-step linear head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(20, 4)
        self.lstm = nn.LSTM(4, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        e = self.embed(x)
        out, _ = self.lstm(e if self.batch_first else e.transpose(0, 1))
        return self.head(out)                                  # every step: T tokens


def test_lstm_layout_and_sequence_linear():
    """Sequence length is read along the LSTM's batch_first, and a Linear on a sequence counts
    nnz x tokens (in either layout). Catches a hard-coded dim 1 for the time axis (which would read
    the batch of 1 for a seq-first LSTM) and a Linear counted once per sample regardless of tokens."""
    expected = {"embed": 0, "lstm": 12 * (24 * 4 + 24 * 6), "head": 12 * 18}
    assert forward_macs(_SeqFirst(True), (12,)) == expected
    assert forward_macs(_SeqFirst(False), (12,)) == expected


def test_unstructured_mask_drops_by_entries_times_positions():
    """Theoretical counts drop by exactly (masked entries) x (positions of that layer): 784 for the
    first conv, 196 for the second, 1 for the head; numpy and torch masks, bool or 0/1, agree.
    Catches a mask ignored, applied once per layer instead of per position, or read as W's values."""
    model = CNN((1, 28, 28), 10)
    dense = forward_macs(model, (1, 28, 28))
    rng = np.random.default_rng(2)
    params = dict(model.named_parameters())
    drops = {"features.0.weight": (17, 784), "features.4.weight": (301, 196), "head.1.weight": (999, 1)}
    mask = {}
    for name, (k, _) in drops.items():
        m = np.ones(params[name].numel(), bool)
        m[rng.choice(m.size, size=k, replace=False)] = False
        mask[name] = m.reshape(tuple(params[name].shape))
    expected = dense["features.0"] + dense["features.4"] + dense["head.1"] + dense["head.3"] \
        - sum(k * pos for k, pos in drops.values())
    for variant in (mask, {k: torch.from_numpy(v) for k, v in mask.items()},
                    {k: v.astype(np.float32) for k, v in mask.items()}):
        r = flops_report(model, (1, 28, 28), mask=variant)
        assert r.dense == sum(dense.values())
        assert r.theoretical == expected
        assert r.structured == r.dense                         # scattered zeros remove no channel


def test_model_unchanged_after_counting():
    """Counting leaves per-module modes, hooks and all state (including BatchNorm running stats,
    which a train-mode forward would update) as they were, also when the count raises. Catches
    hooks left registered, model.eval() not undone (or undone only at the top), and a train-mode
    forward."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    model[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward_macs(model, (1, 8, 8))
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    bad = nn.Sequential(nn.Linear(3, 3), nn.Flatten())
    bad.append(_Bilin())
    bad.train()
    with pytest.raises(NotImplementedError, match="Bilinear"):
        forward_macs(bad, (3,))
    assert all(not m._forward_hooks for m in bad.modules())
    assert all(m.training for m in bad.modules())


class _Bilin(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(3, 3, 2)

    def forward(self, x):
        return self.bilinear(x, x)


def test_step_flops_is_six_times_macs():
    """A training sample is 3 forwards at 2 FLOPs per MAC: 6 x total MACs, from a dict or an int.
    Catches 2x (forward only), 3x (MACs not doubled) and a per-layer maximum instead of the sum."""
    model = CharLSTM((80,), 82, embed=8, hidden=16, layers=2)
    macs = forward_macs(model, (80,))
    assert step_flops(macs) == 6 * sum(macs.values()) == 6 * 288_032
    assert step_flops(1234) == 7404
    r = flops_report(model, (80,))
    assert r.step_flops == {"dense": 6 * 288_032, "theoretical": 6 * 288_032, "structured": 6 * 288_032}
    assert (r.theoretical_ratio, r.structured_ratio) == (1.0, 1.0)


def test_bad_masks_and_dtypes():
    """A mask naming no parameter, or of the wrong shape, is an error rather than silently dense;
    float64 models and an explicit input_dtype work. Catches typos in mask names going unnoticed."""
    model = nn.Sequential(nn.Linear(4, 2)).double()
    assert forward_macs(model, (4,)) == {"0": 8}
    with pytest.raises(KeyError, match="nope"):
        forward_macs(model, (4,), {"nope": np.ones((2, 4))})
    with pytest.raises(ValueError, match="shape"):
        forward_macs(model, (4,), {"0.weight": np.ones((4, 2))})
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    assert forward_macs(emb, (2,)) == {"0": 0, "2": 12}
    assert forward_macs(emb, (2,), input_dtype=torch.int32) == {"0": 0, "2": 12}
