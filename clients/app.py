"""Flower ClientApp entry point (``clients.app:app``): a message in, fedsim local work, a reply out."""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsim.flower.client import handle_evaluate, handle_train

torch.set_num_threads(1)   # every engine trains single-threaded per client process: same kernels, same numbers
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the virtual client named in the message."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Client-side evaluation of the global model."""
    return handle_evaluate(msg, context)
