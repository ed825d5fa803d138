"""Offline data sets and federated partitioners.

Example:
    >>> import numpy as np
    >>> from fedsim.data import load_dataset, make_partition, partition_stats
    >>> ds = load_dataset("digits", seed=0)
    >>> p = make_partition("dirichlet", labels=ds.y_train, num_clients=10,
    ...                    rng=np.random.default_rng(0), alpha=0.5)
    >>> partition_stats(p, ds.y_train, ds.num_classes)["num_clients"]
    10
"""

from fedsim.data.datasets import (
    DataUnavailableError,
    Dataset,
    dataset_names,
    dataset_options,
    load_dataset,
    read_dataset,
    save_dataset,
)
from fedsim.data.partition import (
    Partition,
    dirichlet,
    fingerprint,
    heterogeneity_line,
    iid,
    make_partition,
    natural,
    partition_params,
    partition_stats,
    quantity,
    shards,
)

__all__ = [
    "DataUnavailableError",
    "Dataset",
    "Partition",
    "dataset_names",
    "dataset_options",
    "dirichlet",
    "fingerprint",
    "heterogeneity_line",
    "iid",
    "load_dataset",
    "read_dataset",
    "save_dataset",
    "make_partition",
    "natural",
    "partition_params",
    "partition_stats",
    "quantity",
    "shards",
]
