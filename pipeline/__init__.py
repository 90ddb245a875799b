"""Tapir's pipeline: configs, stages, shard I/O, Ray wiring, CLI."""
