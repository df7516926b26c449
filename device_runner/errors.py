"""One exception type per domain; the CLI prints ``error: <message>`` and exits 2.

Every message says what is wrong and what to change, so a user on a headless board can fix
it from one line of output.
"""
from __future__ import annotations


class DeviceRunnerError(Exception):
    """Base of every error the runner reports to the user (never a programming error)."""


class BundleError(DeviceRunnerError):
    """The bundle is missing, damaged, of an unknown format version or inconsistent."""


class ProfileError(DeviceRunnerError):
    """The board profile is missing, not YAML or does not match profiles/schema.json."""


class DataError(DeviceRunnerError):
    """The device data cannot be found, read or split."""


class BudgetError(DeviceRunnerError):
    """The run cannot fit the memory or energy budget of the profile."""


class RunError(DeviceRunnerError):
    """A run folder cannot be started or resumed (already used, missing, corrupt checkpoint)."""


class TrustError(DeviceRunnerError):
    """A signing key or a trusted keys folder is missing or not an Ed25519 key (docs/trust.md)."""


class ExportError(DeviceRunnerError):
    """``export-model``: the composed graph is invalid or does not reproduce the run's logits."""
