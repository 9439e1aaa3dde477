"""The consumer's batching: take what is ready, wait only when nothing is (unit test, pure logic)."""

from cardpipe.stream.consumer import poll_ready


class ScriptedConsumer:
    """Stands in for confluent_kafka.Consumer: a local queue of ready messages, and ones that arrive
    while ``poll`` waits."""

    def __init__(self, ready: list[str], arriving: list[str] | None = None) -> None:
        self.ready = list(ready)
        self.arriving = list(arriving or [])
        self.calls: list[tuple[str, object, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[str]:
        self.calls.append(("consume", num_messages, timeout))
        taken, self.ready = self.ready[:num_messages], self.ready[num_messages:]
        return taken

    def poll(self, timeout: float) -> str | None:
        self.calls.append(("poll", None, timeout))
        self.ready.extend(self.arriving)
        self.arriving = []
        return self.ready.pop(0) if self.ready else None


def test_ready_messages_are_taken_without_waiting():
    consumer = ScriptedConsumer(ready=[f"m{i}" for i in range(7)])
    assert poll_ready(consumer, 5, 0.1) == ["m0", "m1", "m2", "m3", "m4"]
    assert consumer.calls == [("consume", 5, 0)]  # no wait to fill a batch
    assert poll_ready(consumer, 5, 0.1) == ["m5", "m6"]


def test_nothing_ready_waits_for_the_first_then_takes_what_came_with_it():
    consumer = ScriptedConsumer(ready=[], arriving=["a", "b", "c"])
    assert poll_ready(consumer, 2, 0.25) == ["a", "b"]
    assert consumer.calls == [("consume", 2, 0), ("poll", None, 0.25), ("consume", 1, 0)]
    assert consumer.ready == ["c"]


def test_nothing_arrives():
    consumer = ScriptedConsumer(ready=[])
    assert poll_ready(consumer, 100, 0.05) == []
    assert consumer.calls == [("consume", 100, 0), ("poll", None, 0.05)]


def test_batch_of_one():
    consumer = ScriptedConsumer(ready=[], arriving=["a", "b"])
    assert poll_ready(consumer, 1, 0.05) == ["a"]
    assert consumer.calls == [("consume", 1, 0), ("poll", None, 0.05)]
