"""Client-side message handlers: decode a Flower message, run the local round, encode the reply.

These are what ``clients/app.py`` registers on the ClientApp. A TRAIN message becomes a
:class:`~fedsim.core.client.LocalRun` (the global model, the client's shuffled batches, the
scenario's optimizer and loss) driven with the hooks of every client plugin the scenario
selects; each plugin gets its part of the message and the state it kept in ``context.state``
the last time this client trained, and returns what it adds to the reply and the state to keep.
The handler knows no algorithm. The client never mutates ``context.run_config``; everything it
needs per round travels in the message.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsim.builder import client_plugins
from fedsim.core.client import ClientPlugin, LocalRun, check_private
from fedsim.federation import Federation, get_federation
from fedsim.flower.codec import (CONFIG_RECORD, METRICS_RECORD, MODEL_RECORD, config_record, from_record,
                                 load_client_state, metric_record, plugin_payload, save_client_state,
                                 scenario_from_config, to_record)
from fedsim.runtime import default_device
from fedsim.scenario import Scenario
from fedsim.seeding import torch_generator, torch_rng
from fedsim.train import ShuffledBatches, evaluate, make_optimizer, run_local

#: ``context.state`` record with the generic per-client bookkeeping (rounds trained, the last one).
CLIENT_RECORD = "client-{cid}/fedsim"


def _federation(context: Context) -> tuple[Scenario, Federation]:
    """The run's scenario and Federation; a SuperNode's ``data-dir`` node config overrides ``data.root``."""
    scn = scenario_from_config(context.run_config)
    data_dir = context.node_config.get("data-dir")
    if isinstance(data_dir, str) and data_dir:
        scn = scn.model_copy(update={"data": scn.data.model_copy(update={"root": data_dir})})
    return scn, get_federation(scn)


_PLUGINS: dict[int, tuple[Federation, list[ClientPlugin]]] = {}


def _plugins(scn: Scenario, fed: Federation) -> list[ClientPlugin]:
    """The scenario's client plugins, built once per Federation (they hold no per-client state)."""
    cached = _PLUGINS.get(id(fed))
    if cached is None or cached[0] is not fed:
        _PLUGINS.clear()
        cached = _PLUGINS[id(fed)] = (fed, client_plugins(scn, fed))
    return cached[1]


def _load_global(msg: Message, fed: Federation, decode=None) -> torch.nn.Module:
    """The client model holding the message's global weights (``decode``: the plugins' decoding of a
    model that came down sparse)."""
    model = fed.client_model()
    arrays = from_record(msg.content[MODEL_RECORD])
    state = {k: torch.from_numpy(v) for k, v in (decode(arrays) if decode else arrays).items()}
    model.load_state_dict(state, strict=True)
    return model


def handle_train(msg: Message, context: Context) -> Message:
    """Train the global model on the virtual client named in the message; reply with new weights."""
    start = time.perf_counter()
    scn, fed = _federation(context)
    cfg = dict(msg.content[CONFIG_RECORD])
    rnd, cid, device = int(cfg["server-round"]), int(cfg["client-id"]), default_device()
    local = scn.federation.local
    phase = str(cfg.get("phase", "train"))
    plugins = [p for p in _plugins(scn, fed) if p.takes_part(phase)]
    payloads = [plugin_payload(msg.content, cfg, p.name) for p in plugins]
    states = [load_client_state(context.state, cid, p.name) for p in plugins]

    def decode(arrays):
        for p, payload, state in zip(plugins, payloads, states):
            arrays = p.decode_model(arrays, payload, state)
        return arrays
    model = _load_global(msg, fed, decode).to(device)
    x, y = fed.client_data(cid)
    run = LocalRun(model, ShuffledBatches(x, y, batch_size=local.batch_size, epochs=local.epochs, steps=local.steps,
                                          generator=torch_generator(scn.seed, "train", rnd, cid), device=device),
                   lambda params, lr: make_optimizer(params, local.optimizer, lr, local.momentum, local.weight_decay),
                   F.cross_entropy, base_lr=float(cfg["lr"]), device=device, data=(x, y), seed=scn.seed,
                   server_round=rnd, client_id=cid, phase=phase, basis_id=int(cfg.get("basis-id", 0)))
    rounds = [p.begin(run, payload, state) for p, payload, state in zip(plugins, payloads, states)]
    try:
        with torch_rng(scn.seed, "train-rng", rnd, cid, device=device):   # dropout & co.: (seed, round, client)
            out = run_local(run, rounds)
        upload = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        results = []
        for r in rounds:
            results.append(r.finish(run, upload))
            upload = results[-1].model if results[-1].model is not None else upload
        metrics = {"num-examples": int(len(y)), "train_loss": out["train_loss"], "steps": run.steps,
                   "client-id": cid, "server-round": rnd, "lr_local": run.lr}
        records = _reply_records(plugins, results, metrics)
        outgoing = {f"{MODEL_RECORD}/{k}": v for k, v in upload.items()}
        outgoing.update({f"{rec}/{k}": v for rec, arrays in records.items() for k, v in arrays.items()})
        names = set(metrics) | set(records) | {n.split("/", 1)[1] for n in outgoing}
        for plugin, r, result in zip(plugins, rounds, results):
            check_private(plugin, result.state, r.private(), outgoing, names)
    finally:
        for r in rounds:
            r.close(run)
    for plugin, result in zip(plugins, results):     # only a reply that passed every check changes state
        save_client_state(context.state, cid, plugin.name, result.state)
    _count_round(context.state, cid, rnd)
    metrics["compute_s"] = time.perf_counter() - start
    model_record = {MODEL_RECORD: to_record(upload)} if upload else {}      # a phase may send no model
    content = RecordDict({**model_record, **{k: to_record(v) for k, v in records.items()},
                          METRICS_RECORD: metric_record(metrics)})
    return Message(content, reply_to=msg)


def _reply_records(plugins: list[ClientPlugin], results: list, metrics: dict) -> dict:
    """The plugins' array groups as reply records; their metrics merged into ``metrics`` (a plugin
    may not overwrite a protocol metric or another plugin's)."""
    records = {}
    owner = dict.fromkeys(metrics, "fedsim")
    for plugin, result in zip(plugins, results):
        clash = sorted(k for k in result.metrics if k in owner)
        if clash:
            raise ValueError(f"plugin '{plugin.name}' reports metrics {clash} that {owner[clash[0]]} already reports; "
                             "give them a name of their own")
        owner.update(dict.fromkeys(result.metrics, plugin.name))
        metrics.update(result.metrics)
        records.update({f"{plugin.name}.{g}": a for g, a in result.arrays.items()})
    return records


def _count_round(state: RecordDict, cid: int, rnd: int) -> None:
    """Bookkeeping every client keeps: how many rounds it trained in, and the last one."""
    key = CLIENT_RECORD.format(cid=cid)
    rounds = int(state[key]["rounds"]) if key in state else 0
    state[key] = ConfigRecord({"rounds": rounds + 1, "last_round": rnd})


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the client's own examples (client-side evaluation)."""
    scn, fed = _federation(context)
    cfg = msg.content[CONFIG_RECORD]
    cid = int(cfg["client-id"])
    model = _load_global(msg, fed)
    x, y = fed.client_data(cid)
    out = evaluate(model, x, y, batch_size=scn.federation.eval_batch_size, device=default_device())
    metrics = {"num-examples": out["num_examples"], "eval_loss": out["loss"], "eval_accuracy": out["accuracy"],
               "client-id": cid, "server-round": int(cfg["server-round"])}
    return Message(RecordDict({METRICS_RECORD: metric_record(metrics), CONFIG_RECORD: config_record({})}),
                   reply_to=msg)
