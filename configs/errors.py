"""The one error type for bad user input. The CLI prints its message on one line, exit code 2."""


class ConfigError(ValueError):
    """Bad input: an unknown key, a wrong type, an impossible combination, an unreadable file.

    The message names the key and what is allowed, and fits on one line.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
