"""Data: the class side, the on-disk feature dataset (format, writer, reader), sources and converters.

The public names of the dataset format are re-exported here (`from dedn.data import
FeatureDataset, DatasetWriter, SPLITS`); the reader (`dedn.data.reader`), the class-side
sources (`dedn.data.sources`), converters, the semi-synthetic generator and attribute clusters
are imported from their modules.
"""
from dedn.data.dataset import FeatureDataset
from dedn.data.format import (
    CLASS_SIDE_FILE, COLUMNS, MANIFEST_FILE, SCHEMA_VERSION, SHARD_DIR, SOURCES, SPLITS, STORAGE_DTYPES, VERIFY_MODES,
    ShardInfo, SplitInfo, arrow_error, check_finite_features, check_shard_schema, check_shard_sha256, nonfinite_rows,
    sha256_file, split_classes, validate_class_side, validate_clusters,
)
from dedn.data.writer import DatasetWriter, SplitWriter

__all__ = [
    "FeatureDataset", "DatasetWriter", "SplitWriter", "ShardInfo", "SplitInfo", "SPLITS", "SOURCES", "STORAGE_DTYPES",
    "VERIFY_MODES", "SCHEMA_VERSION", "MANIFEST_FILE", "CLASS_SIDE_FILE", "SHARD_DIR", "COLUMNS", "split_classes",
    "sha256_file", "check_shard_sha256", "check_shard_schema", "check_finite_features", "nonfinite_rows", "arrow_error",
    "validate_class_side", "validate_clusters",
]
