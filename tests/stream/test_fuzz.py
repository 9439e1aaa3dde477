"""Fuzzing the stream with malformed messages interleaved with good ones.

* A hypothesis property on the pure :class:`StreamProcessor`: every kind of malformed message below, in random
  partitions, keys, positions and batch splits, among unicode- and quote-heavy good transactions, exact
  re-deliveries and conflicting duplicates. process() never raises; each bad message gives exactly one rejection
  with its reason and bytes; the good messages are decided exactly as in a clean run; offsets cover everything.
* Focused tests of inputs that currently crash or wedge the consumer (product bugs, failing on purpose).
* One end-to-end run on the embedded broker and MariaDB: the seed data plus every kind of bad message.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal as D
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select
from sqlalchemy.engine import URL

from cardpipe.config import Settings
from cardpipe.domain.records import DECLINED, PENDING, REJECTED, TRANSACTION_COLUMNS, CardProfile, Transaction
from cardpipe.orchestration import commands
from cardpipe.serving import schema
from cardpipe.serving.database import create_clean_schema, make_engine
from cardpipe.serving.loader import load_inputs
from cardpipe.serving.stream_store import StreamStore
from cardpipe.serving.transaction_source import transactions_from_csv
from cardpipe.stream.broker import broker_session, ensure_topic
from cardpipe.stream.codec import (
    BAD_AMOUNT,
    BAD_CARD_ID,
    BAD_FIELD,
    BAD_TIMESTAMP,
    BAD_TRANSACTION_ID,
    DUPLICATE_CONFLICT,
    EMPTY_MESSAGE,
    MAX_MESSAGE_BYTES,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    NOT_JSON,
    NOT_UTF8,
    OVERSIZED_MESSAGE,
    UNKNOWN_CARD,
    encode_transaction,
)
from cardpipe.stream.consumer import ConsumeOptions
from cardpipe.stream.processing import CheckpointBatch, RawMessage, StreamProcessor

CARDS = {
    1: CardProfile(1, D("1000.00"), "11513"),
    2: CardProfile(2, D("500.00"), "20001"),
    3: CardProfile(3, D("20000.00"), "90210"),
}
BALANCES = {1: D("0.00"), 2: D("100.00"), 3: D("-50.00")}
PARTITION_OF_CARD = {1: 0, 2: 1, 3: 0}  # partition 2 gets bad messages only
PARTITIONS = (0, 1, 2)
REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 4, 1, 0, 0, 0)
STREAM_FIELDS = TRANSACTION_COLUMNS
FIELD_REASON = {
    "transaction_id": BAD_TRANSACTION_ID,
    "card_id": BAD_CARD_ID,
    "merchant_name": BAD_FIELD,
    "timestamp": BAD_TIMESTAMP,
    "amount": BAD_AMOUNT,
    "location": BAD_FIELD,
    "transaction_type": BAD_FIELD,
    "related_transaction_id": BAD_FIELD,
}
REQUIRED_FIELDS = [f for f in STREAM_FIELDS if f != "related_transaction_id"]


# --- building messages ------------------------------------------------------------------------------------


class Raw(str):
    """A JSON literal written as is (``NaN``, ``1e400``, ``1.001``), not as a JSON string."""


def dumps(obj: Any) -> bytes:
    """JSON (UTF-8, non-ASCII kept) with :class:`Raw` values spliced in verbatim."""
    raws: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            placeholder = f"\x01raw{len(raws)}\x01"
            raws[json.dumps(placeholder)] = str(value)
            return placeholder
        return value

    text = json.dumps({k: mark(v) for k, v in obj.items()} if isinstance(obj, dict) else obj, ensure_ascii=False)
    for placeholder, raw in raws.items():
        text = text.replace(placeholder, raw)
    return text.encode()


def template(tid: int, card_id: int = 1) -> dict[str, Any]:
    """A valid transaction object; bad messages are this with one defect."""
    return {
        "transaction_id": tid,
        "card_id": card_id,
        "merchant_name": 'Shop "Q" ✓',
        "timestamp": "2025-04-02 00:00:00",
        "amount": "1.00",
        "location": "x, NY 10001",
        "transaction_type": "purchase",
        "related_transaction_id": None,
    }


def as_object(tx: Transaction) -> dict[str, Any]:
    return json.loads(encode_transaction(tx)[1])


def encode_variant(tx: Transaction, variant: str) -> bytes:
    """The same transaction in another accepted encoding (other producers, other clients)."""
    obj = as_object(tx)
    canonical = encode_transaction(tx)[1]
    if variant == "amount_number":
        obj["amount"] = Raw(str(tx.amount))
    elif variant == "ids_as_strings":
        obj.update(transaction_id=str(tx.transaction_id), card_id=f" {tx.card_id} ")
    elif variant == "id_as_decimal_number":
        obj["transaction_id"] = Raw(f"{tx.transaction_id}.0")
    elif variant == "amount_trailing_zero":
        obj["amount"] = f"{tx.amount}0"
    elif variant == "amount_spaces":
        obj["amount"] = f"  {tx.amount}\t"
    elif variant == "related_missing_or_empty":
        if tx.related_transaction_id is None:
            obj.pop("related_transaction_id")
        else:
            obj["related_transaction_id"] = str(tx.related_transaction_id)
    elif variant == "ascii_escaped":
        return json.dumps(obj, ensure_ascii=True).encode()
    elif variant == "padded_to_the_limit":  # exactly MAX_MESSAGE_BYTES: still accepted
        return b"{" + b" " * (MAX_MESSAGE_BYTES - len(canonical)) + canonical[1:]
    else:
        return canonical
    return dumps(obj)


GOOD_VARIANTS = [
    "canonical",
    "canonical",
    "amount_number",
    "ids_as_strings",
    "id_as_decimal_number",
    "amount_trailing_zero",
    "amount_spaces",
    "related_missing_or_empty",
    "ascii_escaped",
    "padded_to_the_limit",
]


@dataclass(frozen=True)
class Bad:
    kind: str
    value: bytes | None
    reason: str
    transaction_id: int | None  # what the rejection should carry (None: not readable)


def _field_value(kind: str, param: tuple[str, Any], tid: int) -> Bad:
    field, value = param
    return Bad(
        kind, dumps({**template(tid), field: value}), FIELD_REASON[field], None if field == "transaction_id" else tid
    )


def _missing(kind: str, field: str, tid: int) -> Bad:
    if field == "*":
        return Bad(kind, b"{}", MISSING_FIELD, None)
    obj = template(tid)
    del obj[field]
    return Bad(kind, dumps(obj), MISSING_FIELD, None if field == "transaction_id" else tid)


def _truncated(kind: str, param: tuple[int, bool], tid: int) -> Bad:
    cut, bytewise = param
    full = dumps(template(tid))
    if bytewise:
        value = full[: 1 + cut % (len(full) - 1)]
        try:
            value.decode()
        except UnicodeDecodeError:
            return Bad(kind, value, NOT_UTF8, None)
        return Bad(kind, value, NOT_JSON, None)
    text = full.decode()
    return Bad(kind, text[: 1 + cut % (len(text) - 1)].encode(), NOT_JSON, None)


def _oversized(kind: str, param: tuple[str, int], tid: int) -> Bad:
    how, n = param
    full = dumps(template(tid))
    if how == "pad":
        value = b"{" + b" " * (MAX_MESSAGE_BYTES - len(full) + n) + full[1:]
    elif how == "merchant":
        value = dumps({**template(tid), "merchant_name": "é" * n})
    else:
        value = b"x" * (MAX_MESSAGE_BYTES + n)
    assert len(value) > MAX_MESSAGE_BYTES
    return Bad(kind, value, OVERSIZED_MESSAGE, None)


def _constant(reason: str):
    return lambda kind, value, tid: Bad(kind, value, reason, None)


def _not_utf8(kind: str, value: bytes, tid: int) -> Bad:
    if value == b"latin-1":
        value = dumps({**template(tid), "merchant_name": "Café"}).decode().encode("latin-1")
    elif value == b"utf-16":
        value = dumps(template(tid)).decode().encode("utf-16")
    return Bad(kind, value, NOT_UTF8, None)


def _valid_timestamp(text: str) -> bool:
    """Whatever Python's ISO parser accepts (including the offset forms the product mishandles, see below)."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _not_utf8_bytes(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return True
    return False


NESTED = {"nested": {"deeper": [1, {"x": None}], "amount": "1.00"}}
# kind -> (explicit examples, extra generated params or None, builder(kind, param, tid) -> Bad)
KINDS: dict[str, tuple[list[Any], st.SearchStrategy[Any] | None, Any]] = {
    "empty": ([None, b""], None, _constant(EMPTY_MESSAGE)),
    "not_json": (
        [
            b"not json",
            b"{oops",
            b"{'single': 'quotes'}",
            b"\x00garbage",
            b'{"a":1,}',
            b"undefined",
            b"tru",
            b"  ",
            b'{"transaction_id": 1',
            b'"unterminated',
            b"[" * 30_000,
            b"{} {}",
            b"\xef\xbb\xbf{}",
            b'{"amount": 01}',
        ],
        st.text(st.characters(codec="utf-8"), max_size=30).map(lambda t: ("<" + t).encode()),
        _constant(NOT_JSON),
    ),
    "truncated_json": (
        [(5, False), (40, False), (130, False), (17, True), (73, True), (5000, True)],
        st.tuples(st.integers(0, 10_000), st.booleans()),
        _truncated,
    ),
    "wrong_type": (
        [("transaction_id", v) for v in ([], "abc", "1.5", Raw("1.5"), "", None, "0x10", "1e3", " ", "1 2")]
        + [("card_id", v) for v in ([], "abc", Raw("2.5"), None, "", "１")]
        + [("merchant_name", v) for v in (123, Raw("1.5"), [], None)]
        + [("timestamp", v) for v in (20250402000000, Raw("1743465600.5"), None, [])]
        + [("amount", v) for v in ([], None, "abc", "", "1,00", "$1.00", "1.0.0", "0x10", "1e")]
        + [("location", v) for v in (123, [], None)]
        + [("transaction_type", v) for v in (7, [], None)]
        + [("related_transaction_id", v) for v in ("abc", Raw("1.5"), [], "1.5")],
        None,
        _field_value,
    ),
    "missing_field": (["*", *REQUIRED_FIELDS], None, _missing),
    "unknown_card": (
        [424_242, 999, 2**63 - 1, "777"],
        None,
        lambda kind, card, tid: Bad(kind, dumps({**template(tid), "card_id": card}), UNKNOWN_CARD, tid),
    ),
    "non_finite_amount": (
        [
            ("amount", v)
            for v in (
                Raw("NaN"),
                Raw("Infinity"),
                Raw("-Infinity"),
                "NaN",
                "Infinity",
                "-Infinity",
                "inf",
                "-inf",
                "sNaN",
                "nan",
            )
        ],
        None,
        _field_value,
    ),
    "huge_amount": (
        [
            ("amount", v)
            for v in (
                "10000000000.00",
                "-10000000000",
                "99999999999.99",
                Raw("1e400"),
                Raw("-1e400"),
                Raw("12345678901234567890"),
                "1e12",
                "1E+999999",
            )
        ],
        st.integers(10**12, 10**30).map(lambda c: ("amount", str(D(c).scaleb(-2)))),
        _field_value,
    ),
    "over_two_decimals": (
        [
            ("amount", v)
            for v in ("1.001", "0.005", "-5.999", "12.3450001", Raw("1.001"), Raw("0.125"), Raw("-0.001"), "1e-3")
        ],
        st.integers(-(10**7), 10**7).filter(lambda m: m % 10).map(lambda m: ("amount", str(D(m).scaleb(-3)))),
        _field_value,
    ),
    "bad_timestamp": (
        [
            ("timestamp", v)
            for v in (
                "2025-04-01T00:00:00",
                "2025-04-01",
                "2025/04/01 00:00:00",
                "2025-13-01 00:00:00",
                "2025-02-30 00:00:00",
                "2025-04-01 24:00:00",
                "2025-04-01 00:00:60",
                " 2025-04-01 00:00:00",
                "2025-04-01 00:00:00 ",
                "２０２５-04-01 00:00:00",
                "",
                "yesterday",
                "2025-04-01 00:00:00.000",
                "1743465600",
                "2025-4-1 0:0:0",
            )
        ],
        st.text(max_size=25).filter(lambda t: not _valid_timestamp(t)).map(lambda t: ("timestamp", t)),
        _field_value,
    ),
    "oversized": (
        [("pad", 1), ("pad", 700), ("merchant", 40_000), ("raw", 1)],
        st.tuples(st.just("pad"), st.integers(1, 5000)),
        _oversized,
    ),
    "not_an_object": (
        [
            b"[1,2]",
            b"[]",
            b'"string"',
            b"42",
            b"true",
            b"false",
            b"null",
            b"1.5",
            b"-0",
            b"NaN",
            b"1e999999",
            b'"{\\"transaction_id\\": 1}"',
            b"[" + dumps(template(1)) + b"]",
        ],
        None,
        _constant(NOT_AN_OBJECT),
    ),
    "not_utf8": (
        [
            b"\xff\xfe",
            b"\xff",
            b"\x80",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xf5\x80\x80\x80",
            b'{"a":"\xe2\x82"}',
            b"latin-1",
            b"utf-16",
        ],
        st.binary(min_size=1, max_size=40).filter(_not_utf8_bytes),
        _not_utf8,
    ),
    "nested_object": ([(f, NESTED) for f in STREAM_FIELDS], None, _field_value),
    "non_positive_or_out_of_range_id": (
        [("transaction_id", v) for v in (0, -1, "-7", "0", 2**63, "9223372036854775808", -(2**63), "+5")]
        + [("card_id", v) for v in (0, -3, "0", 2**63)]
        + [("related_transaction_id", v) for v in (0, -1, "-3", 2**63)],
        None,
        _field_value,
    ),
    "boolean_as_number": (
        [
            (f, b)
            for f in (
                "transaction_id",
                "card_id",
                "amount",
                "related_transaction_id",
                "timestamp",
                "merchant_name",
                "location",
                "transaction_type",
            )
            for b in (True, False)
        ],
        None,
        _field_value,
    ),
    "bad_text": (
        [
            ("merchant_name", "a" * 256),
            ("merchant_name", "é" * 256),
            ("merchant_name", "nul\x00byte"),
            ("location", "x" * 509 + " 10001"),
            ("location", "\x00 NY 10001"),
            ("transaction_type", ""),
            ("transaction_type", "   "),
            ("transaction_type", "x" * 33),
            ("transaction_type", "\t\n"),
            ("transaction_type", "teleport"),
            ("transaction_type", "Purchase"),
            ("transaction_type", " purchase"),
            ("merchant_name", "tab\there"),
            ("merchant_name", "line\r\nbreak"),
            ("merchant_name", "bell\x07"),
            ("merchant_name", "c1 \x9b control"),
            ("location", "\x7f NY 10001"),
            ("location", "\x1b[31m NY 10001"),
        ],
        None,
        _field_value,
    ),
}
assert len(KINDS) >= 15


@cache
def kind_params(kind: str) -> st.SearchStrategy[Any]:
    examples, generated, _ = KINDS[kind]
    return st.sampled_from(examples) if generated is None else st.one_of(st.sampled_from(examples), generated)


def build_bad(kind: str, param: Any, tid: int) -> Bad:
    return KINDS[kind][2](kind, param, tid)


# --- good transactions: unicode- and quote-heavy text, boundary amounts ------------------------------------

QUOTEY = [
    '"',
    "'",
    "\\",
    '\\"',
    "\\u0000",
    "{",
    "}",
    "[]",
    ",",
    ":",
    '{"amount": "999.00"}',
    "</script>",
    "'); DROP TABLE cards;--",
    "\u202e",
    "\u2028",
    "😀",
    "𝕊",
    "ñ",
    "中文",
    "\\t",
    "%s",
    "${x}",
    "NULL",
    "\ufeff",
    "\u00a0",
    "e\u0301",
]
# Text without control characters (C0, DEL, C1) or lone surrogates: the domain's text rule refuses those.
heavy_text = st.lists(
    st.one_of(st.sampled_from(QUOTEY), st.text(st.characters(codec="utf-8", exclude_categories=("Cc",)), max_size=6)),
    max_size=6,
).map("".join)
ZIP_TAILS = ["NY 10001", "NY 11513", "DC 20002", "CA 90001", "1234", "", "NY\u00a010001"]
locations = st.tuples(heavy_text, st.sampled_from(ZIP_TAILS)).map(lambda p: f"{p[0]} {p[1]}")
transaction_types = st.sampled_from(
    ["purchase", "bill_payment", "atm_withdrawal", "p2p_transfer", "wire_transfer", "refund", "cancellation"]
)


@cache
def amounts(card_id: int) -> st.SearchStrategy[D]:
    limit = CARDS[card_id].credit_limit
    half = limit / 2
    specials = [half, -half, half - D("0.01"), -half + D("0.01"), D("0.00"), D("-0.00"), D("0.01"), limit]
    cents = int(limit * 100) + 10_000
    return st.one_of(
        st.sampled_from([s.quantize(D("0.01")) for s in specials]),
        st.integers(-cents, cents).map(lambda c: D(c).scaleb(-2)),
    )


@st.composite
def good_transactions(draw: st.DrawFn, max_size: int = 12) -> list[Transaction]:
    out = []
    when = T0
    for tid in range(1, draw(st.integers(0, max_size)) + 1):
        card_id = draw(st.sampled_from(sorted(CARDS)))
        when += timedelta(seconds=draw(st.integers(0, 2)))
        out.append(
            Transaction(
                tid,
                card_id,
                draw(heavy_text),
                when,
                draw(amounts(card_id)),
                draw(locations),
                draw(transaction_types),
                draw(st.one_of(st.none(), st.integers(1, 2**63 - 1))),
            )
        )
    return out


def conflicting(tx: Transaction, change: str) -> Transaction:
    """Same id, card and timestamp; other content."""
    if change == "amount":
        return replace(tx, amount=tx.amount + D("0.01"))
    if change == "merchant_name":
        name = tx.merchant_name
        return replace(tx, merchant_name=name + "!" if len(name) < 255 else name[:-1])
    if change == "location":
        return replace(tx, location=tx.location + "9")
    if change == "transaction_type":
        return replace(tx, transaction_type="refund" if tx.transaction_type != "refund" else "purchase")
    return replace(tx, related_transaction_id=None if tx.related_transaction_id else 1)


CONFLICT_CHANGES = ["amount", "merchant_name", "location", "transaction_type", "related_transaction_id"]
BAD_KEYS = [None, b"1", b"424242", b"\xff\x00 key", b""]


# --- the pure property ------------------------------------------------------------------------------------


class MemoryStore:
    """The serving store's role: committed decisions, unique by transaction_id as the table's primary key."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}

    def lookup(self, ids: list[int]) -> dict[int, Transaction]:
        return {i: Transaction(*(self.rows[i][f] for f in STREAM_FIELDS)) for i in ids if i in self.rows}

    def commit(self, batch: CheckpointBatch) -> None:
        for row in batch.decided:
            assert row["transaction_id"] not in self.rows, f"transaction {row['transaction_id']} decided twice"
            self.rows[row["transaction_id"]] = row


@dataclass
class Item:
    what: str  # good | redelivery | conflict | bad
    key: bytes | None
    value: bytes | None
    tx: Transaction | None = None
    bad: Bad | None = None
    partition: int = -1
    offset: int = -1


def clean_decisions(goods: list[Transaction]) -> dict[int, dict[str, Any]]:
    store = MemoryStore()
    processor = StreamProcessor("t", CARDS, BALANCES, store.lookup)
    batch = processor.process([RawMessage(0, i, *encode_transaction(t)) for i, t in enumerate(goods)])
    assert not batch.rejected
    store.commit(batch)
    return store.rows


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_malformed_messages_are_rejected_one_by_one_and_never_disturb_the_good_ones(data):
    goods = data.draw(good_transactions(), label="good transactions")
    queues: dict[int, list[Item]] = {p: [] for p in PARTITIONS}
    for tx in goods:
        variant = data.draw(st.sampled_from(GOOD_VARIANTS))
        queues[PARTITION_OF_CARD[tx.card_id]].append(
            Item("good", str(tx.card_id).encode(), encode_variant(tx, variant), tx)
        )

    def insert_after_original(item: Item) -> None:
        queue = queues[PARTITION_OF_CARD[item.tx.card_id]]
        start = next(i for i, it in enumerate(queue) if it.what == "good" and it.tx is item.tx) + 1
        queue.insert(data.draw(st.integers(start, len(queue))), item)

    if goods:
        for _ in range(data.draw(st.integers(0, 3))):  # exact re-deliveries, possibly in another encoding
            tx = data.draw(st.sampled_from(goods))
            insert_after_original(
                Item(
                    "redelivery",
                    str(tx.card_id).encode(),
                    encode_variant(tx, data.draw(st.sampled_from(GOOD_VARIANTS))),
                    tx,
                )
            )
        for _ in range(data.draw(st.integers(0, 3))):  # same id, card and timestamp; other content
            tx = data.draw(st.sampled_from(goods))
            other = conflicting(tx, data.draw(st.sampled_from(CONFLICT_CHANGES)))
            item = Item(
                "conflict",
                str(tx.card_id).encode(),
                encode_transaction(other)[1],
                tx,
                Bad("duplicate_conflict", None, DUPLICATE_CONFLICT, tx.transaction_id),
            )
            insert_after_original(item)

    next_tid = 100_000
    for kind in KINDS:  # every kind, once or twice, anywhere
        for param in data.draw(st.lists(kind_params(kind), min_size=1, max_size=2), label=kind):
            bad = build_bad(kind, param, next_tid)
            next_tid += 1
            queue = queues[data.draw(st.sampled_from(PARTITIONS))]
            queue.insert(
                data.draw(st.integers(0, len(queue))),
                Item("bad", data.draw(st.sampled_from(BAD_KEYS)), bad.value, bad=bad),
            )

    # Interleave the partitions at random, number the offsets, cut into polled batches of random sizes.
    labels = data.draw(st.permutations([p for p, q in queues.items() for _ in q]))
    position = {p: 0 for p in PARTITIONS}
    items: list[Item] = []
    for p in labels:
        item = queues[p][position[p]]
        item.partition, item.offset = p, position[p]
        position[p] += 1
        items.append(item)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(items) - 1), max_size=8)))
    bounds = [0, *cuts, len(items)]

    store = MemoryStore()
    processor = StreamProcessor("t", CARDS, BALANCES, store.lookup)
    rejected: dict[tuple[int, int], dict[str, Any]] = {}
    counts: Counter[str] = Counter()
    final_offsets: dict[int, int] = {}
    for a, b in pairwise(bounds):
        chunk = items[a:b]
        batch = processor.process([RawMessage(it.partition, it.offset, it.key, it.value, 1_000) for it in chunk])
        expected_offsets: dict[int, int] = {}
        for it in chunk:
            expected_offsets[it.partition] = max(expected_offsets.get(it.partition, 0), it.offset + 1)
        assert batch.next_offsets == expected_offsets
        final_offsets.update(batch.next_offsets)
        for row in batch.rejected:
            where = (row["kafka_partition"], row["kafka_offset"])
            assert where not in rejected, f"two rejections for the message at {where}"
            rejected[where] = row
        counts.update(batch.counts)
        store.commit(batch)

    # Offsets cover every message; every bad message is rejected exactly once, as itself, with its reason.
    assert final_offsets == {p: n for p, n in position.items() if n}
    bads = {(it.partition, it.offset): it for it in items if it.bad is not None}
    assert rejected.keys() == bads.keys()
    for where, it in bads.items():
        row = rejected[where]
        assert (row["reason"], row["transaction_id"]) == (it.bad.reason, it.bad.transaction_id), it.bad
        assert row["message_value"] == it.value and row["message_key"] == it.key
        assert row["topic"] == "t" and 0 < len(row["detail"]) <= 1024
    assert counts[REJECTED] == len(bads)
    assert counts["duplicate_ignored"] == sum(it.what == "redelivery" for it in items)

    # The good messages are decided exactly as in a clean run over them alone (unicode text accepted as is).
    clean = clean_decisions(goods)
    unknown = {it.bad.transaction_id for it in items if it.bad is not None and it.bad.reason == UNKNOWN_CARD}
    assert store.rows.keys() == clean.keys() | unknown
    for tid, row in clean.items():
        assert store.rows[tid] == row
    for tid in unknown:  # a well-formed transaction of an unknown card is also kept, as rejected
        row = store.rows[tid]
        assert (row["status"], row["pending_balance"], row["decline_reason"]) == (REJECTED, None, UNKNOWN_CARD)


# --- product bugs: inputs that crash process() or wedge the consumer ----------------------------------------


def process_one(value: bytes, processor: StreamProcessor | None = None) -> CheckpointBatch:
    processor = processor or StreamProcessor("t", CARDS, BALANCES, MemoryStore().lookup)
    try:
        return processor.process([RawMessage(0, 0, None, value)])
    except Exception as exc:  # a raise here stops the consumer, and it re-reads the same message on restart
        pytest.fail(f"process() raised {type(exc).__name__}: {exc!s:.200} for {value[:120]!r}")


def test_a_timestamp_with_a_utc_offset_is_a_bad_timestamp_not_a_crash():
    # BUG: the shape check lets 19-character ISO forms with an offset through; fromisoformat then returns an
    # aware datetime, and comparing it with the card's (naive) watermark raises TypeError.
    store = MemoryStore()
    processor = StreamProcessor("t", CARDS, BALANCES, store.lookup)
    store.commit(process_one(dumps(template(1)), processor))
    for tid, stamp in enumerate(["2025-04-02 00:00+01", "2025-04-02 00-01:00", "2025-04-02 00+01:00"], start=2):
        batch = process_one(dumps({**template(tid), "timestamp": stamp}), processor)
        assert [r["reason"] for r in batch.rejected] == [BAD_TIMESTAMP], stamp


@pytest.mark.parametrize("amount", ['"1e1000000"', "1e1000000", "-1E+1000000", "1e99999999999999999999"])
def test_an_amount_with_an_enormous_exponent_is_a_bad_amount_not_a_crash(amount):
    # BUG: '"1e1000000"' and 1e1000000 raise decimal.Overflow in parse_money (abs() beyond Emax);
    # the JSON number 1e99999999999999999999 raises decimal.InvalidOperation inside json.loads(parse_float=Decimal),
    # which decode_transaction does not catch (it is an ArithmeticError, not a ValueError).
    value = dumps({**template(1), "amount": Raw(amount)})
    assert [r["reason"] for r in process_one(value).rejected] == [BAD_AMOUNT]


def test_an_id_with_an_enormous_exponent_is_rejected_at_once():
    # BUG: _parse_id turns an integral Decimal such as 1E+1000000 into a million-digit int: about 30 s of CPU for a
    # 20-byte id (1e10000000 never finishes; 1e999999999999999999 raises MemoryError), for any of the three ids.
    fields = ["transaction_id", "card_id", "related_transaction_id"]
    values = [dumps({**template(1), field: Raw("1e1000000")}) for field in fields]
    script = (
        "import json, sys\nfrom cardpipe.stream.codec import decode_transaction\n"
        "for value in json.load(sys.stdin):\n    print(decode_transaction(value.encode()).reason, flush=True)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps([v.decode() for v in values]).encode(),
            capture_output=True,
            timeout=5,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        decided = (exc.stdout or b"").decode().split()
        pytest.fail(
            f"decoding three ~220-byte messages with an id of 1e1000000 took more than 5 s "
            f"(done in time: {decided}; stuck on {fields[len(decided)]})"
        )
    assert done.stdout.decode().split() == [FIELD_REASON[f] for f in fields], done.stderr.decode()[-500:]


def test_a_lone_surrogate_in_text_is_rejected_not_stored(tmp_path, seed_dataset):
    # BUG: a JSON escape "\ud800" decodes to a str the database cannot encode; the checkpoint commit then raises
    # UnicodeEncodeError (SQLite and MariaDB alike), the consumer stops, and re-reads the same batch on restart.
    engine = make_engine(URL.create("sqlite", database=str(tmp_path / "cardpipe.db")))
    try:
        create_clean_schema(engine)
        load_inputs(engine, seed_dataset / "input")
        store = StreamStore(engine, "t")
        balances, _ = store.restore()
        processor = StreamProcessor("t", store.card_profiles(), balances, store.lookup_decided)
        value = json.dumps({**template(900_001, card_id=26), "merchant_name": "\ud800 shop"}).encode()
        assert b"\\ud800" in value
        batch = process_one(value, processor)
        try:
            store.commit(batch)
        except Exception as exc:
            pytest.fail(f"the checkpoint commit raised {type(exc).__name__}: {exc!s:.200}")
        assert [r["reason"] for r in batch.rejected] == [BAD_FIELD]
    finally:
        engine.dispose()


def test_a_transaction_of_an_unknown_card_can_be_checkpointed(database_url, seed_dataset):
    # BUG: for an unknown card the processor checkpoints CardState(pending_balance=None) (restore() expects that),
    # but card_states.pending_balance is NOT NULL: the commit fails with IntegrityError on SQLite and MariaDB, so
    # the first unknown-card message stops the consumer, and every restart re-reads it and stops again.
    engine = make_engine(database_url)
    try:
        create_clean_schema(engine)
        load_inputs(engine, seed_dataset / "input")
        store = StreamStore(engine, "t")

        def restored() -> StreamProcessor:
            balances, _ = store.restore()
            return StreamProcessor("t", store.card_profiles(), balances, store.lookup_decided)

        value = dumps({**template(900_001), "card_id": 424_242})
        batch = process_one(value, restored())
        assert [r["reason"] for r in batch.rejected] == [UNKNOWN_CARD]
        try:
            store.commit(batch)
        except Exception as exc:
            pytest.fail(f"the checkpoint commit raised {type(exc).__name__}: {exc!s:.300}")
        again = process_one(value, restored())  # a re-delivery after a restart is recognised
        assert again.counts["duplicate_ignored"] == 1 and not again.rejected and not again.decided
    finally:
        engine.dispose()


@pytest.mark.parametrize("change", ["later_timestamp", "other_card"])
def test_a_conflicting_duplicate_in_a_later_batch_is_rejected_not_decided_again(change):
    # BUG: across batches a duplicate is only looked up when its own (timestamp, id) is behind its own card's
    # watermark. With a later timestamp or another card (i.e. content that differs exactly there) it is decided a
    # second time: the balance moves twice, and the real store's commit fails on the primary key (IntegrityError)
    # on every restart, wedging the consumer.
    store = MemoryStore()
    processor = StreamProcessor("t", CARDS, BALANCES, store.lookup)
    original = Transaction(1, 1, "Shop", T0, D("100.00"), "x, NY 10001", "purchase")
    store.commit(processor.process([RawMessage(0, 0, b"1", encode_transaction(original)[1])]))
    if change == "later_timestamp":
        other = replace(original, timestamp=T0 + timedelta(days=1))
    else:
        other = replace(original, card_id=3, location="x, CA 90001")
    batch = processor.process([RawMessage(0, 1, b"1", encode_transaction(other)[1])])
    assert [r["transaction_id"] for r in batch.decided] == []
    assert [r["reason"] for r in batch.rejected] == [DUPLICATE_CONFLICT]
    assert processor.authorizer.balances == {**BALANCES, 1: D("100.00")}


# --- end to end: embedded broker, MariaDB, the product's produce and consume -------------------------------


def read_all(bootstrap: str, topic: str) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "fuzz-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages, done = [], set()
        while done != set(partitions):
            for msg in consumer.consume(10_000, timeout=1):
                if msg.error() is None:
                    messages.append(msg)
                    done.discard(msg.partition())
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
        return messages
    finally:
        consumer.close()


def publish(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    # murmur2 as the product's producer: a message keyed by a card id lands in that card's partition, after it.
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "acks": "all",
            "message.max.bytes": 2_000_000,
        }
    )
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


@pytest.mark.mysql
@pytest.mark.kafka
def test_end_to_end_bad_messages_go_to_the_table_and_the_dead_letter_topic(
    tmp_path, seed_dataset, mysql_env, mysql_database
):
    results = tmp_path / "results"
    settings = Settings.from_env(env=mysql_env, results_dir=results, data_dir=seed_dataset / "input")
    commands.setup(settings)
    commands.load(settings)
    seed = {t.transaction_id: t for t in transactions_from_csv(seed_dataset / "input" / "transactions.csv")}

    # Every explicit example of every kind, keyed by a card, by garbage, or not at all.
    bads: list[tuple[bytes | None, Bad]] = []
    for kind, (examples, _, _) in KINDS.items():
        for param in examples:
            bads.append(([None, b"1", b"\xff\xfe key"][len(bads) % 3], build_bad(kind, param, 900_000 + len(bads))))
    before, after = bads[::2], bads[1::2]
    # After the seed: conflicting duplicates and exact re-deliveries of seed transactions (keyed: same partition),
    # and new unicode- and quote-heavy transactions that must be accepted.
    conflicts = [
        conflicting(seed[5], "amount"),
        conflicting(seed[7], "merchant_name"),
        conflicting(seed[11], "location"),
    ]
    redeliveries = [encode_variant(seed[3], "amount_number"), encode_variant(seed[9], "canonical")]
    extras = [
        Transaction(800_000 + i, 26, name, datetime(2026, 1, 1, 0, 0, i), D(amount), location, kind)
        for i, (name, amount, location, kind) in enumerate(
            [
                ("Barrett \"LLC\", Inc. \\ 'quoted'", "0.00", "4395 Brenda Lake, Queens, NY 10859", "purchase"),
                ("Ünïcode ✓ 😀 中文 \u202e", "1.00", 'x, "Queens", NY 10001', "refund"),
                ('{"amount": "999.00"}', "-2.50", "'); DROP TABLE cards;-- 10001", "p2p_transfer"),
                ("  e\u0301 𝕊 ", "3.00", "far away, CA 90210", "wire_transfer"),
            ]
        )
    ]

    with broker_session(None, results) as broker:
        bootstrap, topic = broker.bootstrap_servers, settings.kafka_topic
        ensure_topic(bootstrap, topic, settings.kafka_partitions)
        publish(bootstrap, topic, [(key, bad.value) for key, bad in before])
        assert commands.produce(settings, broker=broker).published == len(seed)
        publish(
            bootstrap,
            topic,
            [(key, bad.value) for key, bad in after]
            + [encode_transaction(t) for t in conflicts]
            + [(str(seed[3].card_id).encode(), redeliveries[0]), (str(seed[9].card_id).encode(), redeliveries[1])]
            + [encode_transaction(t) for t in extras],
        )

        summary = commands.consume(settings, ConsumeOptions(until_caught_up=True), broker=broker)
        dead_letters = read_all(bootstrap, settings.dead_letter_topic)

    total = len(bads) + len(seed) + len(conflicts) + len(redeliveries) + len(extras)
    assert summary.messages == total
    assert summary.counts["duplicate_ignored"] == len(redeliveries)

    expected = Counter((bad.reason, bad.value or b"", key) for key, bad in bads)
    expected.update((DUPLICATE_CONFLICT, encode_transaction(t)[1], encode_transaction(t)[0]) for t in conflicts)
    engine = create_engine(mysql_database)
    try:
        with engine.connect() as conn:
            rejected = conn.execute(select(schema.rejected_transactions)).all()
            stream = {r.transaction_id: r for r in conn.execute(select(schema.stream_transactions))}
    finally:
        engine.dispose()
    assert Counter((r.reason, r.message_value or b"", r.message_key) for r in rejected) == expected
    by_value = {(r.reason, r.message_value or b""): r for r in rejected}
    for _, bad in bads:
        assert by_value[(bad.reason, bad.value or b"")].transaction_id == bad.transaction_id, bad
    assert {r.topic for r in rejected} == {topic}

    # The dead-letter topic holds the same messages, each with its reason.
    assert len(dead_letters) == len(rejected)
    assert Counter((dict(m.headers() or [])["reason"].decode(), m.value() or b"") for m in dead_letters) == Counter(
        (reason, value) for reason, value, _ in expected.elements()
    )
    assert all({"reason", "detail", "source"} <= {k for k, _ in m.headers()} for m in dead_letters)

    # The seed's transactions are decided exactly as the seed system did, untouched by the noise around them.
    with open(seed_dataset / "expected" / "stream_transactions.csv", newline="") as f:
        reference = {int(r["transaction_id"]): r for r in csv.DictReader(f)}
    assert reference.keys() == seed.keys()
    for tid, ref in reference.items():
        row = stream[tid]
        assert row.status == ref["status"], tid
        assert abs(row.pending_balance - D(ref["pending_balance"])) <= D("0.005"), tid
        assert abs(row.amount - D(ref["amount"])) <= D("0.005"), tid
        assert (row.card_id, row.merchant_name, row.location, row.transaction_type) == (
            int(ref["card_id"]),
            ref["merchant_name"],
            ref["location"],
            ref["transaction_type"],
        ), tid
        assert row.timestamp == datetime.fromisoformat(ref["timestamp"]), tid
    for tx in extras:  # unicode and quotes are accepted and stored exactly
        row = stream[tx.transaction_id]
        assert row.status in (PENDING, DECLINED)
        assert Transaction(*(getattr(row, f) for f in STREAM_FIELDS)) == tx
    unknown = {bad.transaction_id for _, bad in bads if bad.reason == UNKNOWN_CARD}
    assert stream.keys() == seed.keys() | {t.transaction_id for t in extras} | unknown
    assert all(stream[tid].status == REJECTED for tid in unknown)
    assert (results / "rejected_transactions.csv").is_file() and (results / "stream_transactions.csv").is_file()
