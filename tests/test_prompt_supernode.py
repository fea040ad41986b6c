"""The SuperNode's prompt polling: Flower's fixed 3 s idle sleep is cut only while busy."""

from __future__ import annotations

import pytest

from fedsynth.deploy import launch, prompt_pulls
from fedsynth.deploy.prompt_supernode import BUSY_WINDOW_S, PromptPoll, install


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_idle_sleep_is_short_only_within_the_busy_window():
    clock = Clock()
    poll = PromptPoll(0.5, clock=lambda: clock.now, sleep=clock.sleep)
    poll.sleep(3)  # no message yet: Flower's 3 s
    poll.received()
    for _ in range(6):  # empty polls after a message: 50 ms, doubling up to poll_s
        poll.sleep(3)
    poll.received()
    poll.sleep(3)  # a new message starts again from 50 ms
    poll.sleep(0.5)  # the local wait for the ClientApp's reply, while busy
    poll.sleep(1)  # any other sleep is left alone
    clock.now += BUSY_WINDOW_S
    poll.sleep(3)  # idle again
    poll.sleep(0.5)
    assert clock.slept == [3, 0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.05, 0.05, 1, 3, 0.5]
    assert poll.monotonic is not None  # everything else is the real time module


@pytest.mark.parametrize("poll_s", [0.0, 0.01, 5.0])
def test_a_poll_interval_out_of_range_is_refused(poll_s):
    with pytest.raises(ValueError, match="poll_s must be between"):
        PromptPoll(poll_s)


def test_install_patches_this_flwr_supernode_loop_and_notes_messages(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    monkeypatch.setattr(loop, "_pull_and_store_message", lambda *a, **k: 7)
    poll = install(0.25)
    assert poll is not None and loop.time is poll
    assert loop.pull_objects.fedsynth_prompt and inflatable_utils.pull_objects.fedsynth_prompt
    assert loop._pull_and_store_message() == 7
    assert poll.last_message > float("-inf")


def test_node_join_starts_the_supernode_through_the_prompt_poll():
    cmd = launch.supernode_command(
        "link:9092", {"institution": "a"}, root_certificates=None, poll_s=0.5
    )
    assert cmd[1:5] == ["-m", "fedsynth.deploy.prompt_supernode", "--poll-s", "0.5"]
    assert cmd[5] == "--superlink"
    stock = launch.supernode_command("link:9092", {"institution": "a"}, root_certificates=None)
    assert stock[0].endswith("flower-supernode")


def test_prompt_pulls_retry_first_after_50_ms_and_leave_the_rest_to_flower():
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
    from flwr.supercore.inflatable.inflatable_utils import pull_objects as flower_pull

    waits: list[float] = []
    tries = {"a": 0}

    def pull_object(object_id: str) -> bytes:
        tries[object_id] += 1
        if tries[object_id] < 4:  # not there for the first three asks
            raise ObjectUnavailableError(object_id)
        return b"content"

    class Recorder:
        """Flower's pull_objects, with its backoff waits recorded instead of slept."""

        def __call__(self, *args, **kwargs):
            waits.append(kwargs["initial_backoff"])
            return flower_pull(*args, **kwargs)

    pull = prompt_pulls.prompt(Recorder())
    assert pull(["a"], pull_object) == {"a": b"content"}
    assert waits == [prompt_pulls.INITIAL_BACKOFF_S] and tries["a"] == 4
    assert pull(["a"], pull_object, initial_backoff=0.01) == {"a": b"content"}
    assert waits[-1] == 0.01  # a shorter wait asked for is kept
    assert prompt_pulls.prompt(pull) is pull  # wrapping twice changes nothing
