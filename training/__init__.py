"""Incremental training: a general partition-by-partition trainer, CNN experiments and the drafter ladder."""
