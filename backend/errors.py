"""The error every layer of the service raises for a request it can't answer."""


class ServiceError(Exception):
    """A request the service can't answer; ``status`` is the HTTP status to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
