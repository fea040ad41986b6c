"""PromptGrid's reply loop. The deployment test (tests/test_deployment.py, slow) runs it
against a real SuperLink; here a scripted grid makes replies arrive after a set number of
pulls, so that the loop's collecting, waiting and timeout are checked exactly."""

import time
from types import SimpleNamespace

import pytest
from flwr.serverapp.grid import Grid

from fedsynth.server.prompt_grid import PromptGrid


class ScriptedGrid(Grid):
    """Message ``i`` is answered on the ``ready[i]``-th pull (never if None)."""

    def __init__(self, ready):
        self.ready = ready
        self.pulls = 0

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        due = [m for m in message_ids if self.ready[int(m)] == self.pulls]
        return [_reply_to(m) for m in due]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not call Flower's 3 s loop")


def _reply_to(message_id):
    """What the loop reads of a reply (a real Message needs a run's identity)."""
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


def test_collects_every_reply_pulling_at_its_own_interval():
    inner = ScriptedGrid(ready=[1, 3, 2])
    grid = PromptGrid(inner, interval=0.01)
    started = time.monotonic()
    replies = grid.send_and_receive([object()] * 3, timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert inner.pulls == 3  # stops as soon as the last reply came
    assert time.monotonic() - started < 1


def test_returns_what_came_when_the_timeout_passes():
    inner = ScriptedGrid(ready=[1, None])
    replies = PromptGrid(inner, interval=0.01).send_and_receive([object()] * 2, timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert inner.pulls > 2


def test_passes_other_calls_through_and_refuses_a_bad_interval():
    assert list(PromptGrid(ScriptedGrid([])).get_node_ids()) == [1, 2, 3]
    with pytest.raises(ValueError, match="interval must be > 0"):
        PromptGrid(ScriptedGrid([]), interval=0)


def test_prompt_replies_makes_the_serverapps_reply_pulls_retry_promptly(monkeypatch):
    from flwr.superlink.grid import http_grid

    from fedsynth.server.prompt_grid import prompt_replies

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after
    assert not getattr(http_grid.pull_objects, "fedsynth_prompt", False)
    assert prompt_replies()
    assert http_grid.pull_objects.fedsynth_prompt
