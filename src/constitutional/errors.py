"""The one exception type the CLI turns into a single error line and exit code 2, and the redaction of
secrets (API keys) from any text the tool prints or stores."""


class CaiError(Exception):
    """Bad input from the user: a malformed file, a missing path, a wrong config key.

    The message is one line that names what is wrong (the file, the key, the line).
    The CLI prints it as ``cai: error: <message>`` and exits with code 2.
    """


_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a secret (an API key as read from the environment) so that ``redact`` removes it."""
    for text in {value, value.strip()}:
        if len(text) >= 4:
            _SECRETS.add(text)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[secret]``.

    >>> register_secret("sk-test-1234")
    >>> redact("Invalid header value b'Bearer sk-test-1234\\\\r'")
    "Invalid header value b'Bearer [secret]\\\\r'"
    """
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "[secret]")
        text = text.replace(repr(secret)[1:-1], "[secret]")  # as it appears inside a bytes or str repr
    return text


def yaml_problem(error: Exception) -> str:
    """A YAML parse error in one line: where it is and what is wrong (PyYAML prints several lines with
    a caret drawing)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {getattr(error, 'problem', None) or str(error).splitlines()[0]}"
