"""The exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad size, stale or corrupt bundle); never a bug."""


class RefitError(UserError):
    """A weight swap that failed; `changed` says whether some weights may already have been replaced (the engines
    then hold a mix of old and new weights and must not run again)."""

    def __init__(self, message: str, changed: bool):
        super().__init__(message)
        self.changed = changed
