"""The one exception type for bad user input; the CLI prints it as a one-line error, exit code 2."""


class IllusionsError(Exception):
    """A problem with the user's input (a file, a name, a value out of range).

    The message is a complete sentence meant for the user: the CLI prints it as one line and exits
    with code 2, with no traceback.
    """


class InvalidOption(IllusionsError):
    """A bad value of one named parameter (``rank must be at least 1, got 0``).

    ``option`` is the parameter's name in the library (``ranks``, ``max_seqs``); ``detail`` the rest
    of the sentence. The CLI rewrites the name as the flag the user typed (``--rank``), so library
    messages speak of parameters and the command line of flags. ``whole=True`` marks a detail that
    is already a complete sentence (e.g. a simplifier's own error), printed as it is.
    """

    def __init__(self, option: str, detail: str, *, whole: bool = False) -> None:
        self.option = option
        self.detail = detail
        self.whole = whole
        super().__init__(detail if whole else f"{option} {detail}")
