"""Errors a user can cause, each with one message naming where, what was expected and what was found."""
from __future__ import annotations


class DednError(Exception):
    """Base class of every error `dedn` raises on purpose."""


class DatasetError(DednError, ValueError):
    """A dataset file (manifest, shard, class-side array, source file) is not what it must be."""

    def __init__(self, file: object, field: str, expected: str, found: object):
        self.file, self.field, self.expected, self.found = str(file), field, expected, found
        super().__init__(f"{self.file}: {field}: expected {expected}, found {found}")


class ConfigError(DednError, ValueError):
    """A configuration key or value is unknown or out of range."""

    def __init__(self, key: str, expected: str, found: object, source: str = "config"):
        self.key, self.expected, self.found, self.source = key, expected, found, source
        super().__init__(f"{source}: {key}: expected {expected}, found {found!r}")
