"""The tutorial's model (``SparseModel``, ``DenseModel``, ``DeepCTR``), with ``recis`` -> ``fxrec``.

Two parameters the tutorial hardcodes are arguments here, with the tutorial's values as
defaults: the device of the embedding tables (the tutorial's ``torch.device("cuda")``) and the
sequence length of ``sparse4``/``sparse5`` (``seq_len``: the truncation AND the tile length,
1000 in the tutorial; the dense model's input width follows it: ``8 + 8 + 8 + 16 + 8 +
2 * 16 * seq_len + 16``). ``passes`` (default False, as the tutorial) is the engines' ``passes``
argument: fxrec's graph passes on both engines.

One change to the tutorial's code: ``squeeze(-1)`` where it wrote ``squeeze()`` (logits and labels
``[B, 1]`` -> ``[B]``). ``squeeze()`` also drops the batch dimension when B = 1, so it depends on
the batch size, and a graph compiled for every batch size (``fxrec.compile``) cannot trace its
backward (``SqueezeBackward0`` must know whether B == 1). The loss is the same either way.
"""

import torch
import torch.nn as nn

from examples.deepctr.embeddings import get_embedding_conf
from examples.deepctr.features import get_feature_conf
from fxrec.features.feature_engine import FeatureEngine
from fxrec.framework.metrics import add_metric
from fxrec.metrics.auroc import AUROC
from fxrec.nn import EmbeddingEngine

__all__ = ["DeepCTR", "DenseModel", "SparseModel"]


class SparseModel(nn.Module):
    def __init__(self, device=torch.device("cuda"), seq_len: int = 1000, passes: bool = False):
        super().__init__()
        self.feature_engine = FeatureEngine(feature_list=get_feature_conf(seq_len), passes=passes)
        self.embedding_engine = EmbeddingEngine(get_embedding_conf(device, tile_len=seq_len), passes=passes)

    def forward(self, samples: dict):
        samples = self.feature_engine(samples)
        samples = self.embedding_engine(samples)
        labels = samples.pop("label")
        return samples, labels


class DenseModel(nn.Module):
    def __init__(self, seq_len: int = 1000):
        super().__init__()
        layers = []
        layers.extend([nn.Linear(8 + 8 + 8 + 16 + 8 + 16 * seq_len + 16 * seq_len + 16, 128), nn.ReLU()])
        layers.extend([nn.Linear(128, 64), nn.ReLU()])
        layers.extend([nn.Linear(64, 32), nn.ReLU()])
        layers.extend([nn.Linear(32, 1)])
        self.dnn = nn.Sequential(*layers)

    def forward(self, x):
        x = self.dnn(x)
        logits = torch.sigmoid(x)
        return logits


class DeepCTR(nn.Module):
    def __init__(self, device=torch.device("cuda"), seq_len: int = 1000, passes: bool = False):
        super().__init__()
        self.sparse_arch = SparseModel(device, seq_len, passes)
        self.dense_arch = DenseModel(seq_len)
        self.auc_metric = AUROC(num_thresholds=200, dist_sync_on_step=True)
        self.loss = nn.BCELoss()

    def forward(self, samples: dict):
        samples, labels = self.sparse_arch(samples)
        dense_input = torch.cat(
            [
                samples["dense1"],
                samples["dense2"],
                samples["sparse1"],
                samples["sparse2"],
                samples["sparse3"],
                samples["sparse4"],
                samples["sparse5"],
                samples["sparse1_x_sparse2"],
            ],
            -1,
        )
        logits = self.dense_arch(dense_input)

        loss = self.loss(logits.squeeze(-1), labels.squeeze(-1))

        self.auc_metric.update(logits.squeeze(-1), labels.squeeze(-1))
        auc_score = self.auc_metric.compute()

        add_metric("auc", auc_score)
        add_metric("loss", loss)

        return loss
