"""Every reply is untrusted: bad ones are rejected per client with a reason; the round goes on."""

from __future__ import annotations


import numpy as np
import pytest
from safetensors.numpy import load_file
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.flower.client import handle_train
from fedsim.flower.codec import OUT_DIR_KEY, PROGRESS_KEY, SCENARIO_KEY, from_record, scenario_to_config, to_record
from fedsim.flower.compat import set_server_identity
from fedsim.engine.inprocess import InProcessGrid
from fedsim.flower.runner import ServerLoop
from fedsim.results import read_metrics
from fedsim.scenario import parse_scenario


def _corrupt(msg: Message, reply: Message, how: str) -> Message:
    arrays = from_record(reply.content["arrays"])
    metrics = dict(reply.content["metrics"])
    first = next(iter(arrays))
    if how == "nan":
        arrays[first] = arrays[first].copy()
        arrays[first].flat[0] = np.nan
    elif how == "shape":
        arrays[first] = np.zeros((1,), arrays[first].dtype)      # broadcastable: Flower would broadcast it
    elif how == "dtype":
        arrays[first] = arrays[first].astype(np.float64)
    elif how == "missing":
        arrays.pop(first)
    elif how == "round":
        metrics["server-round"] = 99
    elif how == "weight":
        metrics["num-examples"] = -5
    elif how == "huge_weight":
        metrics["num-examples"] = 10 ** 12
    elif how == "loss_list":
        metrics["train_loss"] = [1.0, 2.0]
    elif how == "negative_time":
        metrics["compute_s"] = -1.0
    record = MetricRecord({k: v for k, v in metrics.items()})
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": record}),
                   reply_to=msg)


def misbehaving_app(bad: dict[int, str]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(msg.content["config"]["client-id"])
        if bad.get(cid) == "raise":
            raise RuntimeError("client exploded")
        reply = handle_train(msg, context)
        return _corrupt(msg, reply, bad[cid]) if cid in bad else reply
    return app


def run_with(app: ClientApp, text: str, out) -> tuple[ServerLoop, list[dict]]:
    scn = parse_scenario(text)
    set_server_identity(1)
    run_config = {SCENARIO_KEY: scenario_to_config(scn), OUT_DIR_KEY: str(out), PROGRESS_KEY: "none"}
    loop = ServerLoop(scn, out, "none")
    loop.run(InProcessGrid(app, loop.fed.num_clients, run_config))
    return loop, read_metrics(out)


ALL_CLIENTS = "clients_per_round: 3"


@pytest.mark.parametrize("how,reason", [("nan", "NaN"), ("shape", "expected float32"), ("dtype", "float64"),
                                        ("missing", "missing"), ("round", "not 1"), ("weight", "positive integer"),
                                        ("raise", "client exploded"), ("loss_list", "'train_loss' must be a finite"),
                                        ("negative_time", "'compute_s' must be >= 0")])
def test_bad_reply_rejected_round_continues(tmp_path, tiny_yaml, how, reason):
    scn = parse_scenario(tiny_yaml)
    from fedsim.federation import get_federation
    victim = get_federation(scn).sample_clients(1)[0]
    loop, rows = run_with(misbehaving_app({victim: how}), tiny_yaml, tmp_path)
    assert rows[0]["rejected"] >= 1 and rows[0]["clients"] == 3 - rows[0]["rejected"]
    assert any(reason in r for r in rows[0]["rejected_reasons"]), rows[0]["rejected_reasons"]
    assert rows[0]["rejected_reasons"][0].startswith(f"client {victim}:")   # error replies too (by node)
    assert len(rows) == 3 and all(np.isfinite(r["eval_loss"]) for r in rows)


def test_client_reported_weight_is_clamped_to_its_partition(tmp_path, tiny_yaml):
    """A client claiming 10^12 examples weighs no more than the examples it was given."""
    scn = parse_scenario(tiny_yaml)
    from fedsim.federation import get_federation
    fed = get_federation(scn)
    victim = fed.sample_clients(1)[0]
    honest, _ = run_with(misbehaving_app({}), tiny_yaml, tmp_path / "honest")
    liar, rows = run_with(misbehaving_app({victim: "huge_weight"}), tiny_yaml, tmp_path / "liar")
    assert rows[0]["rejected"] == 0
    a = load_file(str(tmp_path / "honest" / "model.safetensors"))
    b = load_file(str(tmp_path / "liar" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_no_accepted_reply_keeps_the_model_and_fails_the_run(tmp_path, tiny_yaml):
    from fedsim.errors import RunError
    text = tiny_yaml.replace("rounds: 3", "rounds: 2")
    with pytest.raises(RunError, match="no client reply was accepted in any round"):
        run_with(misbehaving_app({c: "raise" for c in range(6)}), text, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["clients"] for r in rows] == [0, 0] and all("lr_global" in r for r in rows)
    assert rows[0]["eval_loss"] == rows[1]["eval_loss"]
