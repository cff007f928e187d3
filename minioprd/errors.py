"""Errors a user can fix. The library raises these; only `cli.py` catches them and prints one line."""

from __future__ import annotations


class MinioprdError(Exception):
    """A problem with the user's input or environment: the message says what was wrong and what to do."""


class ConfigError(MinioprdError):
    """Every problem found in a config at once (flag, value, allowed range), so one run shows them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
