"""Stillhouse's exception tree. The CLI maps each to one line and an exit code, in one place."""

from __future__ import annotations


class StillhouseError(Exception):
    """A failure a user can understand and act on (no traceback needed)."""

    exit_code = 1


class ConfigError(StillhouseError):
    """The configuration file or an environment override is invalid."""

    exit_code = 2


class UsageError(StillhouseError):
    """A command was called with arguments that cannot work (a missing model path...)."""

    exit_code = 2


class EngineError(StillhouseError):
    """An inference engine could not be started, or died."""


class EngineStartError(EngineError):
    """The engine exited or missed its readiness deadline; the message quotes its log tail."""


class DemoBuildError(StillhouseError):
    """The demo world could not be built."""
