"""FedHyper pure cores: schedulers by hand, end-to-end reductions (H1, H2, H12), CL invariants
(H8), quadratic sanity (H6), resume (H11), anti-wind-up (H3) and sign behaviour (H4).

Spec: specs/fedhyper.md section 4. A tiny torch MLP with a BatchNorm (float buffers and an
integer counter), 4 clients doing local SGD in a plain loop.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fedsim.algorithms.aggregate import fedavg, mean_update
from fedsim.algorithms.fedhyper import (
    VARIANTS, FedHyperClient, FedHyperServer, auto_beta_lg, client_kwargs, decay_server, fedexp_lr, fedexp_server,
    fedhyper_server, previous_update, reference_preset, server_kwargs, state_from_arrays, state_to_arrays)

ROOT = Path(__file__).resolve().parents[3]
ETA0 = 0.1
ZERO_BETAS = {"beta_g": 0.0, "beta_sl": 0.0}


# ------------------------------------------------------------------ a tiny federation


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


_names = {n for n, _ in make_model().named_parameters()}
TRAINABLE = [k in _names for k in make_model().state_dict()]     # BN running stats are buffers


def client_data(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(24, 5, generator=g) + m
    return x, (x[:, 0] > m).long() + (x[:, 1] > m).long()


class Federation:
    """4 clients, 2 local epochs of SGD (batch 8) per round; server state in numpy."""

    def __init__(self, opt, *, cl: dict | None = None, weights=(24, 24, 24, 24)):
        self.model, self.opt, self.cl, self.weights = make_model(), opt, cl, list(weights)
        self.keys = list(self.model.state_dict())
        self.x = [v.numpy().copy() for v in self.model.state_dict().values()]
        self.state = opt.init(self.x)
        self.t, self.lrs_seen, self.b_log = 0, [], []

    def local(self, m: int, lr: float, prev) -> list[np.ndarray]:
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in zip(self.keys, self.x)})
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
        return [v.detach().numpy().copy() for v in self.model.state_dict().values()]

    def round(self) -> None:
        scale = getattr(self.opt, "local_lr_scale", lambda s: 1.0)(self.state)
        prev = previous_update(self.state) if isinstance(self.opt, FedHyperServer) else None
        prev = None if prev is None else [torch.from_numpy(p.astype(np.float32)) for p in prev]
        replies = [self.local(m, ETA0 * scale, prev) for m in range(4)]
        delta = mean_update(self.x, replies, self.weights)
        self.x, self.state = self.opt.update(self.x, delta, self.state)
        self.t += 1


def bit_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(torch.equal(torch.from_numpy(u), torch.from_numpy(v)) for u, v in zip(a, b))


# ------------------------------------------------------------------ H1, H2, H12 end to end


@pytest.mark.parametrize("variant", VARIANTS)
def test_h1_every_variant_reduces_to_fedavg_at_zero_hyper_lr(variant):
    ref = Federation(fedavg())
    cl = {"beta_l": 0.0, "beta_lg": 0.0} if "cl" in variant else None
    fed = Federation(fedhyper_server(variant, alpha0=1.0, trainable=TRAINABLE, **ZERO_BETAS), cl=cl)
    for _ in range(5):
        ref.round()
        fed.round()
        assert bit_equal(ref.x, fed.x)
        assert fed.opt.local_lr_scale(fed.state) == 1.0
    assert all(lr == ETA0 for lr in fed.lrs_seen)
    assert fed.b_log == ([1.0] * 5 * 4 * 6 if cl else [])


@pytest.mark.parametrize("variant,key,value", [("g", "alpha", 1.0), ("gm", "a", 0.0), ("sl", "lam", 1.0)])
def test_h2_round_zero_is_fedavg_whatever_beta(variant, key, value):
    ref = Federation(fedavg())
    fed = Federation(fedhyper_server(variant, beta_g=50.0, beta_sl=50.0, trainable=TRAINABLE))
    ref.round()
    fed.round()
    assert bit_equal(ref.x, fed.x)
    assert float(fed.state[key]) == value and fed.opt.local_lr_scale(fed.state) == 1.0


@pytest.mark.parametrize("variant", ["g", "gm", "sl", "cl"])
def test_h2_round_zero_at_alpha0_is_fedavg_at_alpha0(variant):
    rng = np.random.default_rng(3)
    x = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4)]
    delta = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    ref, _ = fedavg(0.7).update(x, delta, {})
    opt = fedhyper_server(variant, alpha0=0.7, beta_g=9.0, beta_sl=9.0)
    new, _ = opt.update(x, delta, opt.init(x))
    assert bit_equal(ref, new)


def test_h12_sl_lambda_reaches_the_client_optimizers():
    fed = Federation(fedhyper_server("sl", beta_sl=200.0, trainable=TRAINABLE))
    sent = []
    for _ in range(4):
        sent.append(fed.opt.local_lr_scale(fed.state) * ETA0)
        fed.round()
    per_round = [fed.lrs_seen[i * 24:(i + 1) * 24] for i in range(4)]
    assert [set(r) for r in per_round] == [{s} for s in sent]
    assert sent[0] == sent[1] == ETA0          # the first change reaches clients in round 2
    assert sent[2] != ETA0 and sent[3] != ETA0


def test_decay_sl_is_delivered_and_decay_g_decays():
    fed = Federation(decay_server("sl", rate=0.5))
    for _ in range(3):
        fed.round()
    assert [fed.lrs_seen[i * 24] for i in range(3)] == [ETA0, ETA0 * 0.5, ETA0 * 0.25]
    opt, x = decay_server("g", alpha0=2.0, rate=0.5), [np.zeros(1)]
    s = opt.init(x)
    for t in range(3):
        x, s = opt.update(x, [np.ones(1)], s)
        assert opt.global_lr(s) == 2.0 * 0.5 ** t
    assert x[0][0] == 2.0 + 1.0 + 0.5


# ------------------------------------------------------------------ H8 CL invariants


def test_h8_cl_invariants_on_the_mlp(monkeypatch):
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
    assert cl.b == 0.1 and cl.steps == 5


def test_cl_skipped_steps_change_nothing_and_lr_goes_through_param_groups():
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
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    cl = FedHyperClient(0.1, [torch.tensor([1e300], dtype=torch.float64)], [p])
    _moves(cl, p, [[1e300], [1e300]], first=(0,))
    assert cl.b == 1.0 and cl.hypergrad_skipped == 1 and cl.steps == 2


def test_cl_none_previous_update_counts_as_zero_and_errors():
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    cl = FedHyperClient(0.1, None, [p], beta_lg="auto", clients_per_round=5)
    assert cl.beta_lg == pytest.approx(0.02)
    _moves(cl, p, [[1.0], [1.0]], first=(0,))
    assert cl.b == 1.0 and cl.metrics()["cl_b_final"] == 1.0
    with pytest.raises(ValueError, match="clients_per_round"):
        FedHyperClient(0.1, None, [p], beta_lg="auto")
    with pytest.raises(ValueError, match="shapes"):
        FedHyperClient(0.1, [torch.zeros(2)], [p])
    with pytest.raises(ValueError):
        FedHyperClient(0.1, None, [p], bounds=(2.0, 1.0))
    assert auto_beta_lg(10) == 0.01


# ------------------------------------------------------------------ server rules by hand


def test_g_by_hand_raw_delta_prev_and_buffers_not_scaled():
    x = [np.zeros(2, np.float32), np.zeros(1, np.float32), np.array([7], np.int64)]
    opt = fedhyper_server("g", alpha0=2.0, beta_g=0.5, alpha_bounds=(0.1, 10.0), trainable=[True, False, False])
    s = opt.init(x)
    x, s = opt.update(x, [np.array([1.0, 1.0]), np.array([1.0]), np.array([0.0])], s)
    assert x[0].tolist() == [2.0, 2.0] and x[1].tolist() == [1.0] and x[2].tolist() == [7]
    x, s = opt.update(x, [np.array([1.0, 3.0]), np.array([1.0]), np.array([0.0])], s)   # h = 4 -> alpha 4
    assert opt.global_lr(s) == 4.0 and x[0].tolist() == [6.0, 14.0] and x[1].tolist() == [2.0]
    assert [d.tolist() for d in previous_update(s)] == [[1.0, 3.0]]                  # raw, trainable only


def test_gm_by_hand():
    opt, x = fedhyper_server("gm", alpha0=1.0, beta_g=0.1, gm_bounds=(-1.0, 1.0), gm_momentum=0.5), [np.zeros(1)]
    s = opt.init(x)
    x, s = opt.update(x, [np.array([2.0])], s)         # FedAvg; m = 2
    assert x[0][0] == 2.0 and s["m"][0][0] == 2.0 and float(s["a"]) == 0.0
    x, s = opt.update(x, [np.array([1.0])], s)         # a = 0.1*<2,1> = 0.2; m = 1 + 1 = 2; x += 1 + 0.4
    assert float(s["a"]) == pytest.approx(0.2) and s["m"][0][0] == 2.0
    assert x[0][0] == pytest.approx(3.4) and opt.global_lr(s) == pytest.approx(1.2)
    assert previous_update(s)[0][0] == 1.0


def test_sl_reference_accumulator_and_canonical_state():
    ref = fedhyper_server("sl", sl_state_clip=False, beta_sl=1.0)
    can = fedhyper_server("sl", beta_sl=1.0)
    x, sr, sc = [np.zeros(1)], ref.init([np.zeros(1)]), can.init([np.zeros(1)])
    for d in (3.0, 3.0, -0.1):
        _, sr = ref.update(x, [np.array([d])], sr)
        _, sc = can.update(x, [np.array([d])], sc)
    assert float(sr["sl_acc"]) == pytest.approx(9.0 - 0.3) and float(sc["lam"]) == pytest.approx(10.0 - 0.3)
    assert ref.local_lr_scale(sr) == pytest.approx(9.7) and can.local_lr_scale(sc) == pytest.approx(9.7)
    assert ref.global_lr(sr) == can.global_lr(sc) == 1.0


def test_nonfinite_hypergradient_is_skipped_and_counted():
    for variant in ("g", "gm", "sl"):
        opt, x = fedhyper_server(variant), [np.zeros(1)]
        s = opt.init(x)
        x, s = opt.update(x, [np.array([1e200])], s)
        before = dict(s)
        x, s = opt.update(x, [np.array([1e200])], s)     # <d, d_prev> = inf
        assert float(s["hypergrad_skipped"]) == 1.0 and float(s["round"]) == 2.0
        for k in before:
            if k not in ("hypergrad_skipped", "round"):
                assert s[k] is before[k]


def test_no_replies_leaves_everything_unchanged():
    for variant in VARIANTS:
        opt, x = fedhyper_server(variant), [np.ones(2)]
        s = opt.init(x)
        x2, s2 = opt.update(x, None, s)
        assert s2 is s and bit_equal(x2, x)


def test_fedexp_by_hand_and_server():
    x = [np.zeros(2), np.zeros(1)]
    clients = [[np.array([2.0, 0.0]), np.array([5.0])], [np.array([0.0, 2.0]), np.array([5.0])],
               [np.array([-1.0, -1.0]), np.array([5.0])]]
    delta = mean_update(x, clients, [1, 1, 1])         # (1/3, 1/3): ||d||^2 = 2/9, mean ||d_m||^2 = 10/3
    lr = fedexp_lr(x, clients, delta, trainable=[True, False])
    assert lr == pytest.approx((10 / 3) / (2 * (2 / 9 + 1e-3)), rel=1e-12)
    assert fedexp_lr(x, clients[:2], mean_update(x, clients[:2], [1, 1]), trainable=[True, False]) == 1.0
    assert fedexp_lr(x, [[np.array([1.0, 0.0]), np.zeros(1)], [np.array([-1.0, 0.0]), np.zeros(1)]],
                     [np.zeros(2), np.zeros(1)]) == pytest.approx(500.0)
    opt = fedexp_server(trainable=[True, False])
    new, s = opt.update(x, delta, opt.init(x), client_params=clients)
    assert new[1][0] == 5.0 and opt.global_lr(s) == lr and new[0][0] == pytest.approx(lr / 3)
    with pytest.raises(TypeError):
        opt.update(x, delta, opt.init(x))


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown FedHyper variant"):
        fedhyper_server("sl+cl")
    with pytest.raises(ValueError, match="bounds"):
        fedhyper_server("g", alpha_bounds=(5.0, 0.2))
    opt = fedhyper_server("g", trainable=[True])
    with pytest.raises(ValueError, match="trainable"):
        opt.update([np.zeros(1), np.zeros(1)], [np.zeros(1), np.zeros(1)], opt.init([np.zeros(1)]))
    with pytest.raises(ValueError, match="decay"):
        decay_server("gm")


def test_presets_and_kwargs():
    ref = reference_preset()
    assert ref["weighting"] == "uniform" and ref["sl_state_clip"] is False and "variant" not in ref
    assert ref["local"] == {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0}
    assert (ref["alpha_bounds"], ref["gm_bounds"], ref["gm_momentum"]) == ((0.2, 5.0), (-0.2, 4.0), 0.9)
    opt = fedhyper_server("sl", **server_kwargs(ref))
    assert "sl_acc" in opt.init([np.zeros(1)])
    kw = client_kwargs(ref, clients_per_round=10)
    assert kw == {"beta_l": 1.0, "beta_lg": 0.01, "factor_cap": 1.1, "bounds": (0.1, 10.0)}
    FedHyperClient(0.01, None, [torch.nn.Parameter(torch.zeros(1))], **kw)


# ------------------------------------------------------------------ H3 anti-wind-up, H4 signs


@pytest.mark.parametrize("variant,key,hi", [("g", "alpha", 5.0), ("gm", "a", 4.0), ("sl", "lam", 10.0)])
def test_h3_anti_windup(variant, key, hi):
    opt, x, v = fedhyper_server(variant), [np.zeros(3)], np.array([1.0, 2.0, 2.0])
    s = opt.init(x)
    for _ in range(50):
        x, s = opt.update(x, [v], s)
    assert float(s[key]) == hi
    prev = s["m"][0] if variant == "gm" else s["delta_prev"][0]
    _, s = opt.update(x, [-0.01 * prev / np.dot(prev, prev)], s)          # beta * h = -0.01
    assert float(s[key]) == pytest.approx(hi - 0.01, abs=1e-12)


def test_h3_reference_sl_winds_up():
    opt, x, v = fedhyper_server("sl", **server_kwargs(reference_preset())), [np.zeros(3)], np.array([1.0, 2.0, 2.0])
    s = opt.init(x)
    for _ in range(50):
        x, s = opt.update(x, [v], s)
    _, s = opt.update(x, [-0.01 * v / 9.0], s)
    assert opt.local_lr_scale(s) == 10.0 and float(s["sl_acc"]) > 400


@pytest.mark.parametrize("variant,read,lo,hi,scale", [
    ("g", lambda o, s: o.global_lr(s), 0.2, 5.0, 1.0), ("gm", lambda o, s: float(s["a"]), -0.2, 4.0, 0.2),
    ("sl", lambda o, s: o.local_lr_scale(s), 0.1, 10.0, 1.0)])
def test_h4_sign_behaviour(variant, read, lo, hi, scale):
    v = np.array([0.3, -0.4]) * scale                 # ||v||^2 = 0.25 scale^2
    for sign, bound in ((1.0, hi), (-1.0, lo)):
        opt, x = fedhyper_server(variant), [np.zeros(2)]
        s = opt.init(x)
        x, s = opt.update(x, [v], s)
        values = [read(opt, s)]
        for t in range(1, 80):
            x, s = opt.update(x, [v * sign ** t], s)
            values.append(read(opt, s))
        diffs = np.diff(values) * sign
        hit = values.index(bound)
        assert hit > 2 and np.all(diffs[:hit] > 0) and all(val == bound for val in values[hit:])


# ------------------------------------------------------------------ H6 quadratic sanity


def _quadratic(opt, seed: int) -> tuple[float, list[float]]:
    c = np.random.default_rng(seed).normal(size=(4, 10))
    x, s, lrs = [np.zeros(10)], opt.init([np.zeros(10)]), []
    for _ in range(20):
        replies = [[cm + 0.9 ** 5 * (x[0] - cm)] for cm in c]     # 5 GD steps at eta = 0.1 on f_m
        x, s = opt.update(x, mean_update(x, replies, [1] * 4), s)
        lrs.append(opt.global_lr(s) if isinstance(opt, FedHyperServer) else None)
    return 0.5 * float(np.mean([np.sum((x[0] - cm) ** 2) for cm in c])), lrs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_h6_quadratic_sanity(seed):
    for alpha0, rises in ((0.2, True), (4.6, False)):
        loss_g, alphas = _quadratic(fedhyper_server("g", alpha0=alpha0), seed)
        loss_f, _ = _quadratic(fedavg(alpha0), seed)
        assert (alphas[-1] > alpha0) if rises else (alphas[-1] < alpha0)
        assert loss_g <= loss_f + 1e-12


# ------------------------------------------------------------------ H11 resume, checkpoint


def _synthetic_run(rounds: range, x, s, opt):
    for t in rounds:
        rng = np.random.default_rng(t)
        delta = [rng.normal(size=(4, 3)) * 0.3 + 0.1, rng.normal(size=5) * 0.3, rng.normal(size=2)]
        x, s = opt.update(x, delta, s)
    return x, s


def _opt(variant):
    return fedhyper_server(variant, sl_state_clip=variant != "sl", trainable=[True, True, False])


X0 = [np.zeros((4, 3), np.float32), np.zeros(5, np.float32), np.zeros(2, np.float32)]


@pytest.mark.parametrize("variant", ["g", "gm", "sl", "cl"])
def test_h11_resume_is_bit_identical(variant, tmp_path):
    opt = _opt(variant)
    x_full, s_full = _synthetic_run(range(6), X0, opt.init(X0), opt)
    x3, s3 = _synthetic_run(range(3), X0, opt.init(X0), opt)
    save_file({f"x.{i}": a for i, a in enumerate(x3)}, str(tmp_path / "params.safetensors"))
    save_file(state_to_arrays(s3), str(tmp_path / "state.safetensors"))
    params, state = load_file(str(tmp_path / "params.safetensors")), load_file(str(tmp_path / "state.safetensors"))
    opt2 = _opt(variant)                                  # a fresh scheduler object
    x_r, s_r = _synthetic_run(range(3, 6), [params[f"x.{i}"] for i in range(3)], state_from_arrays(state), opt2)
    assert bit_equal(x_full, x_r)
    a, b = state_to_arrays(s_full), state_to_arrays(s_r)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_h11_resume_in_a_fresh_process(tmp_path):
    code = f"""
import numpy as np
from safetensors.numpy import load_file, save_file
from fedsim.algorithms.fedhyper_server import fedhyper_server, state_from_arrays, state_to_arrays
opt = fedhyper_server("gm", trainable=[True, True, False])
st = load_file({str(tmp_path / 'state.safetensors')!r})
x = [load_file({str(tmp_path / 'x.safetensors')!r})[f"x.{{i}}"] for i in range(3)]
s = state_from_arrays(st)
for t in range(3, 6):
    rng = np.random.default_rng(t)
    delta = [rng.normal(size=(4, 3)) * 0.3 + 0.1, rng.normal(size=5) * 0.3, rng.normal(size=2)]
    x, s = opt.update(x, delta, s)
save_file({{f"x.{{i}}": a for i, a in enumerate(x)}}, {str(tmp_path / 'x6.safetensors')!r})
save_file(state_to_arrays(s), {str(tmp_path / 'state6.safetensors')!r})
"""
    opt = _opt("gm")
    x3, s3 = _synthetic_run(range(3), X0, opt.init(X0), opt)
    save_file({f"x.{i}": a for i, a in enumerate(x3)}, str(tmp_path / "x.safetensors"))
    save_file(state_to_arrays(s3), str(tmp_path / "state.safetensors"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    x_full, s_full = _synthetic_run(range(6), X0, opt.init(X0), opt)
    x6 = load_file(str(tmp_path / "x6.safetensors"))
    assert bit_equal(x_full, [x6[f"x.{i}"] for i in range(3)])
    a, b = state_to_arrays(s_full), load_file(str(tmp_path / "state6.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_state_round_trip_before_round_zero():
    for variant in VARIANTS:
        s = fedhyper_server(variant).init([np.zeros(2)])
        r = state_from_arrays(state_to_arrays(s))
        assert r.keys() == s.keys() and previous_update(r) is None


# ------------------------------------------------------------------ H9 pure part


def test_h9_downlink_is_the_trainable_arrays_only():
    fed = Federation(fedhyper_server("gm+cl", trainable=TRAINABLE))
    assert previous_update(fed.state) is None                   # round 0: may be omitted
    fed.round()
    prev = previous_update(fed.state)
    n_trainable = sum(p.numel() for p in fed.model.parameters())
    assert [p.shape for p in prev] == [tuple(p.shape) for p in fed.model.parameters()]
    assert sum(p.astype(np.float32).nbytes for p in prev) == 4 * n_trainable
    assert [(a.shape, a.dtype) for a in fed.x] == [(tuple(v.shape), v.numpy().dtype)
                                                    for v in fed.model.state_dict().values()]
