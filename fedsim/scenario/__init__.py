"""Scenario files: the schema (pydantic) and the YAML loader with all-at-once error reports."""

from fedsim.scenario.load import (
    ScenarioError,
    config_diff,
    config_sha256,
    load_scenario,
    parse_scenario,
    resolved,
    result_config,
    to_yaml,
    validate_dict,
)
from fedsim.scenario.schema import Scenario

__all__ = ["Scenario", "ScenarioError", "config_diff", "config_sha256", "load_scenario", "parse_scenario", "resolved",
           "result_config", "to_yaml", "validate_dict"]
