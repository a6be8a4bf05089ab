"""Gradient stores: one module per shard format, registered by name (``factors``, ``dense``,
``projected``), and the shard writer and reader that serve every kind."""

from . import dense, factors, projected  # noqa: F401  (each registers its kind)
from .base import STORES, Block, DenseBlock, Direction, FactoredBlock, StoreKind, register_store, store_kind
from .projected import KroneckerProjection
from .shards import GradientReader, ShardWriter

__all__ = ["STORES", "Block", "DenseBlock", "Direction", "FactoredBlock", "StoreKind", "register_store", "store_kind",
           "KroneckerProjection", "GradientReader", "ShardWriter"]
