"""The tutorial's embedding configuration (``get_embedding_conf``), with ``recis`` -> ``fxrec``, and
two parameters whose defaults are the tutorial's values: ``device`` (the tutorial's
``torch.device("cuda")``) and ``tile_len`` (``sparse4``/``sparse5``'s tile length, 1000)."""

import torch

from fxrec.nn.initializers import TruncNormalInitializer
from fxrec.nn.modules.embedding import EmbeddingOption


def get_embedding_conf(device: torch.device = torch.device("cuda"), tile_len: int = 1000):
    emb_conf = {}
    # dense2 feature looks up emb table with dim=8, name=sparse1
    emb_conf["dense2"] = EmbeddingOption(
        embedding_dim=8,
        shared_name="sparse1",
        combiner="sum",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
    )
    # sparse1 feature looks up emb table with dim=8, name=sparse1 (shares the same emb table with dense2)
    emb_conf["sparse1"] = EmbeddingOption(
        embedding_dim=8,
        shared_name="sparse1",
        combiner="sum",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
    )
    # sparse2 feature looks up emb table with dim=16, name=sparse2
    emb_conf["sparse2"] = EmbeddingOption(
        embedding_dim=16,
        shared_name="sparse2",
        combiner="sum",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
    )
    # sparse3 feature looks up emb table with dim=8, name=sparse3
    emb_conf["sparse3"] = EmbeddingOption(
        embedding_dim=8,
        shared_name="sparse3",
        combiner="sum",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
    )
    emb_conf["sparse4"] = EmbeddingOption(
        embedding_dim=16,
        shared_name="sparse4",
        combiner="tile",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
        combiner_kwargs={"tile_len": tile_len}
    )
    emb_conf["sparse5"] = EmbeddingOption(
        embedding_dim=16,
        shared_name="sparse5",
        combiner="tile",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
        combiner_kwargs={"tile_len": tile_len}
    )
    emb_conf["sparse1_x_sparse2"] = EmbeddingOption(
        embedding_dim=16,
        shared_name="sparse1_x_sparse2",
        combiner="mean",
        initializer=TruncNormalInitializer(mean=0, std=0.01),
        device=device,
    )
    return emb_conf
