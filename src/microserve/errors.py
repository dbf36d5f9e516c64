"""Errors that carry their HTTP meaning, raised by services and engines, rendered by the server."""

from __future__ import annotations


class ServiceError(Exception):
    """An error a client should see, in OpenAI's shape: message, type, param, code and an HTTP status."""

    status_code = 500
    error_type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, dict[str, str | None]]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(ServiceError):
    """A field value the service cannot honour (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ServiceError):
    """The request names a model this service does not serve (404)."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            f"The model `{model}` does not exist. Served models: {', '.join(served)}.",
            param="model",
            code="model_not_found",
        )


class NoModelForRoute(ModelNotFound):
    """The request names no model and the service serves none for its route (404, like a model that does not
    exist: the route's default model is absent)."""

    def __init__(self, route: str) -> None:
        ServiceError.__init__(self, f"this service serves no model for {route}", param="model", code="model_not_found")


class Forbidden(ServiceError):
    """A request for something this client may not reach, such as a path outside a served directory (403)."""

    status_code = 403
    error_type = "permission_error"


class NotFound(ServiceError):
    """A resource other than a model that does not exist (404)."""

    status_code = 404
    error_type = "not_found_error"


class NotReady(ServiceError):
    """The engine is loading or draining (503)."""

    status_code = 503
    error_type = "service_unavailable"


class EngineFailure(ServiceError):
    """The engine failed while serving this request (500); the service itself stays up."""

    status_code = 500
    error_type = "internal_server_error"
