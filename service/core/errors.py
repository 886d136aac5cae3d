"""Every way an event can fail, with the dead-letter code each one carries.

```
class                                  code                      fault    retriable
GuardstreamError                       internal_error            service
├── EventRejected                      (the record itself is bad; dead-letter it)
│   ├── EventTooLarge                  event_too_large           input
│   ├── InvalidJson                    invalid_json              input
│   ├── InvalidEvent                   invalid_event             input
│   ├── UnknownPolicy                  unknown_policy            input
│   ├── PolicyNotAllowed               policy_not_allowed        input
│   ├── UnknownTenant                  unknown_tenant            input
│   ├── UrlNotSupported                url_not_supported         input
│   ├── UrlForbidden                   url_forbidden             input
│   ├── ImageTooLarge                  image_too_large           input
│   ├── UnsupportedImageFormat         unsupported_image_format  input
│   └── ImageDecodeFailed              image_decode_failed       input
├── FetchFailed                        fetch_failed              input
│   └── FetchTimeout                   fetch_timeout             input
├── DeadlineExceeded                   deadline_exceeded         service
├── GuardFailed                        (the guard model could not answer)
│   ├── GuardUnavailable               guard_unavailable         service  yes
│   └── GuardError                     guard_error               service
└── UnparseableModelOutput             unparseable_model_output  service
```

`retriable` says whether trying the same event again may succeed; the pipeline decides what to
do with that, nothing else reads it. `fault` says whose problem a dead letter is, for alerts and
the on-call engineer: `input` (the producer sent what cannot be judged, or a URL its own host
would not serve) or `service` (guardstream or its guard failed: ours to fix). Library errors
(Pillow, tritonclient, pydantic) are translated into these at the module that calls the
library, so callers never see them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

Fault = Literal["input", "service"]


class GuardstreamError(Exception):
    """Root of every error that ends an event as a dead letter."""

    code: ClassVar[str] = "internal_error"
    retriable: ClassVar[bool] = False
    fault: ClassVar[Fault] = "service"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EventRejected(GuardstreamError):
    """The record cannot be judged as it is; trying again will not change that."""

    fault = "input"


class EventTooLarge(EventRejected):
    code = "event_too_large"


class InvalidJson(EventRejected):
    code = "invalid_json"


class InvalidEvent(EventRejected):
    code = "invalid_event"


class UnknownPolicy(EventRejected):
    code = "unknown_policy"


class PolicyNotAllowed(EventRejected):
    """The event's tenant may not use the policy the event names (see the tenant file)."""

    code = "policy_not_allowed"


class UnknownTenant(EventRejected):
    """The event names a tenant the tenant file does not list, and the service is set to
    dead-letter those (`unknown_tenant = "dead-letter"`)."""

    code = "unknown_tenant"


class UrlNotSupported(EventRejected):
    code = "url_not_supported"


class UrlForbidden(EventRejected):
    """The URL points where this service does not fetch from (SSRF defence), or is malformed."""

    code = "url_forbidden"


class ImageTooLarge(EventRejected):
    code = "image_too_large"


class UnsupportedImageFormat(EventRejected):
    code = "unsupported_image_format"


class ImageDecodeFailed(EventRejected):
    code = "image_decode_failed"


class FetchFailed(GuardstreamError):
    """The image URL could not be fetched: DNS, connection, HTTP status, redirects."""

    code = "fetch_failed"
    # The producer's URL, on its host: a wave of these that is ours (egress, DNS) shows as
    # every host failing at once, which the runbook tells apart.
    fault = "input"


class FetchTimeout(FetchFailed):
    code = "fetch_timeout"


class DeadlineExceeded(GuardstreamError):
    """The event took longer than its deadline: a poison pill must not hold its partition."""

    code = "deadline_exceeded"


class GuardFailed(GuardstreamError):
    """The guard model gave no answer."""


class GuardUnavailable(GuardFailed):
    """Triton could not be reached, timed out or shed load: the same request may work later."""

    code = "guard_unavailable"
    retriable = True


class GuardError(GuardFailed):
    """Triton refused the request (bad input, missing model): it will fail again."""

    code = "guard_error"


class UnparseableModelOutput(GuardstreamError):
    """The guard answered, but not in a form the policy's answer parser can read."""

    code = "unparseable_model_output"

    def __init__(self, message: str, model_output: str) -> None:
        super().__init__(message)
        self.model_output = model_output


def _classes_from(error: type[GuardstreamError]) -> list[type[GuardstreamError]]:
    """`error` and every subclass below it, depth first."""
    return [error, *(cls for sub in error.__subclasses__() for cls in _classes_from(sub))]


DEAD_LETTER_FAULTS: dict[str, Fault] = {
    cls.code: cls.fault for cls in _classes_from(GuardstreamError) if "code" in vars(cls)
}
"""Each dead-letter code's fault (`input` or `service`), from the class that names the code (an
intermediate class such as EventRejected inherits its parent's code, not its fault)."""

DEAD_LETTER_CODES: tuple[str, ...] = tuple(
    dict.fromkeys(cls.code for cls in _classes_from(GuardstreamError))
)
"""Every code a dead letter can carry, in the order of the tree above; `internal_error` (the root's
code) marks a bug in guardstream itself. Collected from the classes when this module is imported:
the dead-letter schema lists these, so an error class belongs here, not in another module."""
