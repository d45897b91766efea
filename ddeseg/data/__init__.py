"""Shard schema, streaming loaders and augmentation."""
