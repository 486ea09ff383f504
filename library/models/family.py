"""Kept for existing imports: model families now live in :mod:`library.models.families`."""

from library.models.families import ModelFamily, sd_family

__all__ = ["ModelFamily", "sd_family"]
