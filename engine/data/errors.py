"""Errors of the data package."""
from __future__ import annotations


class DatasetMissing(FileNotFoundError):
    """A dataset is not on disk: the message names it, where it looked, and how to get it."""

    def __init__(self, name: str, looked_in, how: str, detail: str = ""):
        self.name, self.looked_in, self.how = name, [str(p) for p in looked_in], how
        where = "\n".join(f"  - {p}" for p in self.looked_in)
        super().__init__(f"dataset {name!r} not found{': ' + detail if detail else ''}.\nLooked in:\n{where}\n"
                         f"How to get it: {how}")


class BadImage(Exception):
    """An image file that cannot be decoded (truncated, corrupt, not an image): the message names it."""

    def __init__(self, path, cause: BaseException | None = None, count: int = 1):
        self.path, self.cause, self.count = str(path), cause, count
        more = f" (and {count - 1} more unreadable image(s))" if count > 1 else ""
        why = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"cannot read image {path}{why}{more}. Replace or remove it, or pass --skip-bad-images "
                         "to leave unreadable images out (their number is reported)")
