"""Errors of the data package."""
from __future__ import annotations


class DatasetMissing(FileNotFoundError):
    """A dataset is not on disk: the message names it, where it looked, and how to get it."""

    def __init__(self, name: str, looked_in, how: str, detail: str = ""):
        self.name, self.looked_in, self.how = name, [str(p) for p in looked_in], how
        where = "\n".join(f"  - {p}" for p in self.looked_in)
        super().__init__(f"dataset {name!r} not found{': ' + detail if detail else ''}.\nLooked in:\n{where}\n"
                         f"How to get it: {how}")
