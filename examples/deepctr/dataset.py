"""The tutorial's dataset (``IOArgs``, ``get_dataset``), with ``recis`` -> ``fxrec`` and the
tutorial's ``device="cuda"`` a parameter (``"cuda"`` when CUDA is available, else ``"cpu"``)."""

import os
from dataclasses import dataclass

import torch

from fxrec.io.orc_dataset import OrcDataset

__all__ = ["IOArgs", "get_dataset"]


@dataclass
class IOArgs:
    data_paths: str
    batch_size: int
    # Concurrency for data reading
    thread_num: int
    # Data prefetch quantity
    prefetch: int
    drop_remainder: bool


def get_dataset(io_args, device=None):
    # Get current rank id and rank num in distributed mode for data parallelism
    worker_idx = int(os.environ.get("RANK", 0))
    worker_num = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dataset = OrcDataset(
        io_args.batch_size,
        worker_idx=worker_idx,
        worker_num=worker_num,
        read_threads_num=io_args.thread_num,
        prefetch=io_args.prefetch,
        is_compressed=False,
        drop_remainder=io_args.drop_remainder,
        # Data preprocessing
        transform_fn=[lambda x: x[0]],
        dtype=torch.float32,
        # Batch packaging results directly placed on the device
        device=str(device),
        save_interval=None,
    )
    data_paths = io_args.data_paths.split(",")
    for path in data_paths:
        dataset.add_path(path)
    # Set feature columns to read
    # Read fixed-length features and default values
    dataset.fixedlen_feature("label", [0.0])
    dataset.fixedlen_feature("dense1", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    dataset.fixedlen_feature("dense2", [0.0])
    # Read variable-length features
    dataset.varlen_feature("sparse1")
    dataset.varlen_feature("sparse2")
    dataset.varlen_feature("sparse3")
    dataset.varlen_feature("sparse4")
    # sparse5 is a string sequence that needs hash processing: read as int8 bytes, hashed by
    # the Hash op of the feature configuration
    dataset.varlen_feature("sparse5", hash_type=None, trans_int8=True)
    return dataset
