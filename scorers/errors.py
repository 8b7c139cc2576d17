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


def check_ranges(config) -> None:
    """Raise :class:`ConfigError` for a field of the dataclass ``config`` outside the ``"min"`` / ``"max"`` or the
    ``"choices"`` its ``field(metadata=...)`` declares (``None`` values pass: they mean "not set")."""
    import dataclasses

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, str) and "choices" in f.metadata:
            check_choice(f.name, value, f.metadata["choices"])
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise ConfigError(f"{f.name} must be {bounds}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices`` (one line, listing them)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def section(cls, prefix: str = "", **defaults):
    """A config dataclass nested in another (a composition such as ``RunConfig``), with the composition's defaults.

    The field's default is ``cls(**defaults)``; the command line and ``--config`` YAML build it from the same
    ``defaults`` plus the values given, so every option is still declared once, in ``cls``. ``prefix`` is put
    before its fields' flat flag names (``prefix="ray_"``: ``--ray-address``).
    """
    import dataclasses
    import functools

    doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    return dataclasses.field(default_factory=functools.partial(cls, **defaults),
                             metadata={"section": cls, "defaults": dict(defaults), "prefix": prefix, "help": doc})
