"""User-facing errors: one line that names the problem and the fix, raised before heavy work."""


class UserError(Exception):
    """A configuration or input problem the user can fix; `run.py` prints it as one line and exits 1."""
