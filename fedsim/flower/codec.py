"""Encoding between fedsim's arrays, scalars and state and Flower records; message sizes on the wire.

The message layout (both directions): the record ``arrays`` holds the model; ``config``
(downlink) or ``metrics`` (reply) the scalars; a plugin's array group ``g`` travels as the
record ``<plugin>.<g>`` and its scalars as ``<plugin>.<key>``. A client's plugin state lives in
``context.state`` as ``client-<id>/<plugin>`` (arrays) and ``client-<id>/<plugin>/tree`` (the JSON
skeleton of :mod:`fedsim.core.state`), keyed by client because one Flower node may serve many
virtual clients.

Only Flower's own protobuf serialization is used (never pickle): ``compat.message_nbytes`` is the
size of the serialized protobuf, i.e. what a Flower runtime actually sends.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.core.server import Payload
from fedsim.core.state import flatten, unflatten
from fedsim.flower.compat import message_from_bytes, message_to_bytes
from fedsim.scenario import Scenario, validate_dict

#: The records of a message that are not plugin groups.
MODEL_RECORD, CONFIG_RECORD, METRICS_RECORD = "arrays", "config", "metrics"

SCENARIO_KEY = "fedsim.scenario"
OUT_DIR_KEY = "fedsim.out-dir"
PROGRESS_KEY = "fedsim.progress"
#: The server waits (bounded) until this many client nodes are connected before round 1.
MIN_NODES_KEY = "fedsim.min-nodes"
NODE_WAIT_KEY = "fedsim.node-wait-s"
#: "true": continue the run in the out dir from its latest checkpoint.
RESUME_KEY = "fedsim.resume"
#: "true": resume even when the scenario, partition or fedsim version differ from the checkpoint's.
FORCE_KEY = "fedsim.force-resume"
#: "true": print the result files into the ServerApp log (a remote SuperLink's disk is not ours).
SHIP_KEY = "fedsim.ship-results"


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (order preserved)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays (order preserved)."""
    return {k: v.numpy() for k, v in record.items()}


def plugin_payload(content: RecordDict, scalars: Mapping[str, Any], plugin: str) -> Payload:
    """A plugin's part of a message: its records ``<plugin>.<group>`` and scalars ``<plugin>.<key>``."""
    prefix = f"{plugin}."
    arrays = {k[len(prefix):]: from_record(v) for k, v in content.items()
              if k.startswith(prefix) and isinstance(v, ArrayRecord)}
    return Payload(arrays, {k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)})


def _state_keys(cid: int, plugin: str) -> tuple[str, str]:
    return f"client-{cid}/{plugin}", f"client-{cid}/{plugin}/tree"


def state_owner(key: str) -> tuple[int, str] | None:
    """``(client id, plugin)`` of a ``context.state`` record written by :func:`save_client_state`
    (None for other records)."""
    parts = key.split("/")
    if not (key.startswith("client-") and len(parts) in (2, 3)):
        return None
    cid = parts[0].removeprefix("client-")
    return (int(cid), parts[1]) if cid.isdigit() else None


def load_client_state(state: RecordDict, cid: int, plugin: str) -> Any:
    """A plugin's saved state for client ``cid`` (None when it has none)."""
    arrays_key, tree_key = _state_keys(cid, plugin)
    if tree_key not in state:
        return None
    arrays = from_record(state[arrays_key]) if arrays_key in state else {}
    return unflatten(arrays, str(state[tree_key]["json"]))


def save_client_state(state: RecordDict, cid: int, plugin: str, value: Any) -> None:
    """Keep (or, with None, drop) a plugin's state for client ``cid`` in ``context.state``."""
    arrays_key, tree_key = _state_keys(cid, plugin)
    for key in (arrays_key, tree_key):
        if key in state:
            del state[key]
    if value is None:
        return
    arrays, tree = flatten(value)
    state[arrays_key] = to_record(arrays)
    state[tree_key] = ConfigRecord({"json": tree})


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    """A ConfigRecord from plain scalars (None values are dropped)."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """A MetricRecord from plain numbers (numpy scalars converted)."""
    return MetricRecord({k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in values.items()})


def roundtrip(message: Message) -> tuple[Message, int]:
    """Serialize and parse a message, as a real runtime would; returns the copy and its size."""
    data = message_to_bytes(message)
    return message_from_bytes(data), len(data)


def make_run_config(scenario: Scenario, out_dir, progress: str = "auto", resume: bool = False,
                    force: bool = False, **extra: Any) -> dict[str, Any]:
    """The Flower run config of a fedsim run (every engine passes the scenario this way)."""
    return {SCENARIO_KEY: scenario_to_config(scenario), OUT_DIR_KEY: str(out_dir), PROGRESS_KEY: progress,
            RESUME_KEY: "true" if resume else "false", FORCE_KEY: "true" if force else "false", **extra}


def scenario_to_config(scenario: Scenario) -> str:
    """The resolved scenario as the JSON string carried in the run config."""
    return json.dumps(scenario.model_dump(mode="json"), sort_keys=True)


_SCENARIOS: dict[str, Scenario] = {}


def scenario_from_config(run_config: Mapping[str, Any]) -> Scenario:
    """The scenario carried in a Flower run config (validated once per process)."""
    text = run_config.get(SCENARIO_KEY)
    if not isinstance(text, str):
        raise ValueError(f"run config has no '{SCENARIO_KEY}': this app must be started by fedsim")
    if text not in _SCENARIOS:
        _SCENARIOS.clear()
        _SCENARIOS[text] = validate_dict(json.loads(text), source="run config")
    return _SCENARIOS[text]
