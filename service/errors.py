"""The service's errors: an HTTP status, a stable machine-readable `code` and a message for people.

Every error response has the body {"error": {"code": ..., "message": ...}}.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def empty_body() -> ApiError:
    return ApiError(400, "empty_body", "the image is empty (zero bytes)")


def bad_image(detail: str) -> ApiError:
    return ApiError(400, "invalid_image", f"the body is not a readable image: {detail}")


def unsupported_format(found: str, allowed: list[str]) -> ApiError:
    return ApiError(415, "unsupported_media_type", f"{found} is not supported; send one of {', '.join(allowed)}")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes")


def too_many_pixels(width: int, height: int, limit: int) -> ApiError:
    return ApiError(413, "image_too_large", f"{width}x{height} = {width * height} pixels exceeds {limit}")


def invalid_parameter(message: str) -> ApiError:
    return ApiError(422, "invalid_parameter", message)


def missing_image() -> ApiError:
    return ApiError(
        422, "missing_image", "send the image as the multipart field `image` or as the raw body with an image/* type"
    )


def queue_full(retry_after_s: int) -> ApiError:
    return ApiError(
        503, "queue_full", "the server is at capacity; retry later", headers={"Retry-After": str(retry_after_s)}
    )


def not_ready(reason: str) -> ApiError:
    return ApiError(503, "not_ready", reason, headers={"Retry-After": "1"})


def timeout(seconds: float) -> ApiError:
    return ApiError(504, "timeout", f"the request was not answered within {seconds:g} s")


def client_closed() -> ApiError:
    """Nginx's 499: counted in the metrics; the client that left never reads it."""
    return ApiError(499, "client_closed", "the client closed the connection")


def inference_failed(error_id: str) -> ApiError:
    return ApiError(500, "inference_failed", f"inference failed; the server log has error id {error_id}")


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
