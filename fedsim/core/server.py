"""The server contract: what a server-side algorithm provides, and the round protocol that runs it.

A federation's server is a :class:`Server`: a server optimizer (a
:class:`~fedsim.core.transforms.Transform`, e.g. FedAvg's ``scale(1.0)`` or FedHyper's G)
plus a list of :class:`ServerPlugin` s. A plugin overrides only the hooks its algorithm needs:

- ``init(params)``: its initial state, from the named global arrays;
- ``phase(state, round)``: claim a round for a stage of its own (AutoFLIP's exploration, which
  claims round 0 so it runs before round 1 and shifts no training round). In a claimed round
  the optimizer does not step, the owner may choose who takes part (``sample``) and its
  ``aggregate`` decides the model. Other plugins take part only if ``takes_part(phase)`` says
  so (a privacy ledger does);
- ``downlink(state, round)``: what goes down to every sampled client besides the model — extra
  arrays (CL's previous update, SCAFFOLD's ``c``) and scalars (a mask id);
  ``downlink_client(state, round, cid)``: what only one client gets (a mask it has not seen);
- ``downlink_model(state, phase, model_specs)``: how the model travels down (dense, or only the
  kept entries of a mask the client holds: sparse communication);
- ``uplink(state, round, phase, model_specs)``: what a valid reply must contain — which model arrays
  come back and how (dense, or only the kept entries of a mask: :class:`ArraySpec`), and the
  plugin's own arrays (SCAFFOLD's ``delta_c``);
- ``mask(state)``: entries of the global arrays that must stay exactly 0 (pruned weights): the
  server zeroes them in the aggregate update and in the step, and stateful transforms zero
  their state there (``RoundInfo.mask``);
- ``aggregate(state, result)``: after the model step, update its state from the accepted
  replies, optionally replace the new global arrays (FedSVD's re-factorisation) and say whether
  the parameter basis changed (every client then sees a new ``basis-id``);
- ``combine(state, round, params, replies, weights)``: replace the weighted mean of the client
  updates by another aggregate (client-level DP: clipped sum plus noise over a fixed denominator);
- ``metrics(state)``: numbers for ``metrics.jsonl``; ``files(state)``: JSON documents for the run
  directory (``privacy.json``), rewritten after every round; ``summary(state, rows)``: keys for
  ``summary.json`` (AutoFLIP's FLOPs and bytes ratios).

Everything here is pure numpy: no Flower, no YAML. The Flower strategy
(:mod:`fedsim.flower.strategy`) moves a :class:`RoundPlan` into messages and replies back into
:class:`ClientUpdate` s; any other federated loop can do the same.

Example:
    >>> import numpy as np
    >>> from fedsim.core.transforms import scale
    >>> server = Server(scale(1.0), client_lr=0.1)
    >>> x = {"w": np.zeros(2, np.float32)}
    >>> state = server.init(x)
    >>> plan = server.plan(state, 1, x)
    >>> plan.scalars["lr"], sorted(plan.model_spec)
    (0.1, ['w'])
    >>> replies = [ClientUpdate(0, 1.0, {"w": np.ones(2, np.float32)}), ClientUpdate(1, 3.0, {"w": np.full(2, 3, np.float32)})]
    >>> x, state, metrics = server.aggregate(state, plan, x, replies)
    >>> x["w"].tolist(), metrics["lr_global"]
    ([2.5, 2.5], 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from fedsim.core.arrays import Named, apply_updates, mean_update
from fedsim.core.transforms import RoundInfo, Transform, zero_masked

#: The phase of an ordinary training round (a plugin may claim others).
TRAIN = "train"
Scalar = bool | int | float | str


@dataclass(frozen=True)
class ArraySpec:
    """One array a reply must carry: its dense shape and dtype, dense or sparse on the wire.

    With ``kept`` (a bool mask of ``shape``), only the kept entries travel, as a 1-D array in
    C order (the mask is shared state, so no indices are sent); :meth:`decode` scatters them back
    and fills the other entries from ``fill`` (default 0).

    Example:
        >>> spec = ArraySpec((2, 2), np.dtype("float32"), kept=np.array([[True, False], [False, True]]))
        >>> wire = spec.encode(np.array([[1, 2], [3, 4]], np.float32)); wire.tolist(), spec.wire_shape
        ([1.0, 4.0], (2,))
        >>> spec.decode(wire).tolist()
        [[1.0, 0.0], [0.0, 4.0]]
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    kept: np.ndarray | None = None
    fill: np.ndarray | None = None

    @property
    def wire_shape(self) -> tuple[int, ...]:
        """The shape of the array in the message."""
        return self.shape if self.kept is None else (int(np.count_nonzero(self.kept)),)

    def encode(self, dense: np.ndarray) -> np.ndarray:
        """The wire form of a dense array."""
        return dense if self.kept is None else np.ascontiguousarray(dense[self.kept])

    def decode(self, wire: np.ndarray) -> np.ndarray:
        """The dense array a wire array stands for."""
        if self.kept is None:
            return wire
        out = np.zeros(self.shape, self.dtype) if self.fill is None else np.array(self.fill, self.dtype, copy=True)
        out[self.kept] = wire
        return out

    @staticmethod
    def of(array: np.ndarray) -> "ArraySpec":
        """The dense spec of an array."""
        return ArraySpec(tuple(array.shape), array.dtype)


@dataclass
class Payload:
    """Arrays (in named groups) and scalars that travel with a message, besides the model."""

    arrays: dict[str, Named] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted reply, decoded: who sent it, its aggregation weight, and its arrays.

    Attributes:
        cid: the virtual client id.
        weight: the aggregation weight (examples, clamped to the partition size the server knows).
        model: the client's new model arrays (dense), for the names the round's plan asked for.
        groups: per plugin name, that plugin's arrays of the reply (``{"delta_c": {...}}``).
        metrics: the reply's finite numeric metrics.
    """

    cid: int
    weight: float
    model: Named
    groups: Mapping[str, Mapping[str, Named]] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    """What a plugin's ``aggregate`` sees after the round's model step."""

    server_round: int
    phase: str
    params_before: Named
    params: Named                       # after the optimizer step and any earlier plugin
    delta: Named | None                 # the raw weighted mean update (None in a claimed phase)
    replies: Sequence[ClientUpdate]
    num_clients: int                    # the whole population N
    #: replies a plugin's ``screen`` refused: no part of the aggregate, but they did reach the server
    #: (a privacy ledger accounts what they spent)
    refused: Sequence[ClientUpdate] = ()


@dataclass
class PluginUpdate:
    """A plugin's answer to a round: new state, optionally new global arrays, a basis change."""

    state: Any
    params: Named | None = None
    basis_changed: bool = False


class ServerPlugin:
    """The server side of an algorithm. Every hook has a neutral default; override what you need.

    ``name`` namespaces the plugin's state, its message arrays and scalars (``<name>.<key>``);
    it must be unique within a server and equal to the name of its client side, if any.
    """

    name: str = ""

    def init(self, params: Named) -> Any:
        """The initial state, from the named global arrays (checkpointed with the run)."""
        return None

    def phase(self, state: Any, server_round: int) -> str | None:
        """Claim ``server_round`` for a phase of this plugin (None: an ordinary training round).
        Claiming round 0 adds a round before round 1."""
        return None

    def takes_part(self, phase: str) -> bool:
        """Whether this plugin runs in rounds of ``phase`` that it does not own (default: training only)."""
        return phase == TRAIN

    def sample(self, state: Any, server_round: int) -> list[int] | None:
        """In a round this plugin claimed: the clients that take part (None: the usual sampling)."""
        return None

    def downlink(self, state: Any, server_round: int) -> Payload:
        """Arrays and scalars for every client sampled in ``server_round``."""
        return Payload()

    def downlink_client(self, state: Any, server_round: int, cid: int) -> Payload:
        """Arrays and scalars for client ``cid`` alone (on top of :meth:`downlink`)."""
        return Payload()

    def mask(self, state: Any) -> Named | None:
        """Per array name, a bool array: False entries stay exactly 0 (None: no mask)."""
        return None

    def downlink_model(self, state: Any, phase: str, model_specs: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        """How the global model travels down (given: what earlier plugins chose): dense, or only
        the kept entries of a mask the client already holds (its client side decodes them)."""
        return model_specs

    def uplink(self, state: Any, server_round: int, phase: str,
               model_specs: dict[str, ArraySpec]) -> tuple[dict[str, ArraySpec], dict[str, dict[str, ArraySpec]]]:
        """What a reply must contain: the model arrays (given: what earlier plugins expect) and
        this plugin's own array groups."""
        return model_specs, {}

    def screen(self, state: Any, server_round: int, params: Named,
               replies: Sequence["ClientUpdate"]) -> tuple[Any, dict[int, tuple[str, str]]]:
        """Replies to refuse before anything aggregates them: ``(new state, {index in replies: (kind,
        reason)})``. A refused reply is one of the round's rejections (counted under ``kind`` in
        ``rejected_by_reason``): the optimizer and ``min_replies`` never see it, and plugins see it only
        as ``RoundResult.refused`` (a privacy ledger accounts it). Default: none."""
        return state, {}

    def aggregate(self, state: Any, result: RoundResult) -> PluginUpdate:
        """Fold the round's accepted replies into the state (and optionally the global arrays)."""
        return PluginUpdate(state)

    def skipped(self, state: Any, result: RoundResult) -> Any:
        """The new state after a round that is not aggregated (fewer accepted replies than
        ``federation.min_replies``): ``result.replies`` came but change nothing. Default: the state
        as it was; a privacy plugin still accounts what those replies spent."""
        return state

    def combine(self, state: Any, server_round: int, params: Named, replies: Sequence["ClientUpdate"],
                weights: Sequence[float]) -> Named | None:
        """The round's aggregate update ``delta`` instead of the weighted mean (None: the mean)."""
        return None

    def metrics(self, state: Any) -> dict[str, float]:
        """Numbers for the round's row in ``metrics.jsonl``."""
        return {}

    def files(self, state: Any) -> dict[str, Any]:
        """JSON documents (``file name -> data``) to keep in the run directory, rewritten every round."""
        return {}

    def summary(self, state: Any, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Keys for ``summary.json`` at the end of the run (``rows``: the rounds' ``metrics.jsonl`` rows)."""
        return {}


@dataclass
class RoundPlan:
    """One round as the server plans it: what every sampled client gets and must send back."""

    server_round: int
    phase: str
    scalars: dict[str, Scalar]
    arrays: dict[str, Named]                       # message record name -> arrays (besides the model)
    model_spec: dict[str, ArraySpec]
    group_specs: dict[str, dict[str, ArraySpec]]   # message record name -> array name -> spec
    plugin_of: dict[str, tuple[str, str]]          # message record name -> (plugin, group)
    cohort: list[int] | None = None                # the phase owner's choice of clients (None: sample)
    plugins: list[str] = field(default_factory=list)   # the plugins taking part in this round
    down_spec: dict[str, ArraySpec] = field(default_factory=dict)   # how the model travels down (dense if absent)

    def encode_model(self, params: Named) -> Named:
        """The model as it travels down this round (:attr:`down_spec`: kept entries only where sparse)."""
        return {k: self.down_spec[k].encode(v) if k in self.down_spec else v for k, v in params.items()}


def _merge(scalars: dict, arrays: dict, plugin: str, payload: Payload) -> None:
    scalars.update({f"{plugin}.{k}": v for k, v in payload.scalars.items()})
    arrays.update({record_name(plugin, g): a for g, a in payload.arrays.items()})


def _check_like(params: Named, new: Named, plugin: str) -> None:
    """A plugin's new global arrays must keep the names, shapes and dtypes (the next plan takes them)."""
    if list(new) != list(params):
        raise ValueError(f"plugin '{plugin}' returned arrays {list(new)[:4]}..., not the model's {list(params)[:4]}...")
    for k, v in new.items():
        if v.shape != params[k].shape or v.dtype != params[k].dtype:
            raise ValueError(f"plugin '{plugin}' returned '{k}' as {v.dtype}{list(v.shape)}, "
                             f"not {params[k].dtype}{list(params[k].shape)}")


def record_name(plugin: str, group: str) -> str:
    """The message record that carries a plugin's array group."""
    return f"{plugin}.{group}"


class Server:
    """The server side of a federation: a server optimizer plus plugins, as pure functions of state.

    Args:
        optimizer: the transform from the raw aggregate update to the step.
        plugins: the algorithms' server parts, called in this order.
        client_lr: the clients' base learning rate; the optimizer's ``lr_scale`` multiplies it.
        uniform_weights: weight every reply 1 (else by its example count).
        num_clients: the population size N (SCAFFOLD needs it; 0 means unknown).
    """

    def __init__(self, optimizer: Transform, plugins: Sequence[ServerPlugin] = (), *, client_lr: float = 0.0,
                 uniform_weights: bool = False, num_clients: int = 0):
        names = [p.name for p in plugins]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"server plugins need unique, non-empty names (got {names})")
        self.optimizer, self.plugins = optimizer, list(plugins)
        self.client_lr, self.uniform_weights, self.num_clients = float(client_lr), uniform_weights, num_clients

    def init(self, params: Named) -> dict:
        """The server state before the first round."""
        return {"basis_id": 0, "optimizer": self.optimizer.init(params),
                "plugins": {p.name: p.init(params) for p in self.plugins}}

    def first_round(self, state: dict) -> int:
        """0 when a plugin claims round 0 (a stage before round 1), else 1."""
        return 0 if any(p.phase(state["plugins"][p.name], 0) is not None for p in self.plugins) else 1

    def _claim(self, state: dict, server_round: int) -> tuple[str, ServerPlugin | None]:
        claims = [(p, ph) for p in self.plugins if (ph := p.phase(state["plugins"][p.name], server_round)) is not None]
        if len(claims) > 1:
            raise ValueError(f"round {server_round} is claimed by several plugins: "
                             f"{[(p.name, ph) for p, ph in claims]}")
        return (claims[0][1], claims[0][0]) if claims else (TRAIN, None)

    def _taking_part(self, phase: str, owner: ServerPlugin | None) -> list[ServerPlugin]:
        return [p for p in self.plugins if p is owner or p.takes_part(phase)]

    def plan(self, state: dict, server_round: int, params: Named) -> RoundPlan:
        """What ``server_round`` sends to every sampled client and expects back."""
        phase, owner = self._claim(state, server_round)
        down = self.optimizer.downlink(state["optimizer"])
        if set(down) - {"lr_scale"}:
            raise ValueError(f"the server optimizer's downlink has keys {sorted(down)}; the server knows only "
                             "'lr_scale' (a factor on the client LR): send other scalars from a plugin")
        lr = self.client_lr * down["lr_scale"] if "lr_scale" in down else self.client_lr
        plan = RoundPlan(server_round, phase, {"phase": phase, "lr": lr, "basis-id": state["basis_id"]}, {},
                         {k: ArraySpec.of(v) for k, v in params.items()} if phase == TRAIN else {}, {}, {})
        if owner is not None:
            plan.cohort = owner.sample(state["plugins"][owner.name], server_round)
        for p in self._taking_part(phase, owner):
            pstate = state["plugins"][p.name]
            _merge(plan.scalars, plan.arrays, p.name, p.downlink(pstate, server_round))
            plan.down_spec = p.downlink_model(pstate, phase, plan.down_spec)
            plan.model_spec, groups = p.uplink(pstate, server_round, phase, plan.model_spec)
            for g, spec in groups.items():
                plan.group_specs[record_name(p.name, g)] = spec
                plan.plugin_of[record_name(p.name, g)] = (p.name, g)
            plan.plugins.append(p.name)
        return plan

    def client_downlink(self, state: dict, plan: RoundPlan, cid: int) -> Payload:
        """What client ``cid`` alone gets this round (every taking-part plugin's ``downlink_client``)."""
        out = Payload()
        for p in self.plugins:
            if p.name in plan.plugins:
                _merge(out.scalars, out.arrays, p.name,
                       p.downlink_client(state["plugins"][p.name], plan.server_round, cid))
        return out

    def _mask(self, state: dict) -> Named | None:
        masks = [m for p in self.plugins if (m := p.mask(state["plugins"][p.name])) is not None]
        if not masks:
            return None
        out = {k: np.asarray(v, bool) for k, v in masks[0].items()}
        for m in masks[1:]:
            for k, v in m.items():
                out[k] = out[k] & v if k in out else np.asarray(v, bool)
        return out

    def aggregate(self, state: dict, plan: RoundPlan, params: Named, replies: Sequence[ClientUpdate],
                  refused: Sequence[ClientUpdate] = ()) -> tuple[Named, dict, dict[str, float]]:
        """New global arrays, new state and the round's server metrics from the accepted replies.

        ``replies`` must be in a canonical order (client id); with no replies nothing changes.
        ``refused``: the replies :meth:`screen` refused (plugins see them as ``RoundResult.refused``).
        """
        if not replies:
            return params, state, self.metrics(state)
        new_params, opt_state, delta = params, state["optimizer"], None
        if plan.phase == TRAIN and plan.model_spec:
            weights = [1.0] * len(replies) if self.uniform_weights else [r.weight for r in replies]
            models = [r.model for r in replies]
            mask = self._mask(state)
            delta = zero_masked(self._combine(state, plan, params, replies, weights), mask)
            step, opt_state = self.optimizer.update(delta, opt_state, params,
                                                    RoundInfo(plan.server_round, models, weights, mask))
            new_params = apply_updates(params, zero_masked(step, mask))
        basis_id, plugin_states = state["basis_id"], dict(state["plugins"])
        for p in self.plugins:
            if p.name not in plan.plugins:
                continue
            result = RoundResult(plan.server_round, plan.phase, params, new_params, delta, replies, self.num_clients,
                                 refused)
            upd = p.aggregate(plugin_states[p.name], result)
            plugin_states[p.name] = upd.state
            if upd.params is not None:
                _check_like(params, upd.params, p.name)
                new_params = upd.params
            basis_id += int(upd.basis_changed)
        new_state = {"basis_id": basis_id, "optimizer": opt_state, "plugins": plugin_states}
        return new_params, new_state, self.metrics(new_state)

    def screen(self, state: dict, plan: RoundPlan, params: Named, replies: Sequence[ClientUpdate]
               ) -> tuple[dict, list[ClientUpdate], list[tuple[ClientUpdate, str, str]]]:
        """Every taking-part plugin's :meth:`ServerPlugin.screen`, in order (each sees the replies the
        ones before it kept): ``(new state, kept replies, [(refused reply, reason, kind)])``."""
        plugin_states, kept, refused = dict(state["plugins"]), list(replies), []
        for p in self.plugins:
            if p.name not in plan.plugins:
                continue
            plugin_states[p.name], out = p.screen(plugin_states[p.name], plan.server_round, params, kept)
            refused += [(kept[i], reason, kind) for i, (kind, reason) in sorted(out.items())]
            kept = [r for i, r in enumerate(kept) if i not in out]
        return {**state, "plugins": plugin_states}, kept, refused

    def skip(self, state: dict, plan: RoundPlan, params: Named, replies: Sequence[ClientUpdate],
             refused: Sequence[ClientUpdate] = ()) -> tuple[dict, dict]:
        """The state and server metrics after a round that is not aggregated: the model, the optimizer
        and every plugin stay as they were, except what a plugin's :meth:`ServerPlugin.skipped` keeps
        of the ``replies`` that did come (privacy spent)."""
        plugin_states = dict(state["plugins"])
        result = RoundResult(plan.server_round, plan.phase, params, params, None, replies, self.num_clients, refused)
        for p in self.plugins:
            if p.name in plan.plugins:
                plugin_states[p.name] = p.skipped(plugin_states[p.name], result)
        new_state = {**state, "plugins": plugin_states}
        return new_state, self.metrics(new_state)

    def _combine(self, state: dict, plan: RoundPlan, params: Named, replies: Sequence[ClientUpdate],
                 weights: list[float]) -> Named:
        combined = [(p.name, d) for p in self.plugins if p.name in plan.plugins
                    and (d := p.combine(state["plugins"][p.name], plan.server_round, params, replies, weights)) is not None]
        if len(combined) > 1:
            raise ValueError(f"several plugins replace the aggregation: {[n for n, _ in combined]}")
        return combined[0][1] if combined else mean_update(params, [r.model for r in replies], weights)

    def files(self, state: dict) -> dict[str, Any]:
        """Every plugin's documents for the run directory."""
        out: dict[str, Any] = {}
        for p in self.plugins:
            out.update(p.files(state["plugins"][p.name]))
        return out

    def summary(self, state: dict, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Every plugin's keys for ``summary.json`` (a key claimed twice is an error)."""
        out: dict[str, Any] = {}
        for p in self.plugins:
            mine = p.summary(state["plugins"][p.name], rows)
            if set(mine) & set(out):
                raise ValueError(f"plugin '{p.name}' reports summary keys {sorted(set(mine) & set(out))} twice")
            out.update(mine)
        return out

    def metrics(self, state: dict) -> dict[str, float]:
        """The optimizer's and the plugins' read-outs of ``state``."""
        out = dict(self.optimizer.report(state["optimizer"]))
        for p in self.plugins:
            out.update(p.metrics(state["plugins"][p.name]))
        return out
