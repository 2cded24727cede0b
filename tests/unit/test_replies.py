"""Where answers go: a command's reply_to when the appliance may use it, else the shared queue."""

from __future__ import annotations

import pytest

from appliance.replies import UNUSABLE_FOR_S, OwnQueues, ReplyQueues

BASE = "http://127.0.0.1:4566/queue/us-east-1/000000000000"
SHARED = f"{BASE}/rsp"
OWN = OwnQueues(SHARED, frozenset({f"{BASE}/cmd", f"{BASE}/dlq"}))


class Account:
    """The appliance's own account: its queues by name, and how often it was asked."""

    def __init__(self, *names: str) -> None:
        self.queues = {name: f"{BASE}/{name}" for name in names}
        self.lookups: list[str] = []
        self.now = 0.0

    async def lookup(self, name: str) -> str | None:
        self.lookups.append(name)
        return self.queues.get(name)

    def clock(self) -> float:
        return self.now


@pytest.fixture
def account() -> Account:
    return Account("cmd", "dlq", "rsp", "rsp-client-reply", "other-app-queue")


@pytest.fixture
def replies(account: Account) -> ReplyQueues:
    return ReplyQueues(OWN, account.lookup, account.clock)


async def test_no_reply_to_is_the_shared_queue(replies: ReplyQueues, account: Account) -> None:
    assert await replies.destination(None) == SHARED
    assert account.lookups == []


@pytest.mark.parametrize("reply_to", ["rsp-client-reply", f"{BASE}/rsp-client-reply"])
async def test_a_queue_of_our_own_account_by_name_or_url(
    replies: ReplyQueues, account: Account, reply_to: str
) -> None:
    assert await replies.destination(reply_to) == f"{BASE}/rsp-client-reply"
    assert await replies.destination(reply_to) == f"{BASE}/rsp-client-reply"
    assert account.lookups == ["rsp-client-reply"]  # looked up once, then remembered


@pytest.mark.parametrize(
    "reply_to",
    [
        "rsp-no-such-queue",  # not in our account
        "other-app-queue",  # in our account, but not a reply queue of ours
        "cmd",  # answers would come back in as commands
        "dlq",
        f"{BASE}/cmd",
        "http://127.0.0.1:4566/queue/us-east-1/123456789012/rsp-client-reply",  # another account
        "https://sqs.us-east-1.amazonaws.com/000000000000/rsp-client-reply",  # another endpoint
        "x.fifo",  # not a pattern a command may carry
        "http://127.0.0.1:4566/../rsp-client-reply",
    ],
)
async def test_an_unusable_reply_to_falls_back_and_is_logged(
    replies: ReplyQueues, reply_to: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await replies.destination(reply_to) == SHARED
    assert "reply_to unusable" in capsys.readouterr().out


async def test_a_queue_found_unusable_later_is_left_alone_for_a_while(
    replies: ReplyQueues, account: Account
) -> None:
    assert await replies.destination("rsp-client-reply") == f"{BASE}/rsp-client-reply"
    del account.queues["rsp-client-reply"]  # the client went away with its queue
    replies.unusable("rsp-client-reply", "queue does not exist")
    assert await replies.destination("rsp-client-reply") == SHARED
    assert account.lookups == ["rsp-client-reply"]  # no lookup per progress message
    account.queues["rsp-client-reply"] = f"{BASE}/rsp-client-reply"
    account.now += UNUSABLE_FOR_S + 1
    assert await replies.destination("rsp-client-reply") == f"{BASE}/rsp-client-reply"
