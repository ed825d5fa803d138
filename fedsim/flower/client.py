"""Client-side message handlers: decode a Flower message, train or evaluate, encode the reply.

These are what ``clients/app.py`` registers on the ClientApp. The client never mutates
``context.run_config``; everything it needs per round travels in the message config.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import Context, Message, RecordDict

from fedsim.federation import get_federation
from fedsim.flower.codec import config_record, from_record, metric_record, scenario_from_config, to_record
from fedsim.seeding import torch_generator
from fedsim.train import evaluate, local_train


def client_device() -> torch.device:
    """The device a client trains on: the worker's (``FEDSIM_DEVICE``), else the first GPU, else the CPU."""
    if os.environ.get("FEDSIM_DEVICE"):
        return torch.device(os.environ["FEDSIM_DEVICE"])
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _load_global(msg: Message, fed) -> torch.nn.Module:
    model = fed.build_model()
    state = {k: torch.from_numpy(v) for k, v in from_record(msg.content["arrays"]).items()}
    model.load_state_dict(state, strict=True)
    return model


def handle_train(msg: Message, context: Context) -> Message:
    """Train the global model on the virtual client named in the message; reply with new weights."""
    start = time.perf_counter()
    scn = scenario_from_config(context.run_config)
    fed = get_federation(scn)
    cfg = msg.content["config"]
    rnd, cid = int(cfg["server-round"]), int(cfg["client-id"])
    model = _load_global(msg, fed)
    x, y = fed.client_data(cid)
    local = scn.federation.local
    out = local_train(model, x, y, epochs=local.epochs, steps=local.steps, batch_size=local.batch_size,
                      optimizer=local.optimizer, lr=float(cfg["lr"]), momentum=local.momentum,
                      weight_decay=local.weight_decay, proximal_mu=float(cfg.get("proximal-mu", 0.0)),
                      generator=torch_generator(scn.seed, "train", rnd, cid), device=client_device())
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    metrics = {"num-examples": out["num_examples"], "train_loss": out["train_loss"], "steps": out["steps"],
               "compute_s": time.perf_counter() - start, "client-id": cid, "server-round": rnd}
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metric_record(metrics)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the client's own examples (client-side evaluation)."""
    scn = scenario_from_config(context.run_config)
    fed = get_federation(scn)
    cfg = msg.content["config"]
    cid = int(cfg["client-id"])
    model = _load_global(msg, fed)
    x, y = fed.client_data(cid)
    out = evaluate(model, x, y, batch_size=scn.federation.eval_batch_size, device=client_device())
    metrics = {"num-examples": out["num_examples"], "eval_loss": out["loss"], "eval_accuracy": out["accuracy"],
               "client-id": cid, "server-round": int(cfg["server-round"])}
    return Message(RecordDict({"metrics": metric_record(metrics), "config": config_record({})}), reply_to=msg)
