"""The one base class of errors a user can fix.

Every error raised for the user (bad input, a missing file, settings that cannot work, an optional dependency
that is not installed) derives from :class:`UserError`; the ``sdpo`` command line prints its first line as
``sdpo: error: ...`` and exits 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Something the user can fix; the message is one line that says what and how."""


class ConfigError(UserError):
    """A configuration value that cannot work (raised by the config dataclasses' ``__post_init__``)."""


class MissingDependencyError(UserError):
    """An optional dependency is not installed; the message gives the install command."""
