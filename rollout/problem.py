"""`Problem`: one prompt and its reference answer, the unit every task source yields and every verifier scores.

Contract: frozen and picklable (it crosses into Ray actors and the reward process pool). `messages`
(role, content) turns replace `prompt` in chat rendering when a dataset gives a conversation;
`metadata` is JSON text a verifier may read (reasoning-gym's entry metadata); `key` identifies the
prompt for splits and de-duplication.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    task: str
    messages: tuple[tuple[str, str], ...] | None = None
    metadata: str | None = None

    @property
    def key(self) -> str:
        return self.prompt if self.messages is None else repr(self.messages)
