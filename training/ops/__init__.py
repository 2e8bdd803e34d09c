"""Operations: the `toothseg` command line, the native stack of services, Label Studio's
bootstrap, and the status, history and training progress shown to people."""


class CLIError(ValueError):
    """An expected failure of a `toothseg` command (bad input, an unreachable service): printed as
    one line on stderr, exit code 2 (`training.ops.cli.main`)."""
