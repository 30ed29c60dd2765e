"""The tutorial's feature configuration (``get_feature_conf``), with ``recis`` -> ``fxrec``."""

from fxrec.features.feature import Feature
from fxrec.features.op import Bucketize, FeatureCross, Hash, Mod, SelectField, SelectFields, SequenceTruncate


def get_feature_conf(seq_len: int = 1000):
    feature_confs = []
    # dense1 feature read directly, dim is 8
    feature_confs.append(Feature("dense1").add_op(SelectField("dense1", dim=8)))
    # dense2 feature, dim is 1, needs bucketing transformation
    feature_confs.append(
        Feature("dense2").add_op(SelectField("dense2", dim=1)).add_op(Bucketize([0, 0.5, 1]))
    )
    # sparse1 / sparse2 features, read directly
    feature_confs.append(Feature("sparse1").add_op(SelectField("sparse1")))
    feature_confs.append(Feature("sparse2").add_op(SelectField("sparse2")))
    # sparse3 feature, perform modulo 10000 calculation
    feature_confs.append(Feature("sparse3").add_op(SelectField("sparse3")).add_op(Mod(10000)))
    # sparse4 feature, perform modulo calculation and truncation
    feature_confs.append(
        Feature("sparse4")
        .add_op(SelectField("sparse4"))
        .add_op(Mod(10000))
        .add_op(SequenceTruncate(seq_len=seq_len, truncate=True, truncate_side="right", check_length=True, n_dims=2))
    )
    # sparse5 feature, perform hash, modulo and truncation
    feature_confs.append(
        Feature("sparse5")
        .add_op(SelectField("sparse5"))
        .add_op(Hash(hash_type="farm"))
        .add_op(Mod(10000))
        .add_op(SequenceTruncate(seq_len=seq_len, truncate=True, truncate_side="right", check_length=True, n_dims=2))
    )
    # sparse1_x_sparse2 feature, perform feature crossing
    feature_confs.append(
        Feature("sparse1_x_sparse2")
        .add_op(SelectFields([SelectField("sparse1"), SelectField("sparse2")]))
        .add_op(FeatureCross())
        .add_op(Mod(1000))
    )
    return feature_confs
