"""What the stream leaves undecided, counted mostly while its last messages are decided.

``consume`` finishing the stream asks, once the topic is drained, how many transactions of the database have no
decision yet (:func:`~cardpipe.serving.transaction_source.count_undecided`). That is an anti-join of every
transaction with every decision: on MySQL/MariaDB about a second at 500,000, after the last decision.

Its answer can be prepared: ``transactions`` does not change while a consumer runs (``load`` and ``setup`` hold
the database exclusively, :mod:`cardpipe.orchestration.locks`) and decisions are only ever added, so the
transactions undecided at the end are those undecided at any earlier moment that still have no decision.
:class:`UndecidedAhead` watches the checkpoint log; when the messages left are about as many as the consumers
decide while the anti-join runs, it lists the undecided ids, then looks them up again now and then, keeping those
still undecided. Once the topic is drained, :meth:`UndecidedAhead.count` looks up the last of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from itertools import islice

from sqlalchemy import Engine, func, select

from cardpipe.serving import schema
from cardpipe.serving.transaction_source import count_undecided, still_undecided, undecided_ids

__all__ = ["UndecidedAhead"]

log = logging.getLogger(__name__)

#: How often the checkpoint log is read, and the undecided ids looked up again at most.
POLL_SECONDS = 0.2

#: The span of checkpoints the consumers' rate is measured over.
RATE_WINDOW_SECONDS = 2.0

#: How long before the end the undecided ids are listed: this much, plus :data:`LEAD_SECONDS_PER_TRANSACTION`
#: for each transaction (the anti-join reads them all).
LEAD_SECONDS = 0.5
LEAD_SECONDS_PER_TRANSACTION = 2e-6


class UndecidedAhead:
    """The count of undecided transactions once ``topic`` is drained, mostly computed before (module docstring).

    ``transactions``: how many the database holds undecided now (it sets how long before the end to begin, and
    what is left while a consumer does not know its lag yet).
    :meth:`start` before the consumers start, :meth:`count` once they stopped, :meth:`close` in any case (a daemon
    thread: the interpreter does not wait for it).
    """

    def __init__(self, engine: Engine, topic: str, transactions: int) -> None:
        self.engine, self.topic, self.transactions = engine, topic, transactions
        self.lead_seconds = LEAD_SECONDS + LEAD_SECONDS_PER_TRANSACTION * transactions
        self._ids: list[int] | None = None  # listed, and looked up again since
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="undecided-ahead", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def count(self) -> int:
        """How many transactions are undecided now (the consumers having stopped): the ids listed ahead looked up
        once more, or :func:`count_undecided` when none were listed (the stream ended first, or a read failed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()  # it ends the query it runs first: the listing, that is the count's own work
        if self._ids is None:
            return count_undecided(self.engine)
        return len(still_undecided(self.engine, self._ids))

    def close(self) -> None:
        """Stop the thread without waiting for it (on Ctrl-C, say: the listing can take seconds at 10M); a query it
        runs on meanwhile ends in an error it only logs."""
        self._stop.set()

    def _run(self) -> None:
        try:
            if not self._wait_for_the_end():
                return
            began = time.perf_counter()
            ids = undecided_ids(self.engine)
            self._ids = ids
            log.debug("%d undecided ids listed ahead in %.2f s", len(ids), time.perf_counter() - began)
            while ids and not self._stop.wait(POLL_SECONDS):
                ids = still_undecided(self.engine, ids)
                self._ids = ids
        except Exception as exc:  # the count is then made after the drain, as without this
            self._ids = None
            log.debug("counting the undecided ahead stopped: %s", exc)

    def _wait_for_the_end(self) -> bool:
        """Read the checkpoint log until the messages left are no more than the consumers decide (their rate over
        :data:`RATE_WINDOW_SECONDS`) in :attr:`lead_seconds`; False when stopped first. The messages left: the
        consumers' lags after their last checkpoints, once each knows its own (a consumer knows it once it has read
        from every partition it holds); until then, the transactions undecided at the start less the messages
        decided since."""
        log_ = schema.stream_checkpoint_log
        with self.engine.connect() as conn:
            last = conn.execute(select(func.max(log_.c.checkpoint_id))).scalar() or 0
        query = (
            select(
                log_.c.checkpoint_id,
                log_.c.owner,
                log_.c.committed_ms,
                log_.c.messages,
                log_.c.duplicates,
                log_.c.lag_messages,
            )
            .where(log_.c.topic == self.topic)
            .order_by(log_.c.checkpoint_id)
        )
        lags: dict[str, int | None] = {}
        decided = 0
        recent: deque[tuple[int, int]] = deque()  # (committed_ms, messages) within the rate's window
        while not self._stop.wait(POLL_SECONDS):
            with self.engine.connect() as conn:
                rows = conn.execute(query.where(log_.c.checkpoint_id > last)).all()
            for checkpoint_id, owner, committed_ms, messages, duplicates, lag in rows:
                last = checkpoint_id
                lags[owner] = lag
                decided += messages - duplicates
                recent.append((committed_ms, messages))
            if not recent:
                continue
            newest = recent[-1][0]
            while recent and recent[0][0] < newest - RATE_WINDOW_SECONDS * 1000:
                recent.popleft()
            span = (newest - recent[0][0]) / 1000
            if span <= 0:
                continue
            rate = sum(messages for _, messages in islice(recent, 1, None)) / span  # the first one's came before
            known = [lag for lag in lags.values() if lag is not None]
            left = sum(known) if len(known) == len(lags) else max(0, self.transactions - decided)
            if left <= rate * self.lead_seconds:
                log.debug("%d messages left at %.0f a second: listing the undecided ids", left, rate)
                return True
        return False
