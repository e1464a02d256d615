"""The one exception type that reaches users.

Every mistake a user can make (unknown model, bad ratio, missing corpus, offline without a local copy) raises
:class:`PrunekitError` with a one-line message naming what is wrong and what to do. The CLI prints that line and
exits with status 2; anything else that escapes is a bug in prunekit.
"""


class PrunekitError(Exception):
    """A user-facing error whose message is a single actionable line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
