"""Shard writing, shard reading, tokenisation and the synthetic dataset."""
