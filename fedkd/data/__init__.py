"""Datasets, label partitions and the public/private federated split.

Everything here works on plain numpy arrays so that hundreds of simulated
clients in one process can share a single copy of the data: loaded datasets
and federated splits are cached per process and their arrays are read-only.
Heavy libraries (``datasets``, ``flwr_datasets``, ``torch``) are imported
inside the functions that need them, so importing this package stays cheap.

Modules, one concern each:

- :mod:`~fedkd.data.arrays`: the data model (``ImageArrays``, ``DatasetInfo``, ``Dataset``);
- :mod:`~fedkd.data.registry`: dataset names and ``load_dataset``, cached per process;
- :mod:`~fedkd.data.embedded`, :mod:`~fedkd.data.idx`, :mod:`~fedkd.data.hub`: the three
  sources (the bundled digits, IDX files under a data root, the Hugging Face Hub);
- :mod:`~fedkd.data.partition`: flwr-datasets label partitions and the public/private split;
- :mod:`~fedkd.data.tensors`: ``uint8`` images to and from normalized tensors;
- :mod:`~fedkd.data.local`: one participant's tensors for a run's ``SplitSpec``, cached per
  process. It imports ``torch`` and :mod:`fedkd.config`, so it is not re-exported here.
"""

from fedkd.data.arrays import Dataset, DatasetInfo, ImageArrays
from fedkd.data.hub import arrays_from_hf
from fedkd.data.idx import DATA_ROOT_ENV, read_idx
from fedkd.data.partition import PARTITION_SCHEMES, FederatedSplit, federated_split, partition_indices
from fedkd.data.registry import available_datasets, load_dataset
from fedkd.data.tensors import to_tensor, to_uint8

__all__ = [
    "DATA_ROOT_ENV",
    "PARTITION_SCHEMES",
    "Dataset",
    "DatasetInfo",
    "FederatedSplit",
    "ImageArrays",
    "arrays_from_hf",
    "available_datasets",
    "federated_split",
    "load_dataset",
    "partition_indices",
    "read_idx",
    "to_tensor",
    "to_uint8",
]
