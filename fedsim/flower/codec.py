"""Encoding between fedsim's numpy arrays / scalars and Flower records; message sizes on the wire.

Only Flower's own protobuf serialization is used (never pickle): ``message_nbytes`` is the
size of the serialized protobuf, i.e. what a Flower runtime actually sends.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedsim.flower.compat import message_from_bytes, message_nbytes, message_to_bytes
from fedsim.scenario import Scenario, validate_dict

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
