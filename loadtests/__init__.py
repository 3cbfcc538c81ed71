"""Load tests and benchmarks for the service."""
