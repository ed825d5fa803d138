"""Client-side message handlers: decode a Flower message, train or evaluate, encode the reply.

These are what ``clients/app.py`` registers on the ClientApp. The client never mutates
``context.run_config``; everything it needs per round travels in the message config.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, RecordDict

from fedsim.algorithms.fedhyper import FedHyperClient
from fedsim.runtime import default_device
from fedsim.federation import get_federation
from fedsim.flower.codec import config_record, from_record, metric_record, scenario_from_config, to_record
from fedsim.seeding import torch_generator, torch_rng
from fedsim.train import evaluate, local_train


def _federation(context: Context):
    """The run's scenario and Federation; a SuperNode's ``data-dir`` node config overrides ``data.root``."""
    scn = scenario_from_config(context.run_config)
    data_dir = context.node_config.get("data-dir")
    if isinstance(data_dir, str) and data_dir:
        scn = scn.model_copy(update={"data": scn.data.model_copy(update={"root": data_dir})})
    return scn, get_federation(scn)


def _load_global(msg: Message, fed) -> torch.nn.Module:
    model = fed.client_model()
    state = {k: torch.from_numpy(v) for k, v in from_record(msg.content["arrays"]).items()}
    model.load_state_dict(state, strict=True)
    return model


def handle_train(msg: Message, context: Context) -> Message:
    """Train the global model on the virtual client named in the message; reply with new weights."""
    start = time.perf_counter()
    scn, fed = _federation(context)
    cfg = msg.content["config"]
    rnd, cid = int(cfg["server-round"]), int(cfg["client-id"])
    model = _load_global(msg, fed)
    x, y = fed.client_data(cid)
    local, lr, device = scn.federation.local, float(cfg["lr"]), default_device()
    cl = _cl_rule(msg, fed, model.to(device), lr) if cfg.get("fedhyper-cl") else None
    with torch_rng(scn.seed, "train-rng", rnd, cid, device=device):   # dropout & co.: (seed, round, client)
        out = local_train(model, x, y, epochs=local.epochs, steps=local.steps, batch_size=local.batch_size,
                          optimizer=local.optimizer, lr=lr, momentum=local.momentum,
                          weight_decay=local.weight_decay, proximal_mu=float(cfg.get("proximal-mu", 0.0)),
                          generator=torch_generator(scn.seed, "train", rnd, cid), device=device,
                          on_epoch=cl.start_epoch if cl else None, on_step=cl.after_step if cl else None)
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    metrics = {"num-examples": out["num_examples"], "train_loss": out["train_loss"], "steps": out["steps"],
               "compute_s": time.perf_counter() - start, "client-id": cid, "server-round": rnd,
               "lr_local": cl.lr if cl else lr, **(cl.metrics() if cl else {})}
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metric_record(metrics)}), reply_to=msg)


def _cl_rule(msg: Message, fed, model: torch.nn.Module, lr: float) -> FedHyperClient:
    """FedHyper's client rule, fed the previous global update when the server sent one (round >= 2)."""
    prev = msg.content.get("prev_update")
    params = [p for p in model.parameters() if p.requires_grad]
    prev_t = [torch.from_numpy(a) for a in from_record(prev).values()] if prev is not None else None
    return FedHyperClient(lr, prev_t, params, **fed.cl_kwargs())


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the client's own examples (client-side evaluation)."""
    scn, fed = _federation(context)
    cfg = msg.content["config"]
    cid = int(cfg["client-id"])
    model = _load_global(msg, fed)
    x, y = fed.client_data(cid)
    out = evaluate(model, x, y, batch_size=scn.federation.eval_batch_size, device=default_device())
    metrics = {"num-examples": out["num_examples"], "eval_loss": out["loss"], "eval_accuracy": out["accuracy"],
               "client-id": cid, "server-round": int(cfg["server-round"])}
    return Message(RecordDict({"metrics": metric_record(metrics), "config": config_record({})}), reply_to=msg)
