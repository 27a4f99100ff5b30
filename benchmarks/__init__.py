"""Benchmarks: each script prints JSON lines and can write them to a results folder."""
