"""The exceptions of flashtensors.

Every error of the SDK is a `FlashError`; the specific ones also derive from
the built-in exception a caller would expect, so `except LookupError` or
`except ConnectionError` work too.
"""


class FlashError(Exception):
    """Base class of every flashtensors error."""


class ModelNotFoundError(FlashError, LookupError):
    """The model is not in the store (register it first)."""

    def __str__(self):  # LookupError subclasses (KeyError) would quote the message
        return str(self.args[0]) if self.args else ""


class DaemonNotRunningError(FlashError, ConnectionError):
    """Nothing answers on the daemon's socket (call `configure()` or run `flash start`)."""


class BudgetFullError(FlashError, MemoryError):
    """The tier has no room for the model; the message names what holds it."""


class DeviceError(FlashError, ValueError):
    """A device that does not exist or cannot be used (wrong GPU id, no CUDA)."""


class InvalidRequestError(FlashError, ValueError):
    """The request is wrong: a bad name, tier, dtype or argument."""


class FormatError(FlashError, ValueError):
    """A checkpoint or model folder that cannot be read."""
