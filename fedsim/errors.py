"""Errors a user can act on. The CLI prints them without a traceback (exit 1)."""


class RunError(RuntimeError):
    """A run that could not start or finish, with a message saying why and what to do."""


class ResumeError(RunError):
    """A run directory that cannot be resumed (no intact checkpoint, or a different setup); exit 2."""
