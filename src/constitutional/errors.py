"""The one exception type the CLI turns into a single error line and exit code 2."""


class CaiError(Exception):
    """Bad input from the user: a malformed file, a missing path, a wrong config key.

    The message is one line that names what is wrong (the file, the key, the line).
    The CLI prints it as ``cai: error: <message>`` and exits with code 2.
    """
