"""User-facing errors: the CLI turns these into one clear line and a non-zero exit."""


class PrunepilotError(Exception):
    """An error the user can act on (bad argument, missing file, unsupported model ...)."""
