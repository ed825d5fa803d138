"""A Federation: a validated scenario turned into data, a client partition and a model factory.

It holds what every algorithm shares and nothing algorithm-specific: the algorithms a scenario
selects are built by :mod:`fedsim.builder`.

Both sides build the same Federation from the same scenario: the server uses the test
split, client sizes and the initial model; a client uses its own partition. Everything is
a pure function of the scenario (and its seed), so every process agrees without talking.

Example:
    >>> from fedsim.scenario import parse_scenario
    >>> fed = Federation(parse_scenario(
    ...     "name: t\\ndata: {dataset: digits, partition: {kind: iid, num_clients: 4}}\\n"
    ...     "model: {name: mlp}\\nfederation: {rounds: 1, clients_per_round: 2}\\n"))
    >>> fed.num_clients, len(fed.sample_clients(1))
    (4, 2)
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
from torch import nn

from fedsim.data import Dataset, load_dataset, make_partition, partition_stats
from fedsim.models import build_model
from fedsim.scenario import Scenario, ScenarioError, config_sha256
from fedsim.scenario.schema import ceil_fraction
from fedsim.seeding import numpy_rng, torch_rng


class Federation:
    """Data, partition, cohort sampling and model construction for one scenario."""

    def __init__(self, scenario: Scenario, dataset: Dataset | None = None):
        """``dataset``: the scenario's data set as another process loaded it (else it is loaded here)."""
        self.scenario = scenario
        data = scenario.data
        if dataset is None:
            dataset = load_dataset(data.dataset, root=data.root, cache_dir=data.cache_dir,
                                   test_fraction=data.test_fraction, seed=scenario.seed, **data.options)
        self.dataset: Dataset = dataset
        params = data.partition.model_dump(exclude={"kind", "num_clients"})
        try:
            self.partition = make_partition(data.partition.kind, labels=self.dataset.y_train,
                                            num_clients=data.partition.num_clients,
                                            rng=numpy_rng(scenario.seed, "partition"),
                                            ids=self.dataset.train_ids, **params)
        except ValueError as exc:   # the data cannot be split as asked: a scenario problem, not a crash
            raise ScenarioError(f"scenario '{scenario.name}'", [f"data.partition: {exc}"]) from None
        self.num_clients = len(self.partition.indices)
        self.client_sizes = [int(len(ix)) for ix in self.partition.indices]
        self.cohort_size = self._cohort_size()
        self._client_model: nn.Module | None = None
        self._check_model()
        self.notes = self._notes()

    def _notes(self) -> list[str]:
        """What the scenario asks for that has no effect, or not the one a user may expect."""
        from fedsim.data.datasets import reads_root

        data, out = self.scenario.data, []
        if data.root and not reads_root(data.dataset):
            out.append(f"data.root: '{data.dataset}' is bundled with its package, so data.root ({data.root}) is not "
                       "used")
        per = getattr(data.partition, "classes_per_client", None)
        if data.partition.kind == "shards" and per is not None and per >= self.dataset.num_classes:
            out.append(f"data.partition: shards with classes_per_client {per} >= the {self.dataset.num_classes} "
                       "classes gives every client every class, a split without label skew; lower "
                       "classes_per_client for a non-IID split")
        return out

    def _check_model(self) -> None:
        """Build the model on the data's shapes and pass two training examples through it, so that a
        model that does not fit the data is a scenario problem (``model.name``), not a crash in round 1."""
        import torch

        from fedsim.models.nets import ModelOptionError

        ds, name = self.dataset, self.scenario.model.name
        where = f"scenario '{self.scenario.name}'"
        self._check_model_size(where)
        try:
            model = self.client_model()
        except ModelOptionError as exc:
            self._client_model = None
            raise ScenarioError(where, [f"model.options.{exc.option}: {exc}"]) from None
        except (ValueError, TypeError) as exc:
            raise ScenarioError(where, [f"model.name: '{name}' cannot be built for data set '{ds.name}' (input shape "
                                        f"{tuple(ds.input_shape)}, {ds.num_classes} classes): {exc}"]) from None
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "allocate" not in str(exc):    # torch's "can't allocate memory"
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ScenarioError(where, [f"model.options: the '{name}' model cannot be allocated here ({first}); "
                                        "choose smaller model.options"]) from None
        x = torch.as_tensor(ds.x_train[:2])
        training = model.training
        try:
            with torch.no_grad():
                model.eval()
                model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ScenarioError(where, [f"model.name: '{name}' cannot take the inputs of data set '{ds.name}' "
                                        f"(shape {tuple(ds.input_shape)}, {x.dtype}): {first}"]) from None
        finally:
            model.train(training)

    def _check_model_size(self, where: str) -> None:
        """Refuse a model whose parameters alone exceed this machine's memory, measured on torch's
        ``meta`` device (shapes only, nothing allocated), instead of a failed allocation or the
        kernel's OOM killer in the middle of building it."""
        import torch

        try:
            with torch.device("meta"):
                model = build_model(self.scenario.model.name, input_shape=self.dataset.input_shape,
                                    num_classes=self.dataset.num_classes, **self.scenario.model.options)
        except Exception:  # noqa: BLE001 - whatever fails here fails again, with its message, in the real build
            return
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        if memory and size > memory:
            raise ScenarioError(where, [f"model.options: the '{self.scenario.model.name}' model has "
                                        f"{size / 2 ** 30:.1f} GiB of parameters, more than this machine's "
                                        f"{memory / 2 ** 30:.1f} GiB of memory; choose smaller model.options"])

    def _cohort_size(self) -> int:
        fed = self.scenario.federation
        if fed.clients_per_round is not None:
            if fed.clients_per_round > self.num_clients:
                raise ScenarioError(f"scenario '{self.scenario.name}'", [
                    f"federation.clients_per_round: {fed.clients_per_round} is more than the "
                    f"{self.num_clients} clients the partition produced"])
            return fed.clients_per_round
        if fed.fraction is not None:
            return ceil_fraction(fed.fraction, self.num_clients)
        return self.num_clients

    def stats(self) -> dict:
        """The partition report written to ``partition.json``."""
        out = partition_stats(self.partition, self.dataset.y_train, self.dataset.num_classes)
        if self.dataset.id_names is not None and self.scenario.data.partition.kind == "natural":
            out["natural_ids"] = [self.dataset.id_names[int(self.dataset.train_ids[ix[0]])] if len(ix) else None
                                  for ix in self.partition.indices]
        out["dataset"] = self.dataset.name
        out["source"] = self.dataset.source
        return out

    def client_data(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """The training examples of virtual client ``cid``."""
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client id {cid} is outside 0..{self.num_clients - 1}")
        idx = self.partition.indices[cid]
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def sample_clients(self, server_round: int) -> list[int]:
        """The round's cohort: uniform without replacement, a pure function of (seed, round)."""
        rng = numpy_rng(self.scenario.seed, "sample", server_round)
        return sorted(int(c) for c in rng.choice(self.num_clients, size=self.cohort_size, replace=False))

    def build_model(self) -> nn.Module:
        """A fresh model; its initial weights are a pure function of the scenario seed."""
        model_cfg = self.scenario.model
        with torch_rng(self.scenario.seed, "model-init"):
            return build_model(model_cfg.name, input_shape=self.dataset.input_shape,
                               num_classes=self.dataset.num_classes, **model_cfg.options)

    def client_model(self) -> nn.Module:
        """A model object clients of this process reuse: they load the global weights into it
        (``load_state_dict(strict=True)`` replaces every entry), so it is built only once."""
        if self._client_model is None:
            self._client_model = self.build_model()
        return self._client_model

    def trainable_names(self) -> list[str]:
        """The ``state_dict`` entries that are trained parameters (the rest are buffers), in order."""
        model = self.client_model()
        params = {name for name, p in model.named_parameters() if p.requires_grad}
        return [name for name in model.state_dict() if name in params]

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The initial global model as named numpy arrays (``state_dict`` order)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.build_model().state_dict().items()}


_CACHE: "OrderedDict[str, Federation]" = OrderedDict()


def get_federation(scenario: Scenario, dataset: Dataset | None = None) -> Federation:
    """A per-process cache: a worker keeps data and partition warm across rounds and clients.
    ``dataset`` (the scenario's, loaded elsewhere) is used if the federation is not cached yet."""
    key = config_sha256(scenario)
    if key not in _CACHE:
        _CACHE[key] = Federation(scenario, dataset)
        while len(_CACHE) > 2:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]
