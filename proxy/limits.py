"""Limits on one request that the completion services check before any work: how many messages, how many
tokens. (Body size, queue length and time are bounded by Litestar, the manager and the lease.)"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import APIError
from proxy.settings import LimitSettings


@dataclass(frozen=True)
class RequestLimits:
    settings: LimitSettings

    @property
    def max_messages(self) -> int:
        return self.settings.max_messages  # 0: no bound

    @property
    def max_tokens(self) -> int:
        return self.settings.max_tokens_limit  # 0: the context window is the only bound

    def check_messages(self, count: int) -> None:
        if self.max_messages and count > self.max_messages:
            raise APIError(
                400,
                f"The request has {count} messages; this server accepts at most {self.max_messages} (--max-messages)",
                param="messages",
                code="too_many_messages",
            )

    def completion_tokens(self, requested: int | None, param: str) -> int | None:
        """The ``max_tokens`` to generate with: the request's own within the ceiling, or the ceiling."""
        if not self.max_tokens:
            return requested
        if requested is None:
            return self.max_tokens
        if requested > self.max_tokens:
            raise APIError(
                400,
                f"'{param}' is {requested}; this server generates at most {self.max_tokens} tokens per "
                "completion (--max-tokens-limit)",
                param=param,
                code="max_tokens_too_large",
            )
        return requested


NO_LIMITS = RequestLimits(LimitSettings(max_messages=0, max_tokens_limit=0))
