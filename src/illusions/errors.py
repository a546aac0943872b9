"""The one exception type for bad user input; the CLI prints it as a one-line error, exit code 2."""


class IllusionsError(Exception):
    """A problem with the user's input (a file, a name, a value out of range).

    The message is a complete sentence meant for the user: the CLI prints it as one line and exits
    with code 2, with no traceback.
    """
