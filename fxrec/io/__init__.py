"""Reading training data: ``OrcDataset`` and ``ParquetDataset`` (RecIS's API, SPEC §2)."""

from fxrec.io.errors import DataError
from fxrec.io.orc_dataset import OrcDataset
from fxrec.io.parquet_dataset import ParquetDataset

__all__ = ["DataError", "OrcDataset", "ParquetDataset"]
