"""The errors vtap reports, split by what the user should do about them.

ValidationError and Unsupported are usage errors (exit 2): nothing was changed.
OperationFailed is a failure of the platform (exit 1). TemporaryError is
retried with backoff before it becomes an OperationFailed.
"""


class VtapError(Exception):
    """Base class: its message is the one line shown to the user."""

    exit_code = 1


class ValidationError(VtapError):
    """Bad input: names the field and the rule it broke."""

    exit_code = 2

    def __init__(self, field, rule):
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class Unsupported(VtapError):
    """A feature a driver cannot realize, refused before anything changes."""

    exit_code = 2

    def __init__(self, driver, feature, hint=""):
        self.driver = driver
        self.feature = feature
        message = f"driver {driver} cannot do {feature}"
        super().__init__(f"{message}: {hint}" if hint else message)


class NotFound(VtapError):
    """A name the user gave (session, flow, VM, interface) does not exist."""

    exit_code = 2


class AlreadyExists(VtapError):
    exit_code = 2


class OperationFailed(VtapError):
    """The platform refused or failed; the command rolled back what it did."""

    exit_code = 1


class TemporaryError(OperationFailed):
    """Worth retrying (lost connection, busy daemon, version conflict)."""

    def __init__(self, message, delay=1.0):
        self.delay = delay
        super().__init__(message)


class DriverLoadError(OperationFailed):
    def __init__(self, driver, missing):
        super().__init__(f"driver {driver} failed to load: {missing}")
