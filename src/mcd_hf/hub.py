"""One clear error when the Hugging Face Hub cannot be reached.

huggingface_hub 2.x talks to the Hub through httpx2, whose errors are not `OSError`s, and offline mode raises its
own error; callers should not need to know either. Everything that downloads or uploads runs inside
`hub_errors_as_unreachable`, which turns those failures into `HubUnreachableError` and lets real errors (a missing
file in a local folder, a bad argument) through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached (no network, a proxy, or `HF_HUB_OFFLINE=1`)."""


def _is_network_error(error: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    # httpx2 / httpx transport errors (ConnectError, ReadTimeout, ...) without importing either eagerly.
    for cls in type(error).__mro__:
        if cls.__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"} and (
            cls.__name__ in {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "ProxyError"}
        ):
            return True
    return False


@contextlib.contextmanager
def hub_errors_as_unreachable(action: str) -> Iterator[None]:
    """Run a block that talks to the Hub; a network failure becomes `HubUnreachableError` saying what failed."""
    try:
        yield
    except HubUnreachableError:
        raise
    except Exception as error:  # noqa: BLE001 - filtered below, everything else re-raised as is
        cause: BaseException | None = error
        while cause is not None:
            if _is_network_error(cause):
                raise HubUnreachableError(
                    f"Could not {action}: the Hugging Face Hub cannot be reached ({type(cause).__name__}: {cause}). "
                    "Check the network or HF_HUB_OFFLINE, or pass a local folder."
                ) from error
            cause = cause.__cause__ or cause.__context__
        raise
