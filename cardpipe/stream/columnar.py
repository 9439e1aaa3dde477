"""Deciding a polled batch column by column with Apache Arrow, when every message has the common shape. Pure.

The per-message path (:func:`~cardpipe.stream.codec.decode_fields`, :meth:`Authorizer.decide
<cardpipe.domain.authorization.Authorizer.decide>`) defines what is accepted and how it is decided. This path
takes a batch only when every message is one the codec's fast path takes, decides it with the same rules as
Arrow kernels over the batch's columns, and gives the same decisions; any batch it does not take (a message of
another shape, an unknown card, a transaction twice in the batch or decided before) goes to the per-message path
whole. It needs ``pyarrow`` (the ``fast`` extra), imported by the first :class:`ColumnarDecider` (on a thread of
its own for a consumer: :func:`load`).

What a batch must be to be taken, and why each check gives the per-message path's answer:

* every value is ``bytes`` of at most 1,024 bytes holding no line break, no ``\\u`` escape (so no lone
  surrogate and no escaped control character) and no byte order mark, in UTF-8; joined by line breaks they are
  one JSON object per line. Arrow's reader, given the topic's schema, fails on a duplicate key, an unexpected
  field, a value of another JSON type (a number as a text, ``1.0`` or ``true`` as an id), an id beyond int64,
  anything not JSON; the row count must equal the message count (two objects in one value);
* the required fields present (not null), the ids positive, the texts within their lengths and free of control
  characters, the transaction type one of SPEC's, the timestamp ``YYYY-MM-DD HH:MM:SS`` of a real date and
  time (Arrow's parse, with its day the day written: no second 60, no 30 February, no year 0), the
  amount a text of plain cents (money's fast path);
* every card known to the authorizer (after loading the batch's new cards), with a limit and balance in cents.

The rules (SPEC §3, :func:`cardpipe.domain.authorization._decline_reason`) in integer cents, exactly:
``abs(amount) >= limit / 2`` is ``2 * abs(amount) >= limit``; the location rule compares the first character
of the last word of the location (5 characters at least) with the owner's; ``pending + amount > limit``. The
balance each transaction is judged on is the card's balance before the batch plus what its earlier transactions
in the batch moved, taken all at once as if every one not declined by the first two rules went pending (a running
sum per card); that holds up to a card's first transaction over its limit, and from it on that card's
transactions are judged one by one, in order, on the balance as it runs (a declined one moves nothing).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import compress, repeat
from operator import is_, itemgetter
from typing import TYPE_CHECKING, Any, cast

from cardpipe.domain.authorization import Authorizer, CardTerms, zip_head, zip_of
from cardpipe.domain.checks import TRANSACTION_TYPES
from cardpipe.domain.money import from_cents, to_cents
from cardpipe.domain.records import (
    AMOUNT_OVER_HALF_LIMIT,
    DECLINED,
    LOCATION_TOO_FAR,
    OVER_CREDIT_LIMIT,
    PENDING,
)
from cardpipe.errors import ConfigError

# Arrow's modules, imported by the first :class:`ColumnarDecider` (not at import: a consumer that never takes
# this path does not pay for them), possibly on a thread of its own (:func:`load`).
pa: Any = None
pc: Any = None
pa_json: Any = None
_loader: threading.Thread | None = None
_loading, _importing = threading.Lock(), threading.Lock()

if TYPE_CHECKING:
    from cardpipe.stream.checkpoints import CardState, DecisionRow

#: Longest message this path reads (the codec's fast path reads longer ones only after a nesting check).
MAX_BYTES = 1024
_BLOCK_BYTES = 1 << 19  # of a batch, that Arrow reads on one of its threads (more than a message: MAX_BYTES)
_REQUIRED = ("transaction_id", "card_id", "merchant_name", "timestamp", "amount", "location", "transaction_type")
_FORBIDDEN = "[\\x00-\\x1f\\x7f-\\x9f]"  # checks.FORBIDDEN_IN_TEXT but the surrogates, which Arrow's UTF-8 cannot hold
_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
#: records.CANONICAL_TIMESTAMP, the seconds 00-59 (Arrow's parse takes 60 and 61)
_TIMESTAMP_SHAPE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-5][0-9]$"
_FIRST_SECOND = -62135596800  # 0001-01-01 00:00:00 in seconds since the epoch
_PLAIN_CENTS = r"^-?[0-9]{1,10}\.[0-9]{2}$"  # money's fast path (its Decimal is the exact text)
_LAST_WORD = r"(?P<word>[^ ]+) *$"  # an ASCII location's only whitespace is the space (the rest are controls)
_REASONS = (AMOUNT_OVER_HALF_LIMIT, LOCATION_TOO_FAR, OVER_CREDIT_LIMIT)
_third, _fourth = itemgetter(2), itemgetter(3)  # of a card's terms: its owner's zip head, its limit in cents


def available() -> bool:
    """Whether Arrow is installed (the ``fast`` extra), so that batches can be taken here."""
    return pa is not None or importlib.util.find_spec("pyarrow") is not None


def wanted(setting: str) -> bool:
    """Whether consumers take this path, for ``CARDPIPE_COLUMNAR``: ``auto`` when pyarrow is installed, ``on``
    (an error without it), ``off``."""
    if setting == "off":
        return False
    if available():
        return True
    if setting == "on":
        raise ConfigError("CARDPIPE_COLUMNAR=on needs pyarrow: pip install 'cardpipe[fast]' (or set it to auto)")
    return False


#: Arrow's own setting of its allocator. Unless it is set, this path's Arrow allocates with the C library's
#: ``malloc`` rather than Arrow's default (mimalloc), which hands the pages a batch freed back to the kernel and
#: has them faulted in again, zeroed, for the next batch: measured in ``docs/performance.md`` (stop 36).
ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def load(*, background: bool = False) -> None:
    """Import Arrow now, or on a thread of its own: a consumer's first batches then go the per-message way
    instead of waiting for it (:meth:`ColumnarDecider.read` takes a batch once it is there)."""
    global _loader
    if pa is not None:
        return
    if not background:
        _load_arrow()
        return
    with _loading:
        if _loader is None:
            _loader = threading.Thread(target=_load_arrow, name="import-pyarrow", daemon=True)
            _loader.start()


def _load_arrow() -> None:
    global pa, pc, pa_json
    with _importing:
        if pa is None:
            import pyarrow
            import pyarrow.compute
            import pyarrow.json

            if ARROW_POOL_VARIABLE not in os.environ:
                pyarrow.set_memory_pool(pyarrow.system_memory_pool())
            pc, pa_json = pyarrow.compute, pyarrow.json
            pa = pyarrow  # last: ``pa`` set means all three are


@dataclass
class DecidedColumns:
    """A batch's decisions as columns, in message order: the transaction's fields as the message gave them (the
    timestamp and the amount as their texts), the decision with its money in cents, and where each came from."""

    transaction_id: list[int]
    card_id: list[int]
    merchant_name: list[str]
    timestamp: list[str]  # YYYY-MM-DD HH:MM:SS
    amount: list[str]  # plain cents text, as the message wrote it
    location: list[str]
    transaction_type: list[str]
    related_transaction_id: list[int | None]
    status: list[str]
    pending_balance: list[int]  # cents, the card's pending balance after the decision
    decline_reason: list[str | None]
    credit_limit: list[int]  # cents, the limit the transaction was judged against
    partition: list[int]
    #: Per card of the batch, in order of first appearance: its pending balance after the batch (cents) and how
    #: many of its decisions went pending (``card_states``).
    card_balances: dict[int, int]
    card_pending_added: Counter[int]

    def __len__(self) -> int:
        return len(self.transaction_id)

    def rows(self) -> list[DecisionRow]:
        """The decisions as the per-message path makes them (``Decimal`` money, ``datetime`` timestamps)."""
        from cardpipe.stream.checkpoints import DecisionRow

        return [
            DecisionRow(row)
            for row in zip(
                self.transaction_id,
                self.card_id,
                self.merchant_name,
                map(datetime.fromisoformat, self.timestamp),
                map(Decimal, self.amount),
                self.location,
                self.transaction_type,
                self.related_transaction_id,
                self.status,
                map(from_cents, self.pending_balance),
                self.decline_reason,
                strict=True,
            )
        ]

    def card_states(self) -> dict[int, CardState]:
        """The batch's ``card_states`` as the per-message path makes them."""
        from cardpipe.stream.checkpoints import CardState

        added = self.card_pending_added
        return {c: CardState(c, from_cents(b), added.get(c, 0)) for c, b in self.card_balances.items()}

    def positions(self) -> list[tuple[int, Decimal]]:
        """Per decision, (its partition, the limit it was judged against), as the per-message path gives them."""
        return list(zip(self.partition, map(from_cents, self.credit_limit), strict=True))


@dataclass
class ColumnarOutcome:
    """What :meth:`ColumnarDecider.decide` decided: the decisions with the cards' states after the batch
    (:class:`DecidedColumns`), and the checkpoint's counts."""

    columns: DecidedColumns
    counts: Counter[str]


class ColumnarDecider:
    """Reads and decides whole batches (see the module's docstring); one per :class:`StreamProcessor`."""

    def __init__(self, *, background: bool = False) -> None:
        """``background``: import Arrow on a thread (:func:`load`); batches go the per-message way meanwhile."""
        if not available():
            raise RuntimeError("the columnar path needs pyarrow (pip install 'cardpipe[fast]')")
        load(background=background)
        self._parse: Any = None  # Arrow's reading options, made once Arrow is imported (:meth:`_ready`)
        # The running balances this path moved, in cents; the authorizer's (``Decimal``) get them back before the
        # per-message path decides (:meth:`hand_back`), and forget them after it did (:meth:`forget`).
        self._balances: dict[int, int] = {}
        self._moved: set[int] = set()

    def hand_back(self, authorizer: Authorizer) -> None:
        """Write the balances this path moved into ``authorizer`` (before it decides a message itself)."""
        for card_id in self._moved:
            authorizer.balances[card_id] = from_cents(self._balances[card_id])
        self._moved.clear()

    def forget(self, card_ids: Iterable[int]) -> None:
        """Drop the cents of cards whose balance the per-message path may have moved."""
        for card_id in card_ids:
            self._balances.pop(card_id, None)

    def _ready(self) -> bool:
        """Whether Arrow is imported (then the reading options are made, once)."""
        if self._parse is None:
            if pa is None:
                return False
            self._read = pa_json.ReadOptions(use_threads=True, block_size=_BLOCK_BYTES)
            self._types = pa.array(sorted(TRANSACTION_TYPES), pa.string())
            self._parse = pa_json.ParseOptions(explicit_schema=_wire_schema(), unexpected_field_behavior="error")
        return True

    def read(self, values: Sequence[Any]) -> Any | None:
        """The batch's messages as one Arrow table of the topic's fields, if every one has the common shape (and
        Arrow is imported)."""
        if not self._ready():
            return None
        if not values or set(map(type, values)) != {bytes} or max(map(len, values)) > MAX_BYTES:
            return None
        joined = b"\n".join(values)
        ascii_ = joined.isascii()
        escaped = b"\\" in joined  # one pass at memchr speed: most batches hold no backslash at all
        if (
            joined.count(b"\n") != len(values) - 1
            or escaped
            and b"\\u" in joined
            or not ascii_  # a byte order mark, like any text that is not valid UTF-8, is not ASCII
            and (b"\xef\xbb\xbf" in joined or not _is_utf8(joined))
        ):
            return None
        try:  # a large batch in blocks read on Arrow's threads, the table's rows in the messages' order
            table = pa_json.read_json(pa.BufferReader(joined), read_options=self._read, parse_options=self._parse)
        except pa.ArrowException:  # not this path's: the per-message path says why
            return None
        if table.num_rows != len(values):
            return None
        table = table.combine_chunks()
        if any(table.column(name).null_count for name in _REQUIRED):
            return None
        # JSON holds no control character unescaped (Arrow's reader refuses them): with no escape and no DEL, an
        # ASCII batch's texts hold none.
        plain = ascii_ and not escaped and b"\x7f" not in joined
        return table if self._well_formed(table, ascii_=ascii_, plain=plain) else None

    def _well_formed(self, t: Any, *, ascii_: bool, plain: bool) -> bool:
        """The codec's checks of the fields, as kernels. ``ascii_``: every text is ASCII (its length is its bytes');
        ``plain``: no text holds a control character either."""
        tid, cid, rel = t.column("transaction_id"), t.column("card_id"), t.column("related_transaction_id")
        merchant, location, stamp = t.column("merchant_name"), t.column("location"), t.column("timestamp")
        length = pc.binary_length if ascii_ else pc.utf8_length
        if (
            pc.min(tid).as_py() <= 0
            or pc.min(cid).as_py() <= 0
            or (rel.null_count < len(rel) and pc.min(rel).as_py() <= 0)
            or pc.max(length(merchant)).as_py() > 255
            or pc.max(length(location)).as_py() > 512
            or not plain
            and (
                pc.any(pc.match_substring_regex(merchant, _FORBIDDEN)).as_py()
                or pc.any(pc.match_substring_regex(location, _FORBIDDEN)).as_py()
            )
            or not pc.all(pc.is_in(t.column("transaction_type"), value_set=self._types)).as_py()
            or not pc.all(pc.match_substring_regex(stamp, _TIMESTAMP_SHAPE)).as_py()
            or not pc.all(pc.match_substring_regex(t.column("amount"), _PLAIN_CENTS)).as_py()
        ):
            return False
        parsed = pc.strptime(stamp, format=_TIMESTAMP_FORMAT, unit="s", error_is_null=True)
        if parsed.null_count:  # no hour 24, no minute 60, no month 13, no day 0
            return False
        # Arrow's parse rolls a day past the month's end over into the next month (30 February is 2 March): the
        # day parsed must be the day written. The seconds are checked by the shape (no second 60), and year 0,
        # which Arrow reads but no datetime holds, is before the first second of year 1.
        written_days = pc.cast(pc.utf8_slice_codeunits(stamp, 8, 10), pa.int64())
        return bool(
            pc.all(pc.equal(pc.day(parsed), written_days)).as_py()
            and pc.min(parsed.cast(pa.int64())).as_py() >= _FIRST_SECOND
        )

    def decide(
        self,
        table: Any,
        card_ids: list[int],
        transaction_ids: list[int],
        partitions: list[int],
        authorizer: Authorizer,
    ) -> ColumnarOutcome | None:
        """Decide the batch ``table`` (from :meth:`read`; its card and transaction ids as lists, and each message's
        partition) with ``authorizer``'s cards and running balances, which it updates; None (and nothing changed)
        when a card is unknown or its money is not whole cents."""
        n = len(card_ids)
        found = authorizer.terms_of(card_ids)
        if None in found:
            return None
        terms = cast(list[CardTerms], found)
        limits: list[int] = list(map(_fourth, terms))
        if None in limits:  # a limit that is not whole cents
            return None
        before: list[int | None] = list(map(self._balances.get, card_ids))
        if None in before:
            for i, balance in enumerate(before):
                if balance is None:
                    before[i] = to_cents(authorizer.balances[card_ids[i]])
                    if before[i] is None:
                        return None
        amount_text = table.column("amount")
        cents = pc.cast(pc.replace_substring(amount_text, ".", ""), pa.int64())
        location = table.column("location")
        limit_col, before_col = pa.array(limits, pa.int64()), pa.array(before, pa.int64())
        half = pc.greater_equal(pc.multiply(pc.abs(cents), 2), limit_col)
        customer_heads = pa.array(list(map(_third, terms)), pa.string())
        far = pc.invert(pc.fill_null(pc.equal(customer_heads, self._merchant_heads(location)), False))
        # Declined whatever the balance (half the limit, too far) or judged on the card's balance as it runs: its
        # balance before the batch plus what its earlier transactions in the batch moved, all of them taken to
        # have gone pending (a running sum per card, in batch order) ...
        held = pc.or_(half, far)
        card_column = table.column("card_id").combine_chunks()
        after_col = pc.add(before_col, _running_sums(card_column, pc.if_else(held, 0, cents)))
        over = pc.and_(pc.invert(held), pc.greater(after_col, limit_col))
        reason_col = pc.case_when(pc.make_struct(half, far, over), *_REASONS)
        reasons: list[str | None] = reason_col.to_pylist()
        after: list[int] = after_col.to_pylist()
        if pc.any(over).as_py():  # ... which holds for each card until it goes over its limit; from then on, in order
            self._judge_in_order(card_column, over, reasons, after, limits, cents, half, far)
        card_balances = dict(zip(card_ids, after, strict=True))  # each card's last
        status = [DECLINED if reason else PENDING for reason in reasons]
        pending_added = Counter(compress(card_ids, map(is_, reasons, repeat(None))))
        by_reason = Counter(reasons)
        pending = by_reason.pop(None, 0)
        counts: Counter[str] = Counter({f"{DECLINED}:{reason}": k for reason, k in by_reason.items()})
        if pending:
            counts[PENDING] = pending
        if n - pending:
            counts[DECLINED] = n - pending
        self._balances.update(card_balances)
        self._moved.update(pending_added)
        columns = DecidedColumns(
            transaction_id=transaction_ids,
            card_id=card_ids,
            merchant_name=t_list(table, "merchant_name"),
            timestamp=t_list(table, "timestamp"),
            amount=amount_text.to_pylist(),
            location=location.to_pylist(),
            transaction_type=t_list(table, "transaction_type"),
            related_transaction_id=t_list(table, "related_transaction_id"),
            status=status,
            pending_balance=after,
            decline_reason=reasons,
            credit_limit=limits,
            partition=partitions,
            card_balances=card_balances,
            card_pending_added=pending_added,
        )
        return ColumnarOutcome(columns, counts)

    @staticmethod
    def _judge_in_order(
        card_column: Any,
        over: Any,
        reasons: list[str | None],
        after: list[int],
        limits: list[int],
        amounts: Any,
        half: Any,
        far: Any,
    ) -> None:
        """Judge again, one by one in order, the transactions of each card that went over its limit in the batch
        from the first that did on, on the balance as it runs (a declined transaction moves nothing): ``reasons``
        and ``after`` are updated in place. Those before it were judged on the right balance already."""
        over_rows = pc.indices_nonzero(over)
        # Each card that went over its limit, and the row where it first did (the rows ascend: its first seen). Not
        # Arrow's group_by: that imports Arrow's query engine and its Parquet libraries into every consumer.
        firsts: dict[int, int] = {}
        for card_id, row in zip(pc.take(card_column, over_rows).to_pylist(), over_rows.to_pylist(), strict=True):
            firsts.setdefault(card_id, row)
        rows_of = pc.index_in(card_column, value_set=pa.array(list(firsts), pa.int64()))  # its card's entry, or null
        each_first = pc.take(pa.array(list(firsts.values()), pa.int64()), rows_of)
        candidates = pc.indices_nonzero(pc.is_valid(each_first))
        rows = pc.filter(candidates, pc.greater_equal(candidates, pc.take(each_first, candidates)))
        card_ids, amounts_, halves, fars = (pc.take(c, rows).to_pylist() for c in (card_column, amounts, half, far))
        running: dict[int, int] = {}
        for k, i in enumerate(rows.to_pylist()):
            card_id = card_ids[k]
            balance = running.get(card_id)
            if balance is None:  # the card's first over its limit: its running sum counted its own amount
                balance = after[i] - amounts_[k]
            reason = (
                AMOUNT_OVER_HALF_LIMIT
                if halves[k]
                else LOCATION_TOO_FAR
                if fars[k]
                else OVER_CREDIT_LIMIT
                if balance + amounts_[k] > limits[i]
                else None
            )
            reasons[i] = reason
            after[i] = running[card_id] = balance + amounts_[k] if reason is None else balance

    def _merchant_heads(self, location: Any) -> Any:
        """Each location's zip head (:func:`~cardpipe.domain.authorization.zip_head` of its last word): by kernels
        for ASCII locations, by the domain's functions for the others."""
        word = pc.struct_field(pc.extract_regex(location, _LAST_WORD), "word")
        heads = pc.if_else(pc.greater_equal(pc.utf8_length(word), 5), pc.utf8_slice_codeunits(word, 0, 1), None)
        ascii_ = pc.string_is_ascii(location)
        if pc.all(ascii_).as_py():
            return heads
        texts, heads_list = location.to_pylist(), heads.to_pylist()
        for i, is_ascii in enumerate(ascii_.to_pylist()):
            if not is_ascii:
                heads_list[i] = zip_head(zip_of(texts[i]))
        return pa.array(heads_list, pa.string())


def _running_sums(keys: Any, values: Any) -> Any:
    """Per row, the sum of ``values`` over the rows of its key up to it (itself included), in row order: one
    cumulative sum over the rows sorted by key (a stable sort keeps each key's rows in order), less the sum
    before its key's first row, put back in row order."""
    order = pc.sort_indices(keys).cast(pa.int64())
    sorted_keys, sorted_values = pc.take(keys, order), pc.take(values, order)
    total = pc.cumulative_sum_checked(sorted_values)
    n = len(sorted_keys)
    first = pa.concat_arrays(
        [pa.array([True]), pc.not_equal(sorted_keys.slice(1), sorted_keys.slice(0, n - 1))]
        if n
        else [pa.array([], pa.bool_())]
    )
    before_key = pc.fill_null_forward(pc.if_else(first, pc.subtract(total, sorted_values), None))
    return pc.scatter(pc.subtract(total, before_key), order)


def _wire_schema() -> Any:
    """The topic's fields as Arrow reads them (codec's message format)."""
    return pa.schema(
        [
            ("transaction_id", pa.int64()),
            ("card_id", pa.int64()),
            ("merchant_name", pa.string()),
            ("timestamp", pa.string()),
            ("amount", pa.string()),
            ("location", pa.string()),
            ("transaction_type", pa.string()),
            ("related_transaction_id", pa.int64()),
        ]
    )


def t_list(table: Any, name: str) -> list[Any]:
    """A column of ``table`` as a Python list."""
    return table.column(name).to_pylist()  # type: ignore[no-any-return]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
