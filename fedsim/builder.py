"""Scenario -> algorithm objects: the one place where scenario keys become keyword arguments.

Every algorithm is registered here once, by the scenario section and name that select it
(``strategy.name``, ``lr_schedule.kind``). A registration is a small function from the
validated section (and the :class:`~fedsim.federation.Federation`) to :class:`Parts`: a server
optimizer (a transform), server plugins, client plugins, and the aggregation weighting. The
schema (``fedsim/scenario/schema.py``) owns the defaults; the functions below pass every value
explicitly, so the algorithm modules never read scenario keys and never supply defaults of
their own to a run.

Adding an algorithm: its module(s) in ``fedsim/algorithms/``, one ``@register`` function here,
its schema section. ``docs/architecture.md`` walks through SCAFFOLD.

Example:
    >>> from fedsim.scenario import parse_scenario
    >>> from fedsim.federation import Federation
    >>> scn = parse_scenario("name: t\\ndata: {dataset: digits, partition: {kind: iid, num_clients: 4}}\\n"
    ...                      "model: {name: mlp}\\nfederation: {rounds: 1, clients_per_round: 2}\\n"
    ...                      "strategy: {name: scaffold}\\n")
    >>> algs = build(scn, Federation(scn))
    >>> [p.name for p in algs.server.plugins], [p.name for p in algs.client_plugins]
    (['scaffold'], ['scaffold'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from fedsim.algorithms import fedhyper, optimizers, robust, scaffold
from fedsim.algorithms.fedprox import FedProx
from fedsim.core.client import ClientPlugin
from fedsim.core.server import Server, ServerPlugin
from fedsim.core.transforms import Transform
from fedsim.federation import Federation
from fedsim.privacy import calibrate, plugins as privacy
from fedsim.scenario import Scenario, ScenarioError


@dataclass
class Parts:
    """What one registered algorithm contributes to a run."""

    optimizer: Transform | None = None
    server_plugins: list[ServerPlugin] = field(default_factory=list)
    client_plugins: list[ClientPlugin] = field(default_factory=list)
    uniform_weights: bool = False
    notes: list[str] = field(default_factory=list)      # what the user should know (shown at the start)


@dataclass
class Algorithms:
    """A scenario's algorithms, both sides: the :class:`Server` and the client plugins."""

    server: Server
    client_plugins: list[ClientPlugin]
    notes: list[str] = field(default_factory=list)


Builder = Callable[[Any, Federation], Parts]
REGISTRY: dict[tuple[str, str], Builder] = {}


def register(section: str, name: str) -> Callable[[Builder], Builder]:
    """Register ``fn(section_config, federation) -> Parts`` for ``<section>.{name,kind}: <name>``."""
    def deco(fn: Builder) -> Builder:
        REGISTRY[(section, name)] = fn
        return fn
    return deco


# ----------------------------------------------------------------- strategy.name


def _robust(cfg: Any, fed: Federation, parts: Parts) -> Parts:
    """Every strategy's ``robust`` / ``max_update_norm``: a :class:`~fedsim.algorithms.robust.RobustAggregation`
    server plugin replacing the weighted mean (none when neither key is set)."""
    if cfg.robust is None and cfg.max_update_norm is None:
        return parts
    problems, n = [], fed.cohort_size
    key = "robust" if cfg.robust is not None else "max_update_norm"
    privacy = fed.scenario.privacy
    if privacy is not None and privacy.unit == "client":
        problems.append(f"strategy.{key}: client-level DP (privacy.unit: client) replaces the aggregate with a "
                        f"clipped, noised sum, which its guarantee depends on; drop strategy.{key} or use "
                        "privacy.unit: example")
    f = cfg.robust_byzantine
    if cfg.robust == "krum" and n <= 2 * f + 2:
        problems.append(f"strategy.robust_byzantine: Krum with f={f} attackers needs more than 2f + 2 = {2 * f + 2} "
                        f"clients per round; this scenario samples {n} (assume at most f = {max((n - 3) // 2, 0)} "
                        "attackers, or sample more clients)")
    if problems:
        raise ScenarioError(f"scenario '{fed.scenario.name}'", problems)
    if cfg.robust == "trimmed_mean" and robust.trim_count(n, cfg.robust_trim) == 0:
        parts.notes.append(f"strategy.robust_trim {cfg.robust_trim} of {n} clients per round trims none: the trimmed "
                           f"mean is the plain mean; set robust_trim to at least {1 / n:.3g}")
    parts.server_plugins.append(robust.RobustAggregation("robust", rule=cfg.robust, trim=cfg.robust_trim,
                                                         byzantine=f or 0, max_update_norm=cfg.max_update_norm))
    return parts


@register("strategy", "fedavg")
def _fedavg(cfg: Any, fed: Federation) -> Parts:
    return _robust(cfg, fed, Parts(optimizers.fedavg(cfg.server_lr)))


@register("strategy", "fedavgm")
def _fedavgm(cfg: Any, fed: Federation) -> Parts:
    return _robust(cfg, fed, Parts(optimizers.fedavgm(cfg.server_lr, cfg.server_momentum)))


@register("strategy", "fedadam")
def _fedadam(cfg: Any, fed: Federation) -> Parts:
    return _robust(cfg, fed, Parts(optimizers.fedadam(cfg.server_lr, cfg.beta_1, cfg.beta_2, cfg.tau)))


@register("strategy", "fedprox")
def _fedprox(cfg: Any, fed: Federation) -> Parts:
    prox = [FedProx("fedprox", cfg.proximal_mu)] if cfg.proximal_mu > 0 else []
    return _robust(cfg, fed, Parts(optimizers.fedavg(cfg.server_lr), client_plugins=prox))


@register("strategy", "scaffold")
def _scaffold(cfg: Any, fed: Federation) -> Parts:
    trainable = fed.trainable_names()
    momentum = fed.scenario.federation.local.momentum
    notes = [f"strategy 'scaffold' with local momentum {momentum}: option II's control variates assume plain SGD "
             "steps; set federation.local.momentum: 0 for the paper's algorithm"] if momentum > 0 else []
    return _robust(cfg, fed, Parts(optimizers.fedavg(cfg.server_lr), [scaffold.ScaffoldServer("scaffold", trainable)],
                                   [scaffold.ScaffoldClient("scaffold")], notes=notes))


# ----------------------------------------------------------------- lr_schedule.kind


@register("lr_schedule", "constant")
def _constant(cfg: Any, fed: Federation) -> Parts:
    return Parts()


@register("lr_schedule", "decay")
def _decay(cfg: Any, fed: Federation) -> Parts:
    return Parts(fedhyper.decay_server(cfg.decay_target, alpha0=cfg.alpha0, rate=cfg.decay_rate,
                                       trainable=fed.trainable_names()), uniform_weights=cfg.weighting == "uniform")


@register("lr_schedule", "fedexp")
def _fedexp(cfg: Any, fed: Federation) -> Parts:
    return Parts(fedhyper.fedexp_server(eps=cfg.fedexp_eps, trainable=fed.trainable_names()),
                 uniform_weights=cfg.weighting == "uniform")


@register("lr_schedule", "fedhyper")
def _fedhyper(cfg: Any, fed: Federation) -> Parts:
    trainable = fed.trainable_names()
    opt = fedhyper.fedhyper_server(cfg.variant, alpha0=cfg.alpha0, beta_g=cfg.beta_g, alpha_bounds=cfg.alpha_bounds,
                                   gm_bounds=cfg.gm_bounds, gm_momentum=cfg.gm_momentum, beta_sl=cfg.beta_sl,
                                   sl_bounds=cfg.sl_bounds, sl_state_clip=cfg.sl_state_clip, trainable=trainable)
    parts = Parts(opt, uniform_weights=cfg.weighting == "uniform")
    if cfg.variant.endswith("cl"):
        beta_lg = fedhyper.auto_beta_lg(fed.cohort_size) if cfg.beta_lg == "auto" else cfg.beta_lg
        parts.server_plugins.append(fedhyper.PreviousUpdate("fedhyper_cl", trainable))
        parts.client_plugins.append(fedhyper.ClientLR("fedhyper_cl", beta_l=cfg.beta_l, beta_lg=beta_lg,
                                                      factor_cap=cfg.cl_factor_cap, bounds=cfg.cl_bounds))
    return parts


# ----------------------------------------------------------------- privacy.unit

CALIBRATION = ("max_participation: sigma is calibrated to the target over steps = (local steps per round) x "
               "federation.rounds (+ the exploration stage's most steps, pruning.explore_epochs + warmup_epochs "
               "epochs, with AutoFLIP), the most a client could take part in, so the target holds for any "
               "participation")


def _check_delta(cfg: Any, fed: Federation, population: bool) -> None:
    """delta must be below 1/|D_k| (record level: every client; client level: 1/N)."""
    if population:
        if cfg.delta >= 1.0 / fed.num_clients:
            raise ScenarioError(f"scenario '{fed.scenario.name}'", [
                f"privacy.delta: {cfg.delta} must be below 1/N = {1.0 / fed.num_clients:.3g} for client-level DP "
                f"over {fed.num_clients} clients; lower it"])
        return
    smallest = min(range(fed.num_clients), key=lambda c: fed.client_sizes[c])
    n = fed.client_sizes[smallest]
    if cfg.delta >= 1.0 / n:
        raise ScenarioError(f"scenario '{fed.scenario.name}'", [
            f"privacy.delta: {cfg.delta} must be below 1/|D_k| = {1.0 / n:.3g} for the smallest client (client "
            f"{smallest} has {n} examples); lower it, e.g. to {10 ** math.floor(math.log10(0.1 / n)):g}"])


def _calibration(cfg: Any, fed: Federation) -> dict:
    return {"rule": cfg.calibration, "assumption": CALIBRATION, "target_epsilon": cfg.epsilon, "delta": cfg.delta,
            "accountant": cfg.accountant, "rounds": fed.scenario.federation.rounds,
            "explicit_noise_multiplier": cfg.noise_multiplier}


@register("privacy", "example")
def _record_level(cfg: Any, fed: Federation) -> Parts:
    _check_delta(cfg, fed, population=False)
    local = fed.scenario.federation.local
    sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None or cfg.epsilon is not None else 1.0
    notes = []
    mode, why = cfg.grad_sample_mode, "set in the scenario"
    pruning = fed.scenario.pruning
    if mode == "auto" and pruning is not None:
        mode, why = "hooks", "pruning masks the per-sample gradients before clipping"
    elif mode == "auto":
        mode, why = privacy.auto_grad_sample_mode(fed.client_model(), cfg.mechanism)
        if mode == "ghost":
            notes.append(f"privacy.grad_sample_mode auto -> ghost clipping: {why}")
    client = privacy.RecordLevelClient(
        "privacy", mechanism=cfg.mechanism, clip=cfg.clip, noise_multiplier=sigma, target_epsilon=cfg.epsilon,
        delta=cfg.delta, accountant=cfg.accountant, batch_size=local.batch_size, epochs=local.epochs,
        steps=local.steps, rounds=fed.scenario.federation.rounds, error_clip_ratio=cfg.error_clip_ratio,
        kappa=None if cfg.noise_inflation == "sqrt(1+2r)" else float(cfg.noise_inflation),
        persist_error=cfg.persist_error, lr_divide_by_c1=cfg.lr_divide_by_c1,
        grad_sample_mode=mode,
        physical_batch_size=cfg.physical_batch_size,
        stage_epochs=pruning.explore_epochs + pruning.warmup_epochs if pruning and pruning.kind == "autoflip" else 0)
    mirror = privacy.LedgerMirror("privacy", unit="example", mechanism=cfg.mechanism, delta=cfg.delta,
                                  target_epsilon=cfg.epsilon, accountant=cfg.accountant,
                                  calibration=_calibration(cfg, fed), grad_sample_mode={"mode": mode, "why": why})
    if cfg.mechanism == "dicesgd":
        notes.append("privacy: the epsilon reported for DiceSGD is eps_dpsgd_equiv (DP-SGD's at sigma_base); it does "
                     "not cover the error-feedback channel (privacy.json: epsilon_meaning)")
        if cfg.error_clip_ratio < 1:
            notes.append(f"privacy.error_clip_ratio {cfg.error_clip_ratio} < 1: DiceSGD's analysis takes C2 >= C1")
    return Parts(server_plugins=[mirror], client_plugins=[client], notes=notes)


@register("privacy", "client")
def _client_level(cfg: Any, fed: Federation) -> Parts:
    _check_delta(cfg, fed, population=True)
    rounds, q = fed.scenario.federation.rounds, fed.cohort_size / fed.num_clients
    sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None else \
        (calibrate(cfg.epsilon, cfg.delta, q, rounds, cfg.accountant) if cfg.epsilon is not None else 1.0)
    return Parts(server_plugins=[privacy.ClientLevelServer(
        "privacy", clip=cfg.clip, noise_multiplier=sigma, cohort=fed.cohort_size, num_clients=fed.num_clients,
        seed=fed.scenario.seed, delta=cfg.delta, target_epsilon=cfg.epsilon, accountant=cfg.accountant,
        calibration={**_calibration(cfg, fed), "noise_multiplier": sigma, "sample_rate": q})])


# ----------------------------------------------------------------- pruning.kind


def _explorers(cfg: Any, fed: Federation) -> list[int]:
    """round(p_e K) explorers (at least 1), or ``explorers``, uniform from the seed's "explore" stream."""
    from fedsim.seeding import numpy_rng

    fraction = cfg.explorer_fraction if cfg.explorer_fraction is not None else 1.0
    count = cfg.explorers if cfg.explorers is not None else max(1, round(fraction * fed.num_clients))
    if count > fed.num_clients:
        raise ScenarioError(f"scenario '{fed.scenario.name}'", [
            f"pruning.explorers: {count} is more than the {fed.num_clients} clients"])
    rng = numpy_rng(fed.scenario.seed, "explore")
    return sorted(int(c) for c in rng.choice(fed.num_clients, size=count, replace=False))


@register("pruning", "autoflip")
@register("pruning", "random")
def _pruning(cfg: Any, fed: Federation) -> Parts:
    from fedsim.algorithms import autoflip, autoflip_plugins
    from fedsim.seeding import numpy_rng
    from fedsim.train.flops import forward_macs

    arrays, trainable = fed.initial_arrays(), fed.trainable_names()
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    model = fed.client_model()
    unit_map = model.unit_map() if hasattr(model, "unit_map") else None
    structured = cfg.structured_sparsity if cfg.structured_sparsity is not None else \
        (0.2 if cfg.kind == "autoflip" and unit_map else 0.0)
    notes = []
    if cfg.kind == "autoflip" and cfg.structured_sparsity is None and not unit_map:
        notes.append(f"pruning: model '{fed.scenario.model.name}' declares no unit map, so the mask is "
                     "unstructured only (structured_sparsity 0)")
    if structured > 0 and not unit_map:
        raise ScenarioError(f"scenario '{fed.scenario.name}'", [
            f"pruning.structured_sparsity: model '{fed.scenario.model.name}' declares no unit map (its structured "
            "units); set structured_sparsity: 0"])
    mask_shapes = {k: shapes[k] for k in trainable}
    selection = dict(sparsity=cfg.sparsity, maskable=cfg.maskable, exclude=tuple(cfg.exclude))
    try:
        maskable = autoflip.maskable_names(mask_shapes, cfg.maskable, cfg.exclude)
    except ValueError as e:
        raise ScenarioError(f"scenario '{fed.scenario.name}'", [f"pruning.exclude: {e}"]) from None
    owned = {s.param for layer in unit_map for s in layer.slices} if structured > 0 else set()
    bitmap = [k for k in trainable if k in maskable or k in owned]     # what the mask may zero

    def build_mask(guidance):
        return autoflip.hybrid_mask(guidance, mask_shapes, structured_sparsity=structured, unit_map=unit_map,
                                    selection=cfg.selection, **selection)

    def random_mask():
        return autoflip.random_mask(mask_shapes, rng=numpy_rng(fed.scenario.seed, "random-mask"), **selection)

    input_shape = fed.dataset.input_shape

    def macs(mask, structured_mask):
        return {"dense": sum(forward_macs(model, input_shape).values()),
                "theoretical": sum(forward_macs(model, input_shape, mask).values()),
                "structured": sum(forward_macs(model, input_shape, structured_mask).values())}

    server = autoflip_plugins.PruningServer(
        "pruning", kind=cfg.kind, shapes=shapes, dtypes={k: v.dtype for k, v in arrays.items()}, trainable=trainable,
        mask_names=bitmap, maskable=maskable, build_mask=build_mask, random_mask=random_mask,
        explorers=_explorers(cfg, fed) if cfg.kind == "autoflip" else [], normalization=cfg.normalization,
        weighting=cfg.explore_weighting, macs=macs, refresh_every=cfg.mask_update_every or 0,
        start_from=cfg.start_from)
    client = autoflip_plugins.PruningClient(
        "pruning", mask_shapes={k: shapes[k] for k in bitmap}, explore_epochs=cfg.explore_epochs, patience=cfg.patience,
        warmup_epochs=cfg.warmup_epochs, explore_optimizer=cfg.explore_optimizer, explore_lr=cfg.explore_lr,
        explore_batch_size=cfg.explore_batch_size)
    return Parts(server_plugins=[server], client_plugins=[client], notes=notes)


# ----------------------------------------------------------------- assembly


def _parts(scenario: Scenario, fed: Federation) -> list[Parts]:
    """Privacy first (its client side privatizes before the other plugins' hooks), then the strategy,
    then the learning-rate schedule, then pruning."""
    out = []
    if scenario.privacy is not None:
        out.append(REGISTRY[("privacy", scenario.privacy.unit)](scenario.privacy, fed))
    out.append(REGISTRY[("strategy", scenario.strategy.name)](scenario.strategy, fed))
    if scenario.lr_schedule is not None:
        out.append(REGISTRY[("lr_schedule", scenario.lr_schedule.kind)](scenario.lr_schedule, fed))
    if scenario.pruning is not None:          # last: its gradient mask sees every other hook's edits
        out.append(REGISTRY[("pruning", scenario.pruning.kind)](scenario.pruning, fed))
    return out


def build(scenario: Scenario, fed: Federation) -> Algorithms:
    """Both sides of a scenario's algorithms.

    The server optimizer is the last section's that names one: an ``lr_schedule`` replaces the
    strategy's (the schema allows that only where the strategy's server step is plain FedAvg).
    """
    parts = _parts(scenario, fed)
    optimizer = next(p.optimizer for p in reversed(parts) if p.optimizer is not None)
    server = Server(optimizer, [s for p in parts for s in p.server_plugins], client_lr=scenario.federation.local.lr,
                    uniform_weights=any(p.uniform_weights for p in parts), num_clients=fed.num_clients)
    return Algorithms(server, [c for p in parts for c in p.client_plugins], [n for p in parts for n in p.notes])


def client_plugins(scenario: Scenario, fed: Federation) -> list[ClientPlugin]:
    """The client side only (what a ClientApp needs)."""
    return [c for p in _parts(scenario, fed) for c in p.client_plugins]


__all__ = ["REGISTRY", "Algorithms", "Parts", "build", "client_plugins", "register"]
