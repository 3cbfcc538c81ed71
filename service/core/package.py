"""The installed package's own version: what the OpenAPI spec and the protocol's server metadata report."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("cnn-serving")
    except metadata.PackageNotFoundError:  # run from a copy that was never installed
        return "unknown"
