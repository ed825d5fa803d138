"""FedHyper pure cores: schedulers by hand, end-to-end reductions (H1, H2, H12), CL invariants
(H8), quadratic sanity (H6), resume (H11), anti-wind-up (H3), sign behaviour (H4) and the
downlink of CL's previous update (H9, pure part).

Spec: specs/fedhyper.md section 4. A tiny torch MLP with a BatchNorm (float buffers and an
integer counter), 4 clients doing local SGD in a plain loop, driven through
:class:`fedsim.core.server.Server` (plan -> local training -> aggregate).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fedsim.algorithms.fedhyper import (
    VARIANTS, FedHyperClient, PreviousUpdate, auto_beta_lg, decay_server, fedexp_lr, fedexp_server,
    fedhyper_server, reference_preset)
from fedsim.algorithms.optimizers import fedavg
from fedsim.core.arrays import apply_updates, mean_update, select
from fedsim.core.server import TRAIN, ClientUpdate, Payload, RoundResult, Server
from fedsim.core.state import flatten, unflatten
from fedsim.core.transforms import RoundInfo
from fedsim.scenario.schema import LrSchedule

ROOT = Path(__file__).resolve().parents[3]
ETA0 = 0.1
ZERO_BETAS = {"beta_g": 0.0, "beta_sl": 0.0}
CL = "fedhyper_cl"                                   # the plugin name (as the builder uses)


# ------------------------------------------------------------------ a tiny federation


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


TRAINABLE = [n for n, _ in make_model().named_parameters()]     # BN running stats and counter are buffers


def client_data(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(24, 5, generator=g) + m
    return x, (x[:, 0] > m).long() + (x[:, 1] > m).long()


class Federation:
    """4 clients, 2 local epochs of SGD (batch 8) per round; the server is a fedsim ``Server``
    (optimizer ``opt``, plus CL's ``PreviousUpdate`` plugin when ``prev``, default: when ``cl``)."""

    def __init__(self, opt, *, cl: dict | None = None, prev: bool | None = None, weights=(24, 24, 24, 24)):
        prev = cl is not None if prev is None else prev
        self.model, self.opt, self.cl, self.weights = make_model(), opt, cl, list(weights)
        self.server = Server(opt, [PreviousUpdate(CL, TRAINABLE)] if prev else [], client_lr=ETA0)
        self.x = {k: v.numpy().copy() for k, v in self.model.state_dict().items()}
        self.state = self.server.init(self.x)
        self.t, self.lrs_seen, self.b_log, self.plans = 0, [], [], []

    @property
    def opt_state(self):
        return self.state["optimizer"]

    def lr_scale(self) -> float:
        return self.opt.downlink(self.opt_state).get("lr_scale", 1.0)

    def local(self, m: int, lr: float, prev) -> dict[str, np.ndarray]:
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.x.items()})
        params = list(self.model.parameters())
        optim = torch.optim.SGD(params, lr=lr)
        cl = FedHyperClient(lr, prev, params, **self.cl) if self.cl is not None else None
        x, y = client_data(m)
        gen = torch.Generator().manual_seed(1000 * self.t + m)
        for _ in range(2):
            if cl is not None:
                cl.start_epoch()
            for idx in torch.randperm(24, generator=gen).split(8):
                self.lrs_seen.append(optim.param_groups[0]["lr"])
                optim.zero_grad()
                torch.nn.functional.cross_entropy(self.model(x[idx]), y[idx]).backward()
                optim.step()
                if cl is not None:
                    cl.after_step(optim)
                    self.b_log.append(cl.b)
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    def round(self) -> None:
        plan = self.server.plan(self.state, self.t + 1, self.x)
        self.plans.append(plan)
        lr = plan.scalars["lr"]
        assert lr == ETA0 * self.lr_scale()
        prev = plan.arrays.get(f"{CL}.prev_update")
        prev = None if prev is None else [torch.from_numpy(prev[k]) for k in TRAINABLE]
        replies = [ClientUpdate(m, w, self.local(m, lr, prev)) for m, w in zip(range(4), self.weights)]
        self.x, self.state, _ = self.server.aggregate(self.state, plan, self.x, replies)
        self.t += 1


def bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(torch.from_numpy(a[k]), torch.from_numpy(b[k])) for k in a)


def step(opt, x, delta, s, info: RoundInfo | None = None):
    """One server step on the transform: ``x + update(delta)`` (the old ``opt.update(x, delta, s)``)."""
    upd, s = opt.update(delta, s, x, info or RoundInfo(1))
    return apply_updates(x, upd), s


def lr_global(opt, s) -> float:
    return opt.report(s)["lr_global"]


def lr_scale(opt, s) -> float:
    return opt.downlink(s).get("lr_scale", 1.0)


def prev_after(plugin: PreviousUpdate, pstate, x, delta):
    """Feed one round's raw aggregate to the plugin directly (what ``Server.aggregate`` does)."""
    return plugin.aggregate(pstate, RoundResult(1, TRAIN, x, x, delta, [], 0)).state


# ------------------------------------------------------------------ H1, H2, H12 end to end


@pytest.mark.parametrize("variant", VARIANTS)
def test_h1_every_variant_reduces_to_fedavg_at_zero_hyper_lr(variant):
    """H1: at zero hyper-LRs every variant is bit-identical to FedAvg (an extra rounding, a scaled buffer)."""
    ref = Federation(fedavg())
    cl = {"beta_l": 0.0, "beta_lg": 0.0} if "cl" in variant else None
    fed = Federation(fedhyper_server(variant, alpha0=1.0, trainable=TRAINABLE, **ZERO_BETAS), cl=cl)
    for _ in range(5):
        ref.round()
        fed.round()
        assert bit_equal(ref.x, fed.x)
        assert fed.lr_scale() == 1.0
    assert all(lr == ETA0 for lr in fed.lrs_seen)
    assert fed.b_log == ([1.0] * 5 * 4 * 6 if cl else [])


@pytest.mark.parametrize("variant,key,value", [("g", "alpha", 1.0), ("gm", "a", 0.0), ("sl", "lam", 1.0)])
def test_h2_round_zero_is_fedavg_whatever_beta(variant, key, value):
    """H2: round 0 has no hypergradient, so x_1 is FedAvg's whatever beta (a premature LR change)."""
    ref = Federation(fedavg())
    fed = Federation(fedhyper_server(variant, beta_g=50.0, beta_sl=50.0, trainable=TRAINABLE))
    ref.round()
    fed.round()
    assert bit_equal(ref.x, fed.x)
    assert float(fed.opt_state[key]) == value and fed.lr_scale() == 1.0


@pytest.mark.parametrize("variant", ["g", "gm", "sl", "cl"])
def test_h2_round_zero_at_alpha0_is_fedavg_at_alpha0(variant):
    """H2 at alpha0 != 1: round 0 steps at exactly alpha0 (alpha0 ignored or applied twice)."""
    rng = np.random.default_rng(3)
    x = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4)}
    delta = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    ref, _ = step(fedavg(0.7), x, delta, None)
    opt = fedhyper_server(variant, alpha0=0.7, beta_g=9.0, beta_sl=9.0)
    new, _ = step(opt, x, delta, opt.init(x))
    assert bit_equal(ref, new)


def test_h12_sl_lambda_reaches_the_client_optimizers():
    """H12: the SL LR actually reaches each client optimizer (the reference's per-round reset bug)."""
    fed = Federation(fedhyper_server("sl", beta_sl=200.0, trainable=TRAINABLE))
    sent = []
    for _ in range(4):
        sent.append(fed.lr_scale() * ETA0)
        fed.round()
    per_round = [fed.lrs_seen[i * 24:(i + 1) * 24] for i in range(4)]
    assert [set(r) for r in per_round] == [{s} for s in sent]
    assert sent[0] == sent[1] == ETA0          # the first change reaches clients in round 2
    assert sent[2] != ETA0 and sent[3] != ETA0


def test_decay_sl_is_delivered_and_decay_g_decays():
    """Decay-SL's LR reaches clients and Decay-G's alpha_t = alpha0 rate^t (off-by-one round count)."""
    fed = Federation(decay_server("sl", rate=0.5))
    for _ in range(3):
        fed.round()
    assert [fed.lrs_seen[i * 24] for i in range(3)] == [ETA0, ETA0 * 0.5, ETA0 * 0.25]
    opt, x = decay_server("g", alpha0=2.0, rate=0.5), {"w": np.zeros(1)}
    s = opt.init(x)
    for t in range(3):
        x, s = step(opt, x, {"w": np.ones(1)}, s)
        assert lr_global(opt, s) == 2.0 * 0.5 ** t
    assert x["w"][0] == 2.0 + 1.0 + 0.5


# ------------------------------------------------------------------ H8 CL invariants


def test_h8_cl_invariants_on_the_mlp(monkeypatch):
    """H8 on a real loop: growth cap, bounds, reset per round, first minibatch inert, lr = eta0 b_{k-1}."""
    fed = Federation(fedhyper_server("g+cl", trainable=TRAINABLE), cl={"beta_l": 3e3, "beta_lg": 3e2})
    records, orig = [], FedHyperClient._hypergrad_step

    def spy(self, delta):
        records.append(self.b)
        orig(self, delta)
    monkeypatch.setattr(FedHyperClient, "_hypergrad_step", spy)
    for _ in range(3):
        fed.round()
    b = np.array(fed.b_log).reshape(3 * 4, 6)          # (round, client) x real step
    lrs = np.array(fed.lrs_seen).reshape(3 * 4, 6)
    assert np.all(b[:, 1:] / b[:, :-1] <= 1.1 + 1e-12) and np.all(b[:, 0] == 1.0)
    assert np.all((b >= 0.1) & (b <= 10.0)) and len(set(b.ravel())) > 3 and b.min() < 1.0 < b.max()
    assert np.all(b[:, 3] == b[:, 2])                  # first minibatch of epoch 2: b unchanged
    assert np.all(lrs[:, 0] == ETA0)                    # b = 1 at the start of each round
    np.testing.assert_array_equal(lrs[:, 1:], ETA0 * b[:, :-1])
    assert len(records) == 3 * 4 * 4                    # hypergradient on 4 of the 6 steps


def _moves(cl: FedHyperClient, param: torch.nn.Parameter, deltas, opt=None, first=()):
    out = []
    for k, d in enumerate(deltas):
        if k in first:
            cl.start_epoch()
        with torch.no_grad():
            param += torch.as_tensor(d, dtype=param.dtype)
        cl.after_step(opt)
        out.append(cl.b)
    return out


def test_cl_rule_by_hand_and_first_minibatch_keeps_delta_prev():
    """CL rule by hand: cap rho, multiplicative shrink, floor b_min, first minibatch keeps delta_prev."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    g = [torch.tensor([1.0, 0.0])]
    cl = FedHyperClient(0.5, g, [p], beta_l=1.0, beta_lg=0.1, factor_cap=1.1, bounds=(0.1, 10.0))
    b = _moves(cl, p, [[9.0, 9.0]], first=(0,))          # first minibatch: nothing changes
    assert b == [1.0] and cl.delta_prev is cl._global
    b = _moves(cl, p, [[0.2, 0.0]])                       # h = 0.2 + 0.02 -> factor capped at 1.1
    assert b == [1.1] and cl.lr == 0.5 * 1.1
    b = _moves(cl, p, [[-0.5, 0.0]])                      # h = -0.1 - 0.05 -> 1.1 * 0.85
    assert b[0] == pytest.approx(1.1 * 0.85, rel=1e-15)
    prev = cl.delta_prev
    _moves(cl, p, [[5.0, 5.0]], first=(0,))
    assert cl.delta_prev is prev and b[0] == cl.b
    _moves(cl, p, [[100.0, 0.0]])                         # h = -50 + 10: 1 + h <= 0 -> b_min
    assert cl.b == 0.1 and cl.steps == 5 and cl.updates == 3


def test_cl_metrics_are_ints_for_counts():
    """metrics(): counts are ints and cl_updates is reported (floats for counts in the jsonl)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    cl = FedHyperClient(0.1, None, [p], beta_l=1.0, beta_lg=0.0)
    _moves(cl, p, [[0.1], [0.1], [0.1]], first=(0,))
    m = cl.metrics()
    assert m == {"cl_b_final": cl.b, "cl_steps": 3, "cl_updates": 2, "cl_hypergrad_skipped": 0}
    assert all(type(m[k]) is int for k in ("cl_steps", "cl_updates", "cl_hypergrad_skipped"))


def test_cl_skipped_steps_change_nothing_and_lr_goes_through_param_groups():
    """Opacus virtual (skipped) steps change nothing; the LR is written via param_groups (DP wrapper)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    class DPLike:            # an Opacus DPOptimizer exposes _is_last_step_skipped and param_groups
        def __init__(self):
            self.param_groups, self._is_last_step_skipped = [{"lr": 0.2}], False
    opt = DPLike()
    cl = FedHyperClient(0.2, [torch.ones(1)], [p], beta_l=1.0, beta_lg=1.0)
    _moves(cl, p, [[0.1], [0.1]], opt, first=(0,))
    b, steps = cl.b, cl.steps
    opt._is_last_step_skipped = True
    cl.after_step(opt)
    cl.after_step(opt, skipped=True)
    assert (cl.b, cl.steps) == (b, steps) == (1.1, 2)          # h = 0.1 + 0.1: capped at rho
    assert opt.param_groups[0]["lr"] == 0.2 * b


def test_cl_nonfinite_hypergradient_is_skipped():
    """A non-finite client hypergradient leaves b alone and is counted (b = NaN/inf poisoning the LR)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    cl = FedHyperClient(0.1, [torch.tensor([1e300], dtype=torch.float64)], [p], beta_lg=0.01)
    _moves(cl, p, [[1e300], [1e300]], first=(0,))
    assert cl.b == 1.0 and cl.hypergrad_skipped == 1 and cl.steps == 2 and cl.updates == 0


def test_cl_none_previous_update_counts_as_zero_and_errors():
    """Round 0 (no Delta_{t-1}) counts as zeros; 'auto' needs clients_per_round; bad shapes/bounds raise."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    cl = FedHyperClient(0.1, None, [p], beta_lg="auto", clients_per_round=5)
    assert cl.beta_lg == pytest.approx(0.02)
    _moves(cl, p, [[1.0], [1.0]], first=(0,))
    assert cl.b == 1.0 and cl.metrics()["cl_b_final"] == 1.0
    with pytest.raises(ValueError, match="clients_per_round"):
        FedHyperClient(0.1, None, [p], beta_lg="auto")
    with pytest.raises(ValueError, match="clients_per_round"):
        FedHyperClient(0.1, None, [p])                    # the default is "auto"
    with pytest.raises(ValueError, match="shapes"):
        FedHyperClient(0.1, [torch.zeros(2)], [p], beta_lg=0.01)
    with pytest.raises(ValueError, match="b_min"):
        FedHyperClient(0.1, None, [p], beta_lg=0.01, bounds=(2.0, 1.0))
    assert auto_beta_lg(10) == 0.01


# ------------------------------------------------------------------ server rules by hand


def test_g_by_hand_raw_delta_prev_and_buffers_not_scaled():
    """G by hand: delta_prev is the raw trainable delta; buffers take 1.0*delta; int arrays untouched."""
    x = {"w": np.zeros(2, np.float32), "bn": np.zeros(1, np.float32), "n": np.array([7], np.int64)}
    opt = fedhyper_server("g", alpha0=2.0, beta_g=0.5, alpha_bounds=(0.1, 10.0), trainable=["w"])
    s = opt.init(x)
    x, s = step(opt, x, {"w": np.array([1.0, 1.0]), "bn": np.array([1.0]), "n": np.array([0.0])}, s)
    assert x["w"].tolist() == [2.0, 2.0] and x["bn"].tolist() == [1.0] and x["n"].tolist() == [7]
    x, s = step(opt, x, {"w": np.array([1.0, 3.0]), "bn": np.array([1.0]), "n": np.array([0.0])}, s)   # h = 4
    assert lr_global(opt, s) == 4.0 and x["w"].tolist() == [6.0, 14.0] and x["bn"].tolist() == [2.0]
    assert {k: v.tolist() for k, v in s["delta_prev"].items()} == {"w": [1.0, 3.0]}    # raw, trainable only
    assert x["w"].dtype == np.float32 and x["n"].dtype == np.int64


def test_gm_by_hand():
    """GM by hand: hypergradient with the old m, a*m on top of alpha0*delta; CL still gets the raw delta."""
    opt, x = fedhyper_server("gm", alpha0=1.0, beta_g=0.1, gm_bounds=(-1.0, 1.0), gm_momentum=0.5), {"w": np.zeros(1)}
    plugin = PreviousUpdate(CL, ["w"])
    s, ps = opt.init(x), plugin.init(x)
    d = {"w": np.array([2.0])}
    x, s = step(opt, x, d, s)                          # FedAvg; m = 2
    ps = prev_after(plugin, ps, x, d)
    assert x["w"][0] == 2.0 and s["m"]["w"][0] == 2.0 and float(s["a"]) == 0.0
    d = {"w": np.array([1.0])}
    x, s = step(opt, x, d, s)                          # a = 0.1*<2,1> = 0.2; m = 1 + 1 = 2; x += 1 + 0.4
    ps = prev_after(plugin, ps, x, d)
    assert float(s["a"]) == pytest.approx(0.2) and s["m"]["w"][0] == 2.0
    assert x["w"][0] == pytest.approx(3.4) and lr_global(opt, s) == pytest.approx(1.2)
    assert plugin.downlink(ps, 3).arrays["prev_update"]["w"][0] == 1.0        # raw delta, not m


def test_sl_reference_accumulator_and_canonical_state():
    """SL: reference accumulator A vs canonical clipped lambda; server LR stays alpha0."""
    ref = fedhyper_server("sl", sl_state_clip=False, beta_sl=1.0)
    can = fedhyper_server("sl", beta_sl=1.0)
    x = {"w": np.zeros(1)}
    sr, sc = ref.init(x), can.init(x)
    for d in (3.0, 3.0, -0.1):
        _, sr = step(ref, x, {"w": np.array([d])}, sr)
        _, sc = step(can, x, {"w": np.array([d])}, sc)
    assert float(sr["sl_acc"]) == pytest.approx(9.0 - 0.3) and float(sc["lam"]) == pytest.approx(10.0 - 0.3)
    assert lr_scale(ref, sr) == pytest.approx(9.7) and lr_scale(can, sc) == pytest.approx(9.7)
    assert lr_global(ref, sr) == lr_global(can, sc) == 1.0


def test_nonfinite_hypergradient_is_skipped_and_counted():
    """A non-finite server hypergradient leaves the state as it was and is counted (NaN alpha)."""
    for variant in ("g", "gm", "sl"):
        opt, x = fedhyper_server(variant), {"w": np.zeros(1)}
        s = opt.init(x)
        x, s = step(opt, x, {"w": np.array([1e200])}, s)
        before = dict(s)
        x, s = step(opt, x, {"w": np.array([1e200])}, s)     # <d, d_prev> = inf
        assert s["hypergrad_skipped"] == 1 and opt.report(s)["hypergrad_skipped"] == 1
        assert s.keys() == before.keys()
        for k in before:
            if k != "hypergrad_skipped":
                assert s[k] is before[k]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_replies_leaves_everything_unchanged(variant):
    """A round with no replies leaves x and all server state unchanged (a skipped round advancing state)."""
    plugins = [PreviousUpdate(CL, ["w"])] if "cl" in variant else []
    server = Server(fedhyper_server(variant, trainable=["w"]), plugins, client_lr=ETA0)
    x = {"w": np.ones(2, np.float32), "n": np.array([3], np.int64)}
    s = server.init(x)
    for rnd in (1, 2):                                   # before and after a real round
        plan = server.plan(s, rnd, x)
        x2, s2, _ = server.aggregate(s, plan, x, [])
        assert s2 is s and x2 is x and bit_equal(x2, x)
        reply = {"w": np.array([1.5, 0.5], np.float32), "n": np.array([9], np.int64)}
        x, s, _ = server.aggregate(s, plan, x, [ClientUpdate(0, 1.0, reply)])


def test_previous_update_plugin_raw_float64_trainable_only():
    """PreviousUpdate keeps the raw delta (not the LR-scaled step), float64, trainable names only;
    sends it as float32; keeps it over a round without a model step."""
    plugin = PreviousUpdate(CL, ["w"])
    x = {"w": np.zeros(2, np.float32), "bn": np.zeros(1, np.float32)}
    server = Server(fedhyper_server("gm+cl", alpha0=3.0, trainable=["w"]), [plugin], client_lr=ETA0)
    s = server.init(x)
    assert server.plan(s, 1, x).arrays == {} and plugin.downlink(None, 1) == Payload()
    reply = {"w": np.array([0.5, -0.25], np.float32), "bn": np.array([4.0], np.float32)}
    x, s, _ = server.aggregate(s, server.plan(s, 1, x), x, [ClientUpdate(0, 1.0, reply)])
    assert x["w"].tolist() == [1.5, -0.75]              # alpha0 = 3: the step is not what is sent
    kept = s["plugins"][CL]
    assert list(kept) == ["w"] and kept["w"].dtype == np.float64 and kept["w"].tolist() == [0.5, -0.25]
    sent = server.plan(s, 2, x).arrays[f"{CL}.prev_update"]
    assert list(sent) == ["w"] and sent["w"].dtype == np.float32 and sent["w"].tolist() == [0.5, -0.25]
    same = plugin.aggregate(kept, RoundResult(2, "other", x, x, None, [], 0)).state
    assert same is kept


def test_fedexp_by_hand_and_server():
    """FedExp by hand: mean ||Delta_m||^2 / (2(||Delta||^2 + eps)), floor 1, buffers at 1.0*delta."""
    x = {"w": np.zeros(2), "b": np.zeros(1)}
    clients = [{"w": np.array([2.0, 0.0]), "b": np.array([5.0])}, {"w": np.array([0.0, 2.0]), "b": np.array([5.0])},
               {"w": np.array([-1.0, -1.0]), "b": np.array([5.0])}]
    delta = mean_update(x, clients, [1, 1, 1])         # (1/3, 1/3): ||d||^2 = 2/9, mean ||d_m||^2 = 10/3
    lr = fedexp_lr(x, clients, select(delta, ["w"]))
    assert lr == pytest.approx((10 / 3) / (2 * (2 / 9 + 1e-3)), rel=1e-12)
    two = clients[:2]
    assert fedexp_lr(x, two, select(mean_update(x, two, [1, 1]), ["w"])) == 1.0
    assert fedexp_lr(x, [{"w": np.array([1.0, 0.0]), "b": np.zeros(1)}, {"w": np.array([-1.0, 0.0]), "b": np.zeros(1)}],
                     {"w": np.zeros(2), "b": np.zeros(1)}) == pytest.approx(500.0)
    opt = fedexp_server(trainable=["w"])
    new, s = step(opt, x, delta, opt.init(x), RoundInfo(1, clients, [1, 1, 1]))
    assert new["b"][0] == 5.0 and lr_global(opt, s) == lr and new["w"][0] == pytest.approx(lr / 3)
    with pytest.raises(ValueError, match="replies"):   # was a TypeError (missing client_params)
        step(opt, x, delta, opt.init(x))


def test_argument_errors():
    """Unknown variants, inverted bounds and bad decay targets are refused at build time."""
    with pytest.raises(ValueError, match="unknown FedHyper variant"):
        fedhyper_server("sl+cl")
    with pytest.raises(ValueError, match="bounds"):
        fedhyper_server("g", alpha_bounds=(5.0, 0.2))
    with pytest.raises(ValueError, match="decay"):
        decay_server("gm")


# ------------------------------------------------------------------ presets, defaults in one place


def test_reference_preset_values():
    """preset: reference = the canonical defaults except uniform weighting, unclipped SL and Adam at
    0.01 (a drifted preset, or a schema that applies other overrides than the pure API states)."""
    ref = reference_preset()
    assert ref == {"weighting": "uniform", "sl_state_clip": False,
                   "local": {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0}}
    sched, canonical = LrSchedule(preset="reference"), LrSchedule()
    assert (sched.weighting, sched.sl_state_clip) == (ref["weighting"], ref["sl_state_clip"])
    assert {k: getattr(sched, k) for k in LrSchedule.model_fields if k not in ("preset", "weighting", "sl_state_clip")} \
        == {k: getattr(canonical, k) for k in LrSchedule.model_fields if k not in ("preset", "weighting", "sl_state_clip")}
    assert LrSchedule(preset="reference", sl_state_clip=True).sl_state_clip is True     # explicit keys win
    assert "sl_acc" in fedhyper_server("sl", sl_state_clip=ref["sl_state_clip"]).init({"w": np.zeros(1)})


SERVER_KEYS = ("alpha0", "beta_g", "alpha_bounds", "gm_bounds", "gm_momentum", "beta_sl", "sl_bounds", "sl_state_clip")
CLIENT_KEYS = {"beta_l": "beta_l", "beta_lg": "beta_lg", "cl_factor_cap": "factor_cap", "cl_bounds": "bounds"}


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def test_defaults_live_in_one_place():
    """The scenario schema's defaults == the keyword defaults of the pure server/client code (drift
    such as FedHyperClient defaulting beta_lg to 0.01 while the schema says auto)."""
    schema = LrSchedule()
    server = _defaults(fedhyper_server)
    assert {k: _norm(server[k]) for k in SERVER_KEYS} == {k: _norm(getattr(schema, k)) for k in SERVER_KEYS}
    client = _defaults(FedHyperClient.__init__)
    assert {arg: _norm(client[arg]) for arg in CLIENT_KEYS.values()} == \
        {arg: _norm(getattr(schema, key)) for key, arg in CLIENT_KEYS.items()}
    assert _defaults(fedhyper_server)["alpha0"] == schema.alpha0 and schema.variant == "g+cl"
    decay, fedexp = _defaults(decay_server), _defaults(fedexp_server)
    assert (decay["alpha0"], decay["rate"], fedexp["eps"]) == (schema.alpha0, schema.decay_rate, schema.fedexp_eps)


# ------------------------------------------------------------------ H3 anti-wind-up, H4 signs


@pytest.mark.parametrize("variant,key,hi", [("g", "alpha", 5.0), ("gm", "a", 4.0), ("sl", "lam", 10.0)])
def test_h3_anti_windup(variant, key, hi):
    """H3: after 50 saturating steps one step with beta*h = -0.01 leaves the bound (state clip, no wind-up)."""
    opt, x, v = fedhyper_server(variant), {"w": np.zeros(3)}, np.array([1.0, 2.0, 2.0])
    s = opt.init(x)
    for _ in range(50):
        x, s = step(opt, x, {"w": v}, s)
    assert float(s[key]) == hi
    prev = s["m"]["w"] if variant == "gm" else s["delta_prev"]["w"]
    _, s = step(opt, x, {"w": -0.01 * prev / np.dot(prev, prev)}, s)          # beta * h = -0.01
    assert float(s[key]) == pytest.approx(hi - 0.01, abs=1e-12)


def test_h3_reference_sl_winds_up():
    """H3 (ref): the reference SL accumulator winds up: one opposite step keeps lambda at the bound."""
    opt = fedhyper_server("sl", sl_state_clip=reference_preset()["sl_state_clip"])
    x, v = {"w": np.zeros(3)}, np.array([1.0, 2.0, 2.0])
    s = opt.init(x)
    for _ in range(50):
        x, s = step(opt, x, {"w": v}, s)
    _, s = step(opt, x, {"w": -0.01 * v / 9.0}, s)
    assert lr_scale(opt, s) == 10.0 and float(s["sl_acc"]) > 400


@pytest.mark.parametrize("variant,read,lo,hi,scale", [
    ("g", lr_global, 0.2, 5.0, 1.0), ("gm", lambda o, s: float(s["a"]), -0.2, 4.0, 0.2),
    ("sl", lr_scale, 0.1, 10.0, 1.0)])
def test_h4_sign_behaviour(variant, read, lo, hi, scale):
    """H4: a constant update drives the LR strictly up to the bound, alternating ones strictly down."""
    v = np.array([0.3, -0.4]) * scale                 # ||v||^2 = 0.25 scale^2
    for sign, bound in ((1.0, hi), (-1.0, lo)):
        opt, x = fedhyper_server(variant), {"w": np.zeros(2)}
        s = opt.init(x)
        x, s = step(opt, x, {"w": v}, s)
        values = [read(opt, s)]
        for t in range(1, 80):
            x, s = step(opt, x, {"w": v * sign ** t}, s)
            values.append(read(opt, s))
        diffs = np.diff(values) * sign
        hit = values.index(bound)
        assert hit > 2 and np.all(diffs[:hit] > 0) and all(val == bound for val in values[hit:])


# ------------------------------------------------------------------ H6 quadratic sanity


def _quadratic(opt, seed: int) -> tuple[float, list[float]]:
    c = np.random.default_rng(seed).normal(size=(4, 10))
    x = {"x": np.zeros(10)}
    s, lrs = opt.init(x), []
    for _ in range(20):
        replies = [{"x": cm + 0.9 ** 5 * (x["x"] - cm)} for cm in c]     # 5 GD steps at eta = 0.1 on f_m
        x, s = step(opt, x, mean_update(x, replies, [1] * 4), s)
        lrs.append(lr_global(opt, s))
    return 0.5 * float(np.mean([np.sum((x["x"] - cm) ** 2) for cm in c])), lrs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_h6_quadratic_sanity(seed):
    """H6: on quadratics G raises a too-small alpha, lowers a too-large one, never loses to FedAvg."""
    for alpha0, rises in ((0.2, True), (4.6, False)):
        loss_g, alphas = _quadratic(fedhyper_server("g", alpha0=alpha0), seed)
        loss_f, _ = _quadratic(fedavg(alpha0), seed)
        assert (alphas[-1] > alpha0) if rises else (alphas[-1] < alpha0)
        assert loss_g <= loss_f + 1e-12


# ------------------------------------------------------------------ H11 resume, checkpoint

X0 = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32), "buf": np.zeros(2, np.float32)}


def _server(variant: str) -> Server:
    """A fresh server: the variant on w, b (buf is a buffer), plus CL's plugin for CL variants."""
    trainable = ["w", "b"]
    plugins = [PreviousUpdate(CL, trainable)] if "cl" in variant else []
    return Server(fedhyper_server(variant, sl_state_clip=variant != "sl", trainable=trainable), plugins,
                  client_lr=ETA0)


def _synthetic_run(server: Server, rounds: range, x, s):
    for t in rounds:
        rng = np.random.default_rng(t)
        replies = []
        for m in range(2):
            noise = {"w": rng.normal(size=(4, 3)) * 0.3 + 0.1, "b": rng.normal(size=5) * 0.3, "buf": rng.normal(size=2)}
            replies.append(ClientUpdate(m, 1.0 + m, {k: (x[k] + noise[k]).astype(np.float32) for k in x}))
        x, s, _ = server.aggregate(s, server.plan(s, t + 1, x), x, replies)
    return x, s


def _save(tmp_path: Path, x, s) -> None:
    arrays, skeleton = flatten(s)
    save_file(x, str(tmp_path / "params.safetensors"))
    save_file(arrays, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(skeleton)


def _load(tmp_path: Path):
    params = load_file(str(tmp_path / "params.safetensors"))
    x = {k: params[k] for k in X0}                        # model order
    s = unflatten(load_file(str(tmp_path / "state.safetensors")), (tmp_path / "state.json").read_text())
    return x, s


def _assert_same_run(xa, sa, xb, sb) -> None:
    assert bit_equal(xa, xb)
    (a, ka), (b, kb) = flatten(sa), flatten(sb)
    assert ka == kb and list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", VARIANTS)
def test_h11_resume_is_bit_identical(variant, tmp_path):
    """H11: checkpoint after round 3 (safetensors + skeleton), resume in a fresh Server: bit-identical."""
    x_full, s_full = _synthetic_run(_server(variant), range(6), X0, _server(variant).init(X0))
    server = _server(variant)
    x3, s3 = _synthetic_run(server, range(3), X0, server.init(X0))
    _save(tmp_path, x3, s3)
    x, s = _load(tmp_path)
    x_r, s_r = _synthetic_run(_server(variant), range(3, 6), x, s)        # a fresh server object
    _assert_same_run(x_full, s_full, x_r, s_r)


def _resume_child(tmp: str) -> None:
    """Run in a fresh process: load the round-3 checkpoint, run rounds 4-6, save."""
    tmp_path = Path(tmp)
    x, s = _load(tmp_path)
    x, s = _synthetic_run(_server("gm+cl"), range(3, 6), x, s)
    (tmp_path / "out").mkdir()
    _save(tmp_path / "out", x, s)


def test_h11_resume_in_a_fresh_process(tmp_path):
    """H11 across processes: nothing of the run may live in module globals or process state."""
    server = _server("gm+cl")
    x3, s3 = _synthetic_run(server, range(3), X0, server.init(X0))
    _save(tmp_path, x3, s3)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('fh_child', {str(Path(__file__))!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            f"mod._resume_child({str(tmp_path)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    x_full, s_full = _synthetic_run(_server("gm+cl"), range(6), X0, _server("gm+cl").init(X0))
    x6, s6 = _load(tmp_path / "out")
    _assert_same_run(x_full, s_full, x6, s6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_round_trip_before_round_zero(variant, tmp_path):
    """The initial state (no delta_prev / m yet) checkpoints and restores (None, empty array set)."""
    server = _server(variant)
    s = server.init(X0)
    _save(tmp_path, X0, s)
    _, r = _load(tmp_path)
    assert flatten(r) == flatten(s) and r["optimizer"] == s["optimizer"]
    if variant == "cl":
        assert r["optimizer"] is None                     # FedAvg at alpha0: stateless
    else:
        assert r["optimizer"]["m" if variant.startswith("gm") else "delta_prev"] is None
    if "cl" in variant:
        assert r["plugins"][CL] is None


# ------------------------------------------------------------------ H9 pure part


def test_h9_downlink_is_the_trainable_arrays_only():
    """H9: CL adds exactly #trainable x 4 bytes (fp32) of downlink, trainable only; G/GM/SL add nothing;
    the uplink and the model arrays are FedAvg's."""
    fed = Federation(fedhyper_server("gm+cl", trainable=TRAINABLE), prev=True)
    ref = Federation(fedavg())
    ref.round()
    assert fed.server.plan(fed.state, 1, fed.x).arrays == {}                   # round 0: may be omitted
    fed.round()
    plan = fed.server.plan(fed.state, 2, fed.x)
    prev = plan.arrays[f"{CL}.prev_update"]
    assert list(plan.arrays) == [f"{CL}.prev_update"]
    n_trainable = sum(p.numel() for p in fed.model.parameters())
    assert list(prev) == TRAINABLE
    assert [p.shape for p in prev.values()] == [tuple(p.shape) for p in fed.model.parameters()]
    assert all(p.dtype == np.float32 for p in prev.values())
    assert sum(p.nbytes for p in prev.values()) == 4 * n_trainable
    assert [(k, a.shape, a.dtype) for k, a in fed.x.items()] == [(k, tuple(v.shape), v.numpy().dtype)
                                                                  for k, v in fed.model.state_dict().items()]
    ref_plan = ref.server.plan(ref.state, 2, ref.x)
    assert plan.model_spec == ref_plan.model_spec and plan.group_specs == ref_plan.group_specs == {}
    for variant in ("g", "gm", "sl"):
        other = Federation(fedhyper_server(variant, trainable=TRAINABLE))
        other.round()
        p = other.server.plan(other.state, 2, other.x)
        assert p.arrays == {} and p.model_spec == ref_plan.model_spec and p.scalars.keys() == ref_plan.scalars.keys()
