"""The config dataclasses' machinery: value checks read from ``field(metadata=...)``, and nested sections.

Every config dataclass (``TokenizeConfig``, ``ScoringConfig``, ``PartitionConfig``, ``StepwiseConfig``, ...) declares
an option's range or choices once, in its field's metadata; ``check_ranges`` in its ``__post_init__`` is the one
check, and the command line derives its flags from the same fields.
"""

from .errors import ConfigError


def check_ranges(config) -> None:
    """Raise :class:`ConfigError` for a field of the dataclass ``config`` whose value does not fit what its
    ``field(metadata=...)`` declares: ``"min"`` / ``"max"`` (inclusive; for a list, every number in it),
    ``"choices"``. ``None`` values pass where they mean "not set": a range's, and a choice's whose default is
    ``None`` (elsewhere ``None`` is no choice, as any other value outside them).

    A number must also be finite, in every field, ranged or not: NaN would pass every range check (a comparison
    with NaN is false) and mean nothing downstream; no option means by infinity what a large finite value does not
    say as well, and the run records (JSON) would hold a non-standard ``Infinity``.
    """
    import dataclasses

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "choices" in f.metadata and (value is not None or f.default is not None):
            check_choice(f.name, value, f.metadata["choices"])
        for number in value if isinstance(value, (list, tuple)) else (value,):
            check_number(f.name, number, f.metadata)


def check_number(name: str, value, metadata) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number inside the range ``metadata`` declares (see
    :func:`check_ranges`); what is not a number passes (the field's type is checked by its converter)."""
    import math

    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = metadata.get("min"), metadata.get("max")
    bounds = "" if low is None and high is None else f" >= {low}" if high is None else f" <= {high}" if low is None \
        else f" in [{low}, {high}]"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number{bounds}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name} must be{bounds}, got {value!r}")


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
