"""Feature configs and the FeatureEngine that runs them as one FX graph of fxrec ops."""

from fxrec.features.feature import Feature
from fxrec.features.feature_engine import FeatureEngine
from fxrec.features.op import (
    Bucketize,
    FeatureCross,
    Hash,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
)

__all__ = [
    "Feature",
    "FeatureEngine",
    "SelectField",
    "SelectFields",
    "Mod",
    "Bucketize",
    "Hash",
    "FeatureCross",
    "SequenceTruncate",
]
