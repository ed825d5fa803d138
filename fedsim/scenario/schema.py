"""The scenario schema: pydantic models for every section of a fedsim YAML file.

This module knows the shape of a scenario; `fedsim.scenario.load` knows YAML.
The section reserved for a later capability (``lora``) is accepted only when absent or null.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator,
                      model_serializer, model_validator)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]



def _either_or(section: Any, a: str, b: str) -> Any:
    """Reject a section (model or raw mapping) that sets both ``a`` and ``b``."""
    get = section.get if isinstance(section, dict) else lambda k: getattr(section, k, None)
    if get(a) is not None and get(b) is not None:
        raise ValueError(either_or_message(a, b))
    return section


def ceil_fraction(fraction: float, n: int) -> int:
    """``fraction`` of ``n`` rounded up, at least 1 (``fraction`` of the clients, of a cohort).

    Example:
        >>> ceil_fraction(0.3, 10), ceil_fraction(0.01, 10)
        (3, 1)
    """
    return max(1, math.ceil(fraction * n - 1e-9))


def either_or_message(a: str, b: str) -> str:
    """The message for two keys that exclude each other."""
    return f"give either {a} or {b}, not both"


#: The largest ``seed``: scikit-learn's ``random_state`` (train/test splits) is a 32-bit seed.
SEED_MAX = 2 ** 32 - 1

class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- data
class IidPartition(Section):
    kind: Literal["iid"]
    num_clients: PositiveInt
    min_size: PositiveInt = 1


class DirichletPartition(Section):
    kind: Literal["dirichlet"]
    num_clients: PositiveInt
    alpha: PositiveFloat = 0.5
    min_size: PositiveInt = 1


class ShardsPartition(Section):
    kind: Literal["shards"]
    num_clients: PositiveInt
    classes_per_client: PositiveInt = 2
    min_size: PositiveInt = 1


class QuantityPartition(Section):
    kind: Literal["quantity"]
    num_clients: PositiveInt
    distribution: Literal["lognormal", "powerlaw"] = "lognormal"
    sigma: PositiveFloat = 1.0
    exponent: Annotated[float, Field(gt=1)] = 1.5
    min_size: PositiveInt = 1


class NaturalPartition(Section):
    kind: Literal["natural"]
    num_clients: PositiveInt | None = None
    min_size: PositiveInt = 1


Partition = Annotated[
    Union[IidPartition, DirichletPartition, ShardsPartition, QuantityPartition, NaturalPartition],
    Field(discriminator="kind"),
]


class DataConfig(Section):
    dataset: str
    root: str | None = None
    cache_dir: str | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    partition: Partition


# -------------------------------------------------------------------------- model
class ModelConfig(Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------- federation
class LocalConfig(Section):
    epochs: PositiveInt | None = None
    steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: NonNegFloat = 0.0

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> "LocalConfig":
        _either_or(self, "epochs", "steps")
        if self.epochs is None and self.steps is None:
            self.__dict__["epochs"] = 1
        return self


class FederationConfig(Section):
    rounds: PositiveInt
    clients_per_round: PositiveInt | None = None
    fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    eval_every: PositiveInt = 1
    eval_batch_size: PositiveInt = 512
    client_eval_every: Annotated[int, Field(ge=0)] = 0
    round_timeout_s: PositiveFloat = 3600.0
    #: The fewest accepted replies a training round aggregates: a count, or a fraction (0, 1] of
    #: the round's cohort (rounded up). A round that sends to fewer clients needs all of them.
    min_replies: Union[int, float] = 1
    #: How often a round re-sends to the clients whose reply was lost (their worker or node died,
    #: or no reply came), within the round's time (``round_timeout_s`` in all).
    retries: Annotated[int, Field(ge=0, le=100)] = 1
    #: With fewer than ``min_replies`` accepted replies after the retries: ``skip`` the round (model
    #: and server state unchanged; privacy spent by the replies that came is still accounted) or
    #: ``stop`` the run with an error (resume it from the last checkpoint).
    on_too_few_replies: Literal["skip", "stop"] = "skip"
    local: LocalConfig = Field(default_factory=LocalConfig)

    @model_validator(mode="after")
    def _cohort(self) -> "FederationConfig":
        return _either_or(self, "clients_per_round", "fraction")

    @field_validator("min_replies", mode="before")
    @classmethod
    def _count_or_fraction(cls, v: Any) -> Any:
        count = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10 ** 9
        if not (count or (isinstance(v, float) and 0 < v <= 1)):
            raise ValueError("must be a count of replies (an integer >= 1) or a fraction of the round's "
                             "cohort in (0, 1]")
        return v

    def replies_needed(self, cohort: int) -> int:
        """How many accepted replies a round that sent to ``cohort`` clients needs (``min_replies``).

        Example:
            >>> f = FederationConfig(rounds=1, min_replies=0.75)
            >>> f.replies_needed(10), FederationConfig(rounds=1, min_replies=8).replies_needed(5)
            (8, 5)
        """
        if isinstance(self.min_replies, float):
            return ceil_fraction(self.min_replies, cohort)
        return min(self.min_replies, cohort)


# ----------------------------------------------------------------------- strategy
RobustRule = Literal["trimmed_mean", "median", "krum"]
_ROBUST_KEYS = ("robust", "robust_trim", "robust_byzantine", "max_update_norm")


class StrategyRobustness(Section):
    """Keys every strategy accepts (``fedsim.algorithms.robust``): Byzantine-robust aggregation
    and a norm guard, both replacing the weighted mean of the client updates.

    ``robust``: ``trimmed_mean`` (per coordinate, drop the ``robust_trim`` fraction on each side,
    default 0.1; trim at least f/n to stop f attackers), ``median`` (coordinate-wise), or ``krum``
    (multi-Krum: keep the n - f updates closest to their neighbours, ``robust_byzantine: f``
    attackers assumed, needs n > 2f + 2 clients per round). The robust rules weight every update
    equally. ``max_update_norm``: replies whose update L2 norm exceeds it are left out of the
    aggregate (rejected, not clipped; counted as ``update_norm_rejected``). Neither combines with
    client-level DP, which replaces the aggregate itself.

    The keys are left out of the resolved config while at their defaults, so a scenario that does
    not use them keeps its fingerprint (``config_sha256``)."""

    robust: RobustRule | None = None
    robust_trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    robust_byzantine: Annotated[int, Field(ge=1)] | None = Field(default=None, validate_default=True)
    max_update_norm: PositiveFloat | None = None

    @field_validator("robust_trim")
    @classmethod
    def _trim_needs_trimmed_mean(cls, value: float, info: ValidationInfo) -> float:
        if "robust" in info.data and info.data["robust"] != "trimmed_mean":     # only when given
            raise ValueError(f"applies to robust: trimmed_mean only (robust is {info.data['robust']!r})")
        return value

    @field_validator("robust_byzantine")
    @classmethod
    def _byzantine_with_krum(cls, value: int | None, info: ValidationInfo) -> int | None:
        if "robust" not in info.data:
            return value
        if info.data["robust"] == "krum" and value is None:
            raise ValueError("robust: krum needs robust_byzantine: f, the number of attackers assumed per round")
        if info.data["robust"] != "krum" and value is not None:
            raise ValueError(f"applies to robust: krum only (robust is {info.data['robust']!r})")
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        fields = type(self).model_fields
        robust = {k: data.pop(k) for k in _ROBUST_KEYS if k in data}
        data.update({k: v for k, v in robust.items() if v != fields[k].default})     # after the strategy's keys
        return data


class FedAvg(StrategyRobustness):
    name: Literal["fedavg"]
    server_lr: PositiveFloat = 1.0


class FedAvgM(StrategyRobustness):
    name: Literal["fedavgm"]
    server_lr: PositiveFloat = 1.0
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9


class FedAdam(StrategyRobustness):
    name: Literal["fedadam"]
    server_lr: PositiveFloat = 0.01
    beta_1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta_2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    tau: PositiveFloat = 1e-3


class FedProx(StrategyRobustness):
    name: Literal["fedprox"]
    server_lr: PositiveFloat = 1.0
    proximal_mu: NonNegFloat = 0.01


class Scaffold(StrategyRobustness):
    """SCAFFOLD (Karimireddy et al., arXiv:1910.06378, option II): control variates correct the
    clients' drift; each client keeps its ``c_i`` across the rounds it takes part in. Local
    training must be SGD (``federation.local.optimizer: sgd``). A robust rule covers the model
    update only; the control variate ``c`` still averages every accepted reply's ``delta_c``."""

    name: Literal["scaffold"]
    server_lr: PositiveFloat = 1.0


Strategy = Annotated[Union[FedAvg, FedAvgM, FedAdam, FedProx, Scaffold], Field(discriminator="name")]


# -------------------------------------------------------------------- lr schedule
Bounds = tuple[float, float]


class LrSchedule(Section):
    """Server (global) and client (local) learning-rate schedules.

    ``kind``: ``constant`` (the strategy's server LR, the scenario's local LR), ``decay``
    (Decay-G or Decay-SL: ``decay_target``, ``decay_rate``), ``fedexp`` (FedExp server LR), or
    ``fedhyper`` (hypergradient schedulers, arXiv:2310.03156; ``variant`` g | gm | sl | cl |
    g+cl | gm+cl). ``preset: reference`` switches the defaults to the reference code's
    (uniform weighting, unclipped SL accumulator); keys given explicitly still win. The preset
    does not touch ``federation.local``: the reference code trained clients with Adam at lr 0.01
    (``federation.local: {optimizer: adam, lr: 0.01}``) — set that yourself to match it.
    """

    kind: Literal["constant", "decay", "fedexp", "fedhyper"] = "fedhyper"
    preset: Literal["canonical", "reference"] = "canonical"
    variant: Literal["g", "gm", "sl", "cl", "g+cl", "gm+cl"] = "g+cl"
    alpha0: PositiveFloat = 1.0
    beta_g: NonNegFloat = 1.0
    alpha_bounds: Bounds = (0.2, 5.0)
    gm_bounds: Bounds = (-0.2, 4.0)
    gm_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta_sl: NonNegFloat = 1.0
    sl_bounds: Bounds = (0.1, 10.0)
    sl_state_clip: bool = True
    beta_l: NonNegFloat = 1.0
    beta_lg: Union[Literal["auto"], NonNegFloat] = "auto"
    cl_factor_cap: PositiveFloat = 1.1
    cl_bounds: Bounds = (0.1, 10.0)
    weighting: Literal["num_examples", "uniform"] = "num_examples"
    decay_target: Literal["g", "sl"] = "g"
    decay_rate: Annotated[float, Field(gt=0, le=1)] = 0.995
    fedexp_eps: PositiveFloat = 1e-3

    @model_validator(mode="after")
    def _check(self) -> "LrSchedule":
        for name in ("alpha_bounds", "gm_bounds", "sl_bounds", "cl_bounds"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name}: the lower bound {lo} must be below the upper bound {hi}")
        if self.cl_bounds[0] < 0 or self.sl_bounds[0] <= 0 or self.alpha_bounds[0] <= 0:
            raise ValueError("alpha_bounds, sl_bounds must be positive and cl_bounds non-negative")
        if self.preset == "reference":
            for key, value in (("weighting", "uniform"), ("sl_state_clip", False)):
                if key not in self.model_fields_set:
                    self.__dict__[key] = value
        return self

    @property
    def uses_cl(self) -> bool:
        """Whether clients run the CL rule (and need the previous global update)."""
        return self.kind == "fedhyper" and self.variant.endswith("cl")


# ------------------------------------------------------------------------ privacy
class Privacy(Section):
    """Differential privacy (specs/dicesgd.md). ``unit: example``: record-level DP-SGD or DiceSGD on
    every client, with a cumulative per-client ledger; ``unit: client``: client-level DP (each
    update clipped, Gaussian noise on the sum, a fixed public denominator).

    Give ``epsilon`` (a target: σ is calibrated over the most rounds a client could take part in,
    and clients stop at the target) and/or ``noise_multiplier`` (σ explicit; with both, ε is a
    cap). Neither: σ = 1.0. ``delta`` must be below 1/|D_k| for every client (checked once the
    data is loaded)."""

    unit: Literal["example", "client"] = "example"
    mechanism: Literal["dpsgd", "dicesgd"] = "dpsgd"
    epsilon: PositiveFloat | None = None
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    noise_multiplier: NonNegFloat | None = None
    clip: PositiveFloat = 1.0
    error_clip_ratio: NonNegFloat = 1.0
    noise_inflation: Union[Literal["sqrt(1+2r)"], PositiveFloat] = "sqrt(1+2r)"
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ghost"] = "auto"
    sampling: Literal["poisson"] = "poisson"
    persist_error: bool = False
    lr_divide_by_c1: bool | None = None        # None: true for dicesgd (the reference scripts), false for dpsgd
    physical_batch_size: PositiveInt | None = None
    calibration: Literal["max_participation"] = "max_participation"

    @model_validator(mode="after")
    def _check(self) -> "Privacy":
        if self.grad_sample_mode == "ghost" and self.mechanism == "dicesgd":
            raise ValueError("grad_sample_mode: ghost materialises no per-sample gradients, which DiceSGD's error "
                             "feedback needs; use auto or hooks")
        if self.unit == "client" and self.mechanism == "dicesgd":
            raise ValueError("mechanism: dicesgd is a record-level mechanism (its error feedback runs over "
                             "per-sample gradients); unit: client takes mechanism: dpsgd")
        if self.persist_error and self.mechanism != "dicesgd":
            raise ValueError("persist_error: only DiceSGD has an error state to persist")
        return self


# ------------------------------------------------------------------------ pruning
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Pruning(Section):
    """Federated pruning (specs/autoflip.md). ``kind: autoflip``: a one-off exploration stage
    before round 1 (explorer clients train a private copy and send their squared parameter
    deviations), then a hybrid mask from the merged, per-tensor normalised deviations —
    ``structured_sparsity`` of each layer's units, then exactly ``sparsity`` of the remaining
    maskable entries — and masked training with sparse communication. ``kind: random``: the
    baseline, a seeded uniform random mask at the same exact ``sparsity``, no exploration."""

    kind: Literal["autoflip", "random"] = "autoflip"
    sparsity: Fraction = 0.30
    structured_sparsity: Fraction | None = None          # None: 0.2 for autoflip (every built-in model has a unit map), 0 for random
    explorer_fraction: Annotated[float, Field(gt=0, le=1)] | None = None   # None: 1.0 (every client explores)
    explorers: PositiveInt | None = None                  # a number of explorers instead of explorer_fraction
    explore_epochs: PositiveInt = 150
    patience: PositiveInt = 40
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    explore_optimizer: Literal["sgd", "adam"] = "adam"
    explore_lr: PositiveFloat = 3e-4
    explore_batch_size: PositiveInt = 350
    explore_weighting: Literal["uniform", "num_examples"] = "uniform"
    normalization: Literal["minmax", "robust"] = "minmax"
    maskable: Literal["weights", "all"] = "weights"
    exclude: list[str] = Field(default_factory=list)
    selection: Literal["exact_rank", "quantile_gt"] = "exact_rank"
    start_from: Literal["initial", "explored"] = "initial"     # explored (compat): θ¹ = Σ w_k θ_k of the explorers
    mask_update: Literal["static", "every_k_rounds"] = "static"
    mask_update_every: PositiveInt | None = None           # k of every_k_rounds: rounds k, 2k, ... rebuild the mask

    @model_validator(mode="after")
    def _check(self) -> "Pruning":
        if self.kind == "random" and self.structured_sparsity:
            raise ValueError("structured_sparsity: the random-mask baseline is unstructured; leave it unset")
        if self.explorers is not None and self.explorer_fraction is not None:
            raise ValueError(either_or_message("explorers", "explorer_fraction"))
        if self.start_from == "explored" and self.kind != "autoflip":
            raise ValueError("start_from: explored starts from the explorers' models; the random baseline "
                             "does not explore")
        if self.mask_update == "every_k_rounds":
            if self.kind != "autoflip":
                raise ValueError("mask_update: every_k_rounds rebuilds AutoFLIP's mask from the clients' updates; "
                                 "the random baseline's mask is static")
            if self.mask_update_every is None:
                raise ValueError("mask_update: every_k_rounds needs mask_update_every: k (the mask is rebuilt "
                                 "in rounds k, 2k, ...)")
        elif self.mask_update_every is not None:
            raise ValueError("mask_update_every: applies to mask_update: every_k_rounds only")
        return self


# ------------------------------------------------------------------ engine/output
class EngineConfig(Section):
    """Where the server and the clients run. Keys of other kinds are accepted and ignored, so
    ``--set engine.kind=...`` switches engines without editing the file."""

    kind: Literal["inprocess", "workers", "flower", "ray"] = "workers"
    devices: Union[str, list[str]] = "auto"
    workers: PositiveInt | None = None
    workers_per_device: PositiveInt = 1
    start_timeout_s: PositiveFloat = 120.0
    supernodes: PositiveInt = 2
    superlink: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]+$")] | None = None
    root_certificates: str | None = None
    run_timeout_s: PositiveFloat = 7200.0
    client_cpus: PositiveInt = 1
    client_gpus: NonNegFloat = 0.0

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, str) and value in ("auto", "cpu"):
            return value
        if isinstance(value, str) and re.fullmatch(r"cuda(:[0-9]+)?", value):
            return [value]
        bad = [d for d in ([value] if isinstance(value, str) else value) if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", d)]
        if bad or isinstance(value, str) or not value:
            raise ValueError(f"use auto, cpu, or a list like [cuda:0, cuda:1] (not {bad or value!r})")
        return value


class OutputConfig(Section):
    """Where results go. ``checkpoint_every``: a round checkpoint every N rounds (0: none);
    ``keep_checkpoints``: how many of the newest to keep (0: all). Each one holds the server state
    and a copy of the client state (for stateful clients, about one model per client)."""

    dir: str | None = None
    checkpoint_every: Annotated[int, Field(ge=0)] = 0
    keep_checkpoints: Annotated[int, Field(ge=0)] = 0


# ----------------------------------------------------------------------- scenario
class Scenario(Section):
    """A whole federation: what to train, on which data, split how, for how long."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    #: at most 2**32 - 1: scikit-learn's splits (and numpy's legacy seeding) take no larger seed
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0
    data: DataConfig
    model: ModelConfig
    federation: FederationConfig
    strategy: Strategy = Field(default_factory=lambda: FedAvg(name="fedavg"))
    engine: EngineConfig = Field(default_factory=EngineConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    lr_schedule: LrSchedule | None = None
    privacy: Privacy | None = None
    lora: None = None
    pruning: Pruning | None = None


#: Discriminated unions by location, used to map pydantic's error paths back to YAML paths.
UNION_TAGS: dict[tuple[str, ...], str] = {("data", "partition"): "kind", ("strategy",): "name"}


def check_schedule_strategy(kind: str, strategy_name: str, server_lr: Any = 1.0) -> str | None:
    """A schedule replaces the server optimizer: only with fedavg/fedprox, whose server_lr it owns."""
    if kind == "constant":
        return None
    if strategy_name not in ("fedavg", "fedprox"):
        return (f"lr_schedule.kind: '{kind}' replaces the server optimizer and cannot be combined "
                f"with strategy '{strategy_name}' (use fedavg or fedprox)")
    if server_lr not in (None, 1, 1.0):
        return (f"strategy.server_lr: {server_lr} would be ignored under lr_schedule.kind '{kind}'; "
                "set the initial global learning rate with lr_schedule.alpha0")
    return None
