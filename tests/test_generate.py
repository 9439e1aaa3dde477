"""The synthetic dataset generator (cardpipe.generate)."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from cardpipe import generate
from cardpipe.generate import GeneratorConfig, generate_dataset
from tests.reference import SEED_DATASET

FILES = ("customers.csv", "credit_card_types.csv", "cards.csv", "transactions.csv")

# SPEC §1, verbatim (and the seed's own header lines).
SPEC_HEADERS = {
    "customers.csv": "customer_id,name,phone_number,address,email,credit_score,annual_income",
    "credit_card_types.csv": "card_type_id,name,credit_score_min,credit_score_max,credit_limit_min,"
    "credit_limit_max,annual_fee,rewards_rate",
    "cards.csv": "card_id,customer_id,card_type_id,card_number,expiration_date,credit_limit,current_balance,issue_date",
    "transactions.csv": "transaction_id,card_id,merchant_name,timestamp,amount,location,"
    "transaction_type,related_transaction_id",
}
SEED_INPUT = SEED_DATASET / "input"
SAMPLE_DIR = Path(generate.__file__).parent / "sample_data"
SAMPLE_CONFIG = GeneratorConfig(transactions=600, customers=40, cards=70, seed=7)
TYPES = {"purchase", "bill_payment", "atm_withdrawal", "p2p_transfer", "wire_transfer", "refund", "cancellation"}


def read(folder: Path, name: str) -> list[dict[str, str]]:
    with open(folder / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def zip_of(text: str) -> str:
    return text.split()[-1] if text.split() else ""


@pytest.fixture(scope="module")
def ds2000(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("gen2000")
    return out, generate_dataset(out, GeneratorConfig(transactions=2000))


@pytest.fixture(scope="module")
def tables(ds2000: tuple[Path, dict[str, int]]) -> dict[str, list[dict[str, str]]]:
    out, _ = ds2000
    return {name.removesuffix(".csv"): read(out, name) for name in FILES}


# ---------------------------------------------------------------------------------------------
# Shape
# ---------------------------------------------------------------------------------------------
def test_headers_exactly_as_spec_and_seed(ds2000: tuple[Path, dict[str, int]]) -> None:
    out, _ = ds2000
    for name in FILES:
        with open(out / name, newline="", encoding="utf-8") as f:
            header = f.readline()
        assert header == SPEC_HEADERS[name] + "\n", name
        if SEED_INPUT.exists():
            assert header == (SEED_INPUT / name).read_text().splitlines(keepends=True)[0]


def test_returned_counts_match_the_files(ds2000: tuple[Path, dict[str, int]]) -> None:
    out, counts = ds2000
    assert counts == {"customers": 50, "credit_card_types": 5, "cards": 90, "transactions": 2000}
    for name in FILES:
        assert len(read(out, name)) == counts[name.removesuffix(".csv")]


def test_explicit_sizes_are_honoured(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, GeneratorConfig(transactions=123, customers=12, cards=20, seed=3))
    assert counts == {"customers": 12, "credit_card_types": 5, "cards": 20, "transactions": 123}
    assert [len(read(tmp_path, n)) for n in FILES] == [12, 5, 20, 123]


def test_zero_transactions_writes_headers_only(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, GeneratorConfig(transactions=0))
    assert counts["transactions"] == 0
    assert (tmp_path / "transactions.csv").read_text() == SPEC_HEADERS["transactions.csv"] + "\n"


def test_default_sizes() -> None:
    assert GeneratorConfig(transactions=400).resolved() == (30, 54)
    assert GeneratorConfig(transactions=2000).resolved() == (50, 90)
    assert GeneratorConfig(transactions=10_000_000).resolved() == (100_000, 180_000)
    assert GeneratorConfig(transactions=10, customers=5).resolved() == (5, 9)
    with pytest.raises(ValueError):
        GeneratorConfig(transactions=-1).resolved()
    with pytest.raises(ValueError):
        GeneratorConfig(transactions=5, cards=0).resolved()


def test_csv_quoting_is_the_csv_modules_minimal_quoting(ds2000: tuple[Path, dict[str, int]]) -> None:
    out, _ = ds2000
    for name in FILES:
        raw = (out / name).read_bytes()
        assert b"\r" not in raw
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
        buf = io.StringIO(newline="")
        csv.writer(buf, lineterminator="\n").writerows(rows)
        assert buf.getvalue().encode("utf-8") == raw, name


def test_card_types_are_the_seeds(ds2000: tuple[Path, dict[str, int]]) -> None:
    out, _ = ds2000
    expected = (
        SPEC_HEADERS["credit_card_types.csv"] + "\n" + "\n".join(",".join(row) for row in generate.CARD_TYPES) + "\n"
    )
    assert (out / "credit_card_types.csv").read_text() == expected
    if SEED_INPUT.exists():
        assert expected == (SEED_INPUT / "credit_card_types.csv").read_text()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, ds2000: tuple[Path, dict[str, int]]) -> None:
    first, _ = ds2000
    again, other = tmp_path / "again", tmp_path / "other"
    generate_dataset(again, GeneratorConfig(transactions=2000))
    generate_dataset(other, GeneratorConfig(transactions=2000, seed=43))
    for name in FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    for name in ("customers.csv", "cards.csv", "transactions.csv"):
        assert (first / name).read_bytes() != (other / name).read_bytes(), name


def test_output_does_not_depend_on_the_number_of_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "CHUNK_ROWS", 700)  # 5 chunks
    config = GeneratorConfig(transactions=3000, seed=11)
    monkeypatch.setattr(generate, "_worker_count", lambda chunks: 1)
    generate_dataset(tmp_path / "one", config)
    monkeypatch.setattr(generate, "_worker_count", lambda chunks: 2)
    seen: list[int] = []
    monkeypatch.setattr(generate, "PROGRESS_EVERY", 1000)
    generate_dataset(tmp_path / "two", config, progress=seen.append)
    for name in FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert seen == [1400, 2800, 3000]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(FILES)  # no part files left
    tx = read(tmp_path / "two", "transactions.csv")
    assert [int(t["transaction_id"]) for t in tx] == list(range(1, 3001))
    assert all(a["timestamp"] <= b["timestamp"] for a, b in zip(tx, tx[1:], strict=False))


def test_progress_is_called_at_the_end(tmp_path: Path) -> None:
    seen: list[int] = []
    generate_dataset(tmp_path, GeneratorConfig(transactions=50, seed=1), progress=seen.append)
    assert seen == [50]


# ---------------------------------------------------------------------------------------------
# Integrity and realism
# ---------------------------------------------------------------------------------------------
def test_referential_integrity(tables: dict[str, list[dict[str, str]]]) -> None:
    customers = {c["customer_id"] for c in tables["customers"]}
    type_ids = {t["card_type_id"] for t in tables["credit_card_types"]}
    cards = {c["card_id"]: c for c in tables["cards"]}
    assert [int(c["customer_id"]) for c in tables["customers"]] == list(range(1, len(customers) + 1))
    assert [int(c) for c in cards] == list(range(1, len(cards) + 1))
    assert all(c["customer_id"] in customers and c["card_type_id"] in type_ids for c in cards.values())
    assert all(t["card_id"] in cards for t in tables["transactions"])
    assert len({c["card_number"] for c in cards.values()}) == len(cards)


def test_transactions_in_timestamp_order_with_increasing_ids(tables: dict[str, list[dict[str, str]]]) -> None:
    tx = tables["transactions"]
    assert [int(t["transaction_id"]) for t in tx] == list(range(1, len(tx) + 1))
    stamps = [t["timestamp"] for t in tx]
    assert stamps == sorted(stamps)
    assert stamps[0] >= "2025-04-01 00:00:00" and stamps[-1] <= "2025-05-01 00:00:00"
    assert stamps[-1] >= "2025-04-25"  # spread over ~30 days


def test_field_formats(tables: dict[str, list[dict[str, str]]]) -> None:
    for c in tables["customers"]:
        assert re.fullmatch(r"\d{3}-\d{3}-\d{4}", c["phone_number"])
        assert re.fullmatch(r"\d+ [A-Za-z ]+, [A-Za-z .]+, [A-Z]{2} \d{5}", c["address"]), c["address"]
        assert re.fullmatch(r"[a-z0-9]+@example\.(com|org|net)", c["email"])
        assert 300 <= int(c["credit_score"]) <= 850
        assert re.fullmatch(r"\d+00\.0", c["annual_income"])
    types = {t["card_type_id"]: t for t in tables["credit_card_types"]}
    scores = {c["customer_id"]: int(c["credit_score"]) for c in tables["customers"]}
    for card in tables["cards"]:
        assert re.fullmatch(r"\d{4}-\d{4}-\d{4}-\d{4}", card["card_number"])
        assert re.fullmatch(r"(0[1-9]|1[0-2])/\d\d", card["expiration_date"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", card["issue_date"]) and card["issue_date"] < "2025-04-01"
        assert re.fullmatch(r"\d+00\.0", card["credit_limit"])
        assert re.fullmatch(r"\d+\.\d\d", card["current_balance"])
        kind, limit = types[card["card_type_id"]], float(card["credit_limit"])
        assert float(kind["credit_limit_min"]) <= limit <= float(kind["credit_limit_max"])
        assert 0 < float(card["current_balance"]) < limit * 0.05
        # the tier fits the owner's score (sub-prime owners get the Basic card)
        assert int(kind["credit_score_min"]) <= scores[card["customer_id"]] or card["card_type_id"] == "1"
    for t in tables["transactions"]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", t["timestamp"])
        assert re.fullmatch(r"-?\d+\.\d\d", t["amount"]) and Decimal(t["amount"]) != 0
        assert t["transaction_type"] in TYPES
        assert t["merchant_name"] and t["location"]


def test_transaction_type_mix_and_refund_links(tables: dict[str, list[dict[str, str]]]) -> None:
    tx = tables["transactions"]
    mix = Counter(t["transaction_type"] for t in tx)
    assert set(mix) == TYPES
    assert all(mix[k] >= 0.1 * len(tx) for k in TYPES - {"cancellation"})
    by_id = {t["transaction_id"]: t for t in tx}
    linked = 0
    for t in tx:
        negative = Decimal(t["amount"]) < 0
        assert negative == (t["transaction_type"] in ("refund", "cancellation"))
        if t["related_transaction_id"]:
            linked += 1
            assert negative
            original = by_id[t["related_transaction_id"]]
            assert int(original["transaction_id"]) < int(t["transaction_id"])
            assert original["card_id"] == t["card_id"]
            assert Decimal(original["amount"]) >= -Decimal(t["amount"]) > 0
    assert linked >= 0.5 * sum(mix[k] for k in ("refund", "cancellation"))
    assert len({t["related_transaction_id"] for t in tx if t["related_transaction_id"]}) == linked


def test_locations_mostly_near_the_owner(tables: dict[str, list[dict[str, str]]]) -> None:
    owner_zip = {c["customer_id"]: zip_of(c["address"]) for c in tables["customers"]}
    card_zip = {c["card_id"]: owner_zip[c["customer_id"]] for c in tables["cards"]}
    zips = [(card_zip[t["card_id"]], zip_of(t["location"])) for t in tables["transactions"]]
    near = sum(1 for cz, mz in zips if len(mz) == 5 and mz.isdigit() and mz[0] == cz[0])
    far = sum(1 for cz, mz in zips if len(mz) == 5 and mz.isdigit() and mz[0] != cz[0])
    assert near >= 0.85 * len(zips)
    assert 0.02 * len(zips) <= far <= 0.12 * len(zips)
    zip_firsts = Counter(z[0] for z in owner_zip.values())
    assert zip_firsts["1"] >= 0.8 * len(owner_zip) and len(zip_firsts) >= 2


# ---------------------------------------------------------------------------------------------
# Edge cases (each present in a 2000-transaction dataset)
# ---------------------------------------------------------------------------------------------
def test_edge_cases_present(tables: dict[str, list[dict[str, str]]]) -> None:
    limits = {c["card_id"]: Decimal(c["credit_limit"]) for c in tables["cards"]}
    tx = tables["transactions"]
    amounts = [(abs(Decimal(t["amount"])), limits[t["card_id"]]) for t in tx]
    assert any(a == lim / 2 for a, lim in amounts), "amount exactly half the limit"
    assert any(a > lim / 2 for a, lim in amounts), "amount above half the limit"
    zips = [zip_of(t["location"]) for t in tx]
    assert any(z.isdigit() and len(z) < 5 for z in zips), "short zip"
    assert any(not z[:1].isdigit() for z in zips), "location without a zip"
    per_second = Counter(t["timestamp"] for t in tx)
    assert max(per_second.values()) >= 3, "several transactions at one second"
    per_card_second = Counter((t["timestamp"], t["card_id"]) for t in tx)
    assert max(per_card_second.values()) >= 2, "a tie on the same card"
    holders = {c["customer_id"] for c in tables["cards"]}
    assert any(c["customer_id"] not in holders for c in tables["customers"]), "customer without card"


def test_small_datasets_still_work(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, GeneratorConfig(transactions=5, customers=1, cards=1, seed=9))
    assert counts == {"customers": 1, "credit_card_types": 5, "cards": 1, "transactions": 5}
    tx = read(tmp_path, "transactions.csv")
    assert {t["card_id"] for t in tx} == {"1"}


# ---------------------------------------------------------------------------------------------
# The bundled sample dataset
# ---------------------------------------------------------------------------------------------
def test_bundled_sample_data_exists_and_is_reproducible(tmp_path: Path) -> None:
    assert [len(read(SAMPLE_DIR, n)) for n in FILES] == [40, 5, 70, 600]
    generate_dataset(tmp_path, SAMPLE_CONFIG)
    for name in FILES:
        assert (SAMPLE_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), name
