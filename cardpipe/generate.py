"""Synthetic input datasets in the seed's four-CSV shape (SPEC §1), of any size.

``generate_dataset(out_dir, GeneratorConfig(transactions=N))`` writes ``customers.csv``,
``credit_card_types.csv``, ``cards.csv`` and ``transactions.csv`` with the seed's exact headers,
column order, quoting (csv ``QUOTE_MINIMAL``) and ``\\n`` line endings, and returns the row counts.

Properties
----------
* Deterministic: the same config gives the same bytes, whatever the machine's core count.
* Realistic like ``reference/seed_dataset_22``: the seed's five card tiers, customers in NY (zips
  starting with ``1``) and a few in other states, card tiers that fit the owner's credit score,
  limits rounded to 100, transactions over ~30 days from ``config.start`` in timestamp order
  (ids increase with time), a mix of every ``transaction_type``; refunds and cancellations are
  negative and point (``related_transaction_id``) at an earlier transaction of the same card.
* Edge cases the rules must handle, each present at least once in every chunk of ≥ 20 rows
  (so in any dataset of ≥ 1000 transactions), plus a small random rate: amounts of exactly half
  the card's limit, amounts above half the limit, merchant locations far away (other first zip
  digit), short zips (``NY 1234``), locations without a zip (``Online``), timestamp ties
  (also on the same card); and, when there are ≥ 10 customers, customers without any card and
  at least one customer outside NY (zip not starting with ``1``, possibly with a leading ``0``).
* Fast: transactions are generated in fixed chunks of ``CHUNK_ROWS`` rows, each from its own
  seeded ``random.Random``; chunks run on up to two worker processes and are written in order.
  Caveat of the chunking: a refund only links to an earlier transaction of the same chunk.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import shutil
import signal
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import accumulate, islice, repeat
from math import log
from operator import add
from pathlib import Path
from typing import BinaryIO

from cardpipe.childprocs import usable_cores
from cardpipe.domain.records import CARD_COLUMNS, CARD_TYPE_COLUMNS, CUSTOMER_COLUMNS, TRANSACTION_COLUMNS
from cardpipe.errors import CardpipeError

__all__ = [
    "CARDS_HEADER",
    "CARD_TYPES",
    "CARD_TYPES_HEADER",
    "CHUNK_ROWS",
    "CUSTOMERS_HEADER",
    "TRANSACTIONS_HEADER",
    "GeneratorConfig",
    "generate_dataset",
]

# The input CSVs' headers: the columns of each table, defined once in the domain core.
CUSTOMERS_HEADER = CUSTOMER_COLUMNS
CARD_TYPES_HEADER = CARD_TYPE_COLUMNS
CARDS_HEADER = CARD_COLUMNS
TRANSACTIONS_HEADER = TRANSACTION_COLUMNS

# The seed's card tiers, verbatim (reference/seed_dataset_22/input/credit_card_types.csv).
CARD_TYPES: tuple[tuple[str, ...], ...] = (
    ("1", "Basic", "580", "669", "1000", "5000", "0", "0.005"),
    ("2", "Gold", "670", "739", "5000", "10000", "95", "0.01"),
    ("3", "Platinum", "740", "799", "10000", "25000", "195", "0.02"),
    ("4", "Diamond", "800", "850", "25000", "50000", "495", "0.03"),
    ("5", "Black", "800", "850", "50000", "100000", "695", "0.05"),
)

CHUNK_ROWS = 100_000  # transactions per independently seeded chunk (fixed: part of the output)
SPAN_SECONDS = 30 * 86_400  # transactions cover ~30 days from config.start
MAX_DEFAULT_CUSTOMERS = 100_000
PROGRESS_EVERY = 1_000_000


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST = _words(
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard "
    "Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty "
    "Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua "
    "Michelle Kenneth Carol Kevin Amanda Brian Melissa George Deborah Timothy Stephanie Ronald "
    "Rebecca Edward Sharon Jason Laura Jeffrey Cynthia Ryan Kathleen Jacob Amy Gary Angela Nicholas "
    "Shirley Eric Anna Jonathan Brenda Stephen Pamela Larry Emma Justin Nicole Scott Helen Brandon "
    "Samantha Benjamin Katherine Samuel Christine Gregory Debra Alexander Rachel Frank Carolyn "
    "Patrick Janet Raymond Catherine Jack Maria Dennis Heather Jerry Diane Tyler Ruth Aaron Julie "
    "Jose Olivia Adam Joyce Nathan Virginia Henry Victoria Douglas Kelly Zachary Lauren Peter "
    "Christina Kyle Joan Ethan Evelyn Walter Judith Noah Megan Jeremy Andrea Christian Cheryl Keith "
    "Hannah Roger Jacqueline Terry Martha Gerald Gloria Harold Teresa Sean Ann Austin Sara Carl "
    "Madison Arthur Frances Lawrence Kathryn Dylan Janice Jesse Jean Jordan Abigail Bryan Alice "
    "Billy Judy Joe Sophia Bruce Grace Gabriel Denise Logan Amber Albert Doris Willie Marilyn Alan "
    "Danielle Juan Beverly Wayne Isabella Elijah Theresa Randy Diana Roy Natalie Vincent Brittany "
    "Ralph Charlotte Eugene Marie Russell Kayla Bobby Alexis Mason Lori Philip Monica Destiny Heidi"
)
_LAST = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips "
    "Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers "
    "Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson "
    "Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders "
    "Patel Myers Long Ross Foster Jimenez Powell Jenkins Perry Russell Sullivan Bell Coleman Butler "
    "Henderson Barnes Gonzales Fisher Vasquez Simmons Romero Jordan Patterson Alexander Hamilton "
    "Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera Gibson Ellis Tran Medina "
    "Aguilar Stevens Murray Ford Castro Marshall Owens Harrison Fernandez Mcdonald Woods Washington "
    "Kennedy Wells Vargas Henry Chen Freeman Webb Tucker Guzman Burns Crawford Olson Simpson Porter "
    "Hunter Gordon Mendez Silva Shaw Snyder Mason Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black "
    "Robertson Boyd Rose Stone Salazar Fox Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson "
    "Nichols Stephens Soto Weaver Ryan Gardner Payne Grant Dunn Kelley Spencer Hawkins Arnold Pierce "
    "Vazquez Hansen Peters Santos Hart Bradley Knight Elliott Cunningham Duncan Armstrong Hudson "
    "Carroll Lane Riley Andrews Alvarado Ray Delgado Berry Perkins Hoffman Johnston Matthews Pena "
    "Richards Contreras Willis Carpenter Lawrence Sandoval Guerrero George Chapman Rios Estrada "
    "Ortega Watkins Greene Nunez Wheeler Valdez Harper Burke Larson Santiago Maldonado Morrison "
    "Franklin Carlson Austin Dominguez Carr Lawson Jacobs Obrien Lynch Singh Vega Bishop Montgomery "
    "Oliver Jensen Harvey Williamson Gilbert Dean Sims Espinoza Howell Li Wong Reid Hanson Le "
    "Mccoy Garrett Burton Fuller Wang Weber Welch Rojas Lucas Marquez Fields Park Yang Little Banks "
    "Padilla Day Walsh Bowman Schultz Luna Fowler Mejia Davidson Acosta Brewer May Holland Juarez "
    "Newman Pearson Curtis Cortez Douglas Schneider Joseph Barrett Navarro Figueroa Keller Avila "
    "Wade Molina Stanley Hopkins Campos Barnett Bates Chambers Caldwell Beck Lambert Miranda Byrd "
    "Craig Ayala Lowe Frazier Powers Neal Leonard Gregory Carrillo Sutton Fleming Rhodes Shelton "
    "Schwartz Norris Jennings Watts Duran Walters Cohen Mcdaniel Moran Parks Steele Vaughn Becker"
)
_STREET_SUFFIX = _words(
    "Street Avenue Road Lane Drive Court Place Way Ridge Lake Spur Prairie Inlet Junctions Landing "
    "Mills Extension Rue Crest Creek Roads Terrace Shores Oval Meadows River Pass Pine Cliff Springs "
    "Island Mall Harbors Gardens Heights Trail Plaza Point Glen Station Summit Crossing Viaduct Knoll "
    "Motorway Freeway Stravenue Ports Field Forks Harbor Hollow Loop Manor Park Square Valley Village"
)
_COMPANY_SUFFIX = ("Inc", "LLC", "Ltd", "PLC", "Group", "and Sons")

# first zip digit -> (state, zip low, zip high, cities)
_REGIONS: dict[str, tuple[tuple[str, int, int, tuple[str, ...]], ...]] = {
    "0": (
        ("CT", 6001, 6928, ("Hartford", "New Haven", "Stamford", "Bridgeport", "Waterbury")),
        ("NJ", 7001, 8989, ("Newark", "Jersey City", "Paterson", "Trenton", "Camden", "Hoboken")),
        ("MA", 1001, 2791, ("Boston", "Worcester", "Springfield", "Lowell", "Cambridge")),
        ("VT", 5001, 5907, ("Burlington", "Montpelier", "Rutland")),
    ),
    "1": (
        (
            "NY",
            10001,
            14925,
            (
                "New York",
                "Brooklyn",
                "Queens",
                "Bronx",
                "Staten Island",
                "Buffalo",
                "Rochester",
                "Yonkers",
                "Syracuse",
                "Albany",
                "New Rochelle",
                "Schenectady",
                "Utica",
                "White Plains",
                "Troy",
                "Niagara Falls",
                "Binghamton",
                "Cheektowaga",
                "Ithaca",
            ),
        ),
        ("PA", 15001, 19640, ("Philadelphia", "Pittsburgh", "Allentown", "Erie", "Scranton")),
    ),
    "2": (
        ("VA", 22001, 24658, ("Richmond", "Arlington", "Norfolk", "Alexandria")),
        ("NC", 27006, 28909, ("Charlotte", "Raleigh", "Durham", "Greensboro")),
        ("MD", 20601, 21930, ("Baltimore", "Annapolis", "Rockville")),
    ),
    "3": (
        ("FL", 32003, 34997, ("Miami", "Orlando", "Tampa", "Jacksonville")),
        ("GA", 30002, 31999, ("Atlanta", "Savannah", "Augusta")),
        ("TN", 37010, 38589, ("Nashville", "Memphis", "Knoxville")),
    ),
    "4": (
        ("OH", 43001, 45999, ("Columbus", "Cleveland", "Cincinnati", "Toledo")),
        ("MI", 48001, 49971, ("Detroit", "Grand Rapids", "Lansing", "Ann Arbor")),
        ("IN", 46001, 47997, ("Indianapolis", "Fort Wayne", "Evansville")),
    ),
    "5": (
        ("MN", 55001, 56763, ("Minneapolis", "Saint Paul", "Duluth")),
        ("WI", 53001, 54990, ("Milwaukee", "Madison", "Green Bay")),
        ("IA", 50001, 52809, ("Des Moines", "Cedar Rapids", "Davenport")),
    ),
    "6": (
        ("IL", 60001, 62999, ("Chicago", "Aurora", "Naperville", "Springfield", "Peoria")),
        ("MO", 63001, 65899, ("Kansas City", "Saint Louis", "Springfield")),
        ("KS", 66002, 67954, ("Wichita", "Topeka", "Overland Park")),
    ),
    "7": (
        ("TX", 75001, 79999, ("Houston", "Dallas", "Austin", "San Antonio", "El Paso")),
        ("LA", 70001, 71497, ("New Orleans", "Baton Rouge", "Shreveport")),
        ("OK", 73001, 74966, ("Oklahoma City", "Tulsa", "Norman")),
    ),
    "8": (
        ("CO", 80001, 81658, ("Denver", "Colorado Springs", "Boulder", "Aurora")),
        ("AZ", 85001, 86556, ("Phoenix", "Tucson", "Mesa", "Scottsdale")),
        ("UT", 84001, 84791, ("Salt Lake City", "Provo", "Ogden")),
        ("NV", 88901, 89883, ("Las Vegas", "Reno", "Henderson")),
    ),
    "9": (
        ("CA", 90001, 96162, ("Los Angeles", "San Diego", "San Jose", "San Francisco", "Fresno")),
        ("WA", 98001, 99403, ("Seattle", "Spokane", "Tacoma")),
        ("OR", 97001, 97920, ("Portland", "Salem", "Eugene")),
    ),
}
_DIGITS = "0123456789"
_CUSTOMER_FAR_DIGITS = "0023456789"  # out-of-state customers: NJ/CT/MA more often than the rest
_OUT_OF_STATE_CUSTOMERS = 0.08
_NO_CARD_SHARE = 0.03  # customers without any card (at least one when >= 10)
_NO_ZIP_LOCATIONS = ("Online", "Online", "Online", "Mobile App", "Online Store")

# Transaction type codes: 0 refund, 1 cancellation, 2..6 positive types; 7..11 are the positive
# types again for edge-case rows (never the target of a refund). Weights out of 1024.
_TYPE_NAMES = (
    "refund",
    "cancellation",
    "purchase",
    "bill_payment",
    "atm_withdrawal",
    "p2p_transfer",
    "wire_transfer",
)
_TYPE_WEIGHTS = (150, 32, 242, 150, 150, 150, 150)
_TYPE_BITS = 10
_EDGE_TYPE_OFFSET = 5

_LOCATION_BITS = 12  # 4096 location strings per zip digit
_FAR_SHARE = 0.06  # share of a card's transactions made at a far zip (other first digit)
_MERCHANT_BITS = 13  # 8192 merchant names
_DOLLAR_BITS = 9  # usual amounts: $5 .. $499 (512 steps) ...
_CENT_BITS = 7  # ... and .00 .. .99 (128 steps)
_LARGE_RATE = 0.035  # amounts x2..x15 the usual size, like the seed's large ones
_EDGE_RATE = 0.004  # random edge-case rows (half limit, over half, short zip, no zip)
_TIE_RATE = 0.004  # rows that copy the previous row's timestamp
_SAME_CARD_TIE = 0.4  # ... and also its card
_PARTIAL_REFUND = 0.4  # refunds of part of the original amount (else all of it)

_EDGE_HALF, _EDGE_OVER, _EDGE_SHORT_ZIP, _EDGE_NO_ZIP = 1, 2, 3, 4
_FORCED_MIN_ROWS = 20


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. ``customers``/``cards`` default from ``transactions`` (see ``resolved``)."""

    transactions: int
    customers: int | None = None  # default: max(30, transactions // 40), at most 100,000
    cards: int | None = None  # default: ~1.8 cards per customer
    seed: int = 42
    start: datetime = datetime(2025, 4, 1)

    def resolved(self) -> tuple[int, int]:
        """(customers, cards) after defaults, validated."""
        if self.transactions < 0:
            raise ValueError("transactions must be >= 0")
        customers = self.customers
        if customers is None:
            customers = min(max(30, self.transactions // 40), MAX_DEFAULT_CUSTOMERS)
        if customers < 1:
            raise ValueError("customers must be >= 1")
        cards = self.cards if self.cards is not None else max(1, round(customers * 1.8))
        if cards < 0:
            raise ValueError("cards must be >= 0")
        if cards == 0 and self.transactions > 0:
            raise ValueError("transactions need at least one card")
        return customers, cards


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
class _Rng(random.Random):
    """random.Random with cheap uniform picks (the stock choice/randint are slow pure Python)."""

    def pick(self, seq):
        return seq[int(self.random() * len(seq))]

    def rint(self, lo: int, hi: int) -> int:
        return lo + int(self.random() * (hi - lo + 1))


def _csv_field(text: str) -> str:
    """One field as csv.QUOTE_MINIMAL writes it."""
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _cents(c: int) -> str:
    sign = "-" if c < 0 else ""
    c = abs(c)
    return f"{sign}{c // 100}.{c % 100:02d}"


def _street(rng: _Rng) -> str:
    name = rng.pick(_LAST) if rng.random() < 0.5 else rng.pick(_FIRST)
    return f"{rng.rint(1, 9999)} {name} {rng.pick(_STREET_SUFFIX)}"


def _place(rng: _Rng, digit: str, ny_only: bool = False) -> tuple[str, str]:
    """(', CITY, ST' without the zip, zip) in the region of the first zip digit."""
    regions = _REGIONS[digit]
    if ny_only and digit == "1":
        region = regions[0]
    elif digit == "1":
        region = regions[0] if rng.random() < 0.85 else regions[1]
    else:
        region = rng.pick(regions)
    state, lo, hi, cities = region
    return f"{rng.pick(cities)}, {state}", f"{rng.rint(lo, hi):05d}"


def _address(rng: _Rng, digit: str, ny_only: bool = False) -> str:
    place, zipcode = _place(rng, digit, ny_only)
    return f"{_street(rng)}, {place} {zipcode}"


def _person_name(rng: _Rng) -> tuple[str, str, str]:
    first, last = rng.pick(_FIRST), rng.pick(_LAST)
    full = f"{first} {last}"
    r = rng.random()
    if r < 0.04:
        full = f"{rng.pick(('Mr.', 'Mrs.', 'Ms.', 'Dr.'))} {full}"
    elif r < 0.07:
        full = f"{full} {rng.pick(('MD', 'DDS', 'PhD', 'Jr.', 'II'))}"
    elif r < 0.09:
        full = f"{rng.pick(('Mr.', 'Mrs.'))} {full} {rng.pick(('MD', 'DDS'))}"
    return full, first, last


def _email(rng: _Rng, first: str, last: str) -> str:
    f, la = first.lower(), last.lower()
    r = rng.random()
    if r < 0.35:
        user = f"{f}{la}"
    elif r < 0.6:
        user = f"{la}{f}"
    elif r < 0.8:
        user = f"{f}{rng.rint(0, 99):02d}"
    else:
        user = f"{f[0]}{la}"
    return f"{user}@{rng.pick(('example.com', 'example.org', 'example.net'))}"


def _merchant(rng: _Rng) -> str:
    r = rng.random()
    if r < 0.4:
        name = f"{rng.pick(_LAST)} {rng.pick(_COMPANY_SUFFIX)}"
    elif r < 0.7:
        name = f"{rng.pick(_LAST)}-{rng.pick(_LAST)}"
    else:
        name = f"{rng.pick(_LAST)}, {rng.pick(_LAST)} and {rng.pick(_LAST)}"
    return _csv_field(name)


def _credit_score(rng: _Rng) -> int:
    if rng.random() < 0.04:
        return rng.rint(300, 579)  # sub-prime: no tier fits, they get a Basic card
    return max(300, min(850, round(rng.gauss(730, 60))))


_ELIGIBLE = [[i for i, t in enumerate(CARD_TYPES) if int(t[2]) <= score] or [0] for score in range(851)]


# Card number heads: Visa 4xxx, Mastercard 51xx-55xx, Amex 34xx/37xx, Discover 6011/644x-649x/65xx.
_CARD_HEADS = (
    [f"4{k:03d}" for k in range(1000)]
    + [f"5{k:03d}" for k in range(100, 600)] * 2
    + [f"3{d}{k:02d}" for d in "47" for k in range(100)] * 2
    + ["6011"] * 200
    + [f"64{k}" for k in range(40, 100)]
    + [f"65{k:02d}" for k in range(100)]
)


def _card_number(rng: _Rng) -> str:
    body = f"{rng.rint(0, 999_999_999_999):012d}"
    return f"{rng.pick(_CARD_HEADS)}-{body[:4]}-{body[4:8]}-{body[8:]}"


# ----------------------------------------------------------------------------------------------
# Customers and cards
# ----------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Who is where, who holds which cards (the numbers the text pass and the rules depend on)."""

    customer_digit: list[str]  # first zip digit of each customer's address
    scores: list[int]
    card_owner: list[int]  # per card (card_id - 1): customer index
    card_type: list[int]  # index into CARD_TYPES
    card_limit: list[int]  # dollars, a multiple of 100


@dataclass
class _Context:
    """Everything a transaction chunk needs; per-card data is indexed by card_id."""

    n_cards: int
    limit_cents: list[int]  # per card_id (index 0 unused)
    loc_flat: list[str]  # location pools (with the comma) of zip digits 0..9, one after another
    loc_base: array  # per card_id: start of its owner's zip digit's pool in loc_flat
    short_zip: list[list[str]]  # per zip digit: locations with a 4-digit zip
    card_pool: array  # card_ids drawn by activity weight, length 2**card_pool_bits
    card_pool_bits: int
    merchants: list[str]  # CSV-escaped, between commas: ",Barrett LLC,"
    day_prefix: list[str]  # "2025-04-01 " per day offset from start's midnight
    start_second: int  # seconds from start's midnight to start


def _plan(config: GeneratorConfig, customers: int, cards: int) -> tuple[_Plan, _Context]:
    """The dataset's structure and the transaction context (fast: no customer/card text)."""
    rng = _Rng(f"cardpipe-generate:{config.seed}:plan")
    rnd, rint, pick = rng.random, rng.rint, rng.pick

    digits = [pick(_CUSTOMER_FAR_DIGITS) if rnd() < _OUT_OF_STATE_CUSTOMERS else "1" for _ in range(customers)]
    if customers >= 10 and digits.count("1") == customers:
        digits[int(rnd() * customers)] = "0"  # at least one out-of-state zip ("07302")
    scores = [_credit_score(rng) for _ in range(customers)]

    # Who holds how many cards: a few customers (>= 1 when customers >= 10) hold none.
    no_card = max(1, round(customers * _NO_CARD_SHARE)) if customers >= 10 else 0
    holders_n = max(0, min(customers - no_card, cards))
    holders = sorted(rng.sample(range(customers), holders_n)) if holders_n else []
    counts = dict.fromkeys(holders, 1)
    extra = cards - holders_n
    cap = max(4, -(-cards // max(1, holders_n)) + 1)
    while extra > 0:
        h = holders[int(rnd() * holders_n)]
        if counts[h] < cap:
            counts[h] += 1
            extra -= 1

    limit_range = [(int(t[4]) // 100, int(t[5]) // 100) for t in CARD_TYPES]
    plan = _Plan(digits, scores, [], [], [])
    weights: list[float] = []
    for h in holders:
        eligible = _ELIGIBLE[scores[h]]
        types: list[int] = []
        for _ in range(counts[h]):
            fresh = [t for t in eligible if t not in types] or eligible
            # the first card is most often the best tier the score allows
            types.append(fresh[-1] if not types and rnd() < 0.6 else pick(fresh))
        for t in types:
            plan.card_owner.append(h)
            plan.card_type.append(t)
            plan.card_limit.append(rint(*limit_range[t]) * 100)
            weights.append(0.15 + 3.0 * rnd() ** 2)  # skewed activity per card

    # Location pools per zip digit: mostly near (same first digit), _FAR_SHARE far.
    size = 1 << _LOCATION_BITS
    near = {d: [_csv_field(_address(rng, d)) + "," for _ in range(size)] for d in _DIGITS}
    short: dict[str, list[str]] = {}
    for d in _DIGITS:
        short[d] = []
        for _ in range(16):
            place, zipcode = _place(rng, d)
            short[d].append(_csv_field(f"{_street(rng)}, {place} {zipcode[:4]}") + ",")
    mixed: dict[str, list[str]] = {}
    for d in _DIGITS:
        pool = list(near[d])
        others = [o for o in _DIGITS if o != d]
        for k in rng.sample(range(size), round(size * _FAR_SHARE)):
            pool[k] = pick(near[pick(others)])
        mixed[d] = pool

    # Card activity: a pool of card_ids, each repeated in proportion to its weight.
    bits = 12
    while (1 << bits) < 2 * cards and bits < 21:
        bits += 1
    card_pool = array("i")
    if cards:
        scale = (1 << bits) / sum(weights)
        for card_id, wgt in enumerate(weights, start=1):
            card_pool.extend(repeat(card_id, int(wgt * scale)))
        filled = len(card_pool)
        card_pool.extend(card_pool[int(rnd() * filled)] for _ in range((1 << bits) - filled))

    days = SPAN_SECONDS // 86_400 + 2
    start_midnight = datetime.combine(config.start.date(), datetime.min.time())
    ctx = _Context(
        n_cards=cards,
        limit_cents=[0] + [limit * 100 for limit in plan.card_limit],
        loc_flat=[loc for d in _DIGITS for loc in mixed[d]],
        loc_base=array("i", [0] + [int(digits[h]) << _LOCATION_BITS for h in plan.card_owner]),
        short_zip=[short[d] for d in _DIGITS],
        card_pool=card_pool,
        card_pool_bits=bits,
        merchants=["," + _merchant(rng) + "," for _ in range(1 << _MERCHANT_BITS)],
        day_prefix=[(start_midnight + timedelta(days=k)).strftime("%Y-%m-%d ") for k in range(days)],
        start_second=int((config.start - start_midnight).total_seconds()),
    )
    return plan, ctx


def _write_people(config: GeneratorConfig, plan: _Plan, out_dir: Path) -> None:
    """customers.csv and cards.csv: names, phones, addresses, emails, card numbers, dates."""
    rng = _Rng(f"cardpipe-generate:{config.seed}:people")
    rnd, rint = rng.random, rng.rint

    with open(out_dir / "customers.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CUSTOMERS_HEADER)
        for cid, (digit, score) in enumerate(zip(plan.customer_digit, plan.scores, strict=True), 1):
            name, first, last = _person_name(rng)
            phone = f"{rint(200, 999)}-{rint(200, 999)}-{rint(0, 9999):04d}"
            address = _address(rng, digit, ny_only=True)
            income = max(12_000, min(2_500_000, int(round(rng.lognormvariate(11.3, 0.6), -2))))
            w.writerow((cid, name, phone, address, _email(rng, first, last), score, f"{income}.0"))

    start_day = config.start.date()
    # issued 35 days to 3 years before start: (ISO date, months since year 0)
    issue_days = [
        (d.isoformat(), d.year * 12 + d.month - 1)
        for d in (start_day - timedelta(days=k) for k in range(35, 3 * 365 + 1))
    ]
    type_ids = [t[0] for t in CARD_TYPES]
    seen_numbers: set[str] = set()
    with open(out_dir / "cards.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CARDS_HEADER)
        rows = zip(plan.card_owner, plan.card_type, plan.card_limit, strict=True)
        for card_id, (owner, t, limit) in enumerate(rows, 1):
            balance = round(limit * 100 * (0.002 + 0.043 * rnd()))
            number = _card_number(rng)
            while number in seen_numbers:
                number = _card_number(rng)
            seen_numbers.add(number)
            issued, issued_month = issue_days[int(rnd() * len(issue_days))]
            months = issued_month + 36 + int(rnd() * 12)
            expiry = f"{months % 12 + 1:02d}/{(months // 12) % 100:02d}"
            w.writerow((card_id, owner + 1, type_ids[t], number, expiry, f"{limit}.0", _cents(balance), issued))


# ----------------------------------------------------------------------------------------------
# Transactions
# ----------------------------------------------------------------------------------------------
_TABLES: dict[str, list] = {}


def _tables() -> dict[str, list]:
    """Lookup tables shared by all chunks of a process (built once)."""
    if not _TABLES:
        dollars = [5 + k * 495 // (1 << _DOLLAR_BITS) for k in range(1 << _DOLLAR_BITS)]
        cents = [k * 100 // (1 << _CENT_BITS) for k in range(1 << _CENT_BITS)]
        _TABLES["dollar_cents"] = [d * 100 for d in dollars]
        _TABLES["cents"] = cents
        _TABLES["dollar_text"] = [f"{d}." for d in dollars]
        _TABLES["cent_text"] = [f"{c:02d}," for c in cents]
        _TABLES["thousands"] = [f"{k:03d}" for k in range(1000)]
        _TABLES["hms"] = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}," for s in range(86_400)]
        codes = [t for t, wgt in enumerate(_TYPE_WEIGHTS) for _ in range(wgt)]
        assert len(codes) == 1 << _TYPE_BITS
        _TABLES["type_code"] = codes
        tails = [f"{name},\n" for name in _TYPE_NAMES]
        _TABLES["type_tail"] = tails + tails[2:]  # codes 7..11: edge-case positives
    return _TABLES


_WORKER: dict[str, object] = {}


def _init_worker(config: GeneratorConfig, plan: _Plan, ctx: _Context, out_dir: Path) -> None:
    # The parent handles Ctrl-C (it stops the pool); SIGTERM ends a worker at once, without the handler it may
    # have inherited from the CLI (which would print a traceback from the worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER.update(config=config, plan=plan, ctx=ctx, out_dir=out_dir)
    _tables()


def _people_job() -> None:
    _write_people(_WORKER["config"], _WORKER["plan"], _WORKER["out_dir"])  # type: ignore[arg-type]


def _chunk_job(job: tuple[int, int, int, int, int, int]) -> str:
    """Write one chunk to a part file next to transactions.csv; return its path."""
    path = _part_path(_WORKER["out_dir"], job[1])  # type: ignore[arg-type]
    data = _chunk(_WORKER["ctx"], *job)  # type: ignore[arg-type]
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _part_path(out_dir: Path, index: int) -> Path:
    return out_dir / f".transactions.csv.part{index:05d}"


def _id_strings(first: int, n: int, thousands: list[str]) -> list[str]:
    """str() of first .. first+n-1, whole thousands built as prefix + "000".."999" (faster)."""
    end = first + n
    head = min(end, -(-first // 1000) * 1000)
    out = list(map(str, range(first, head)))
    for block in range(head // 1000, end // 1000):
        out.extend(map(add, repeat(str(block), 1000), thousands))
    out.extend(map(str, range(max(head, end // 1000 * 1000), end)))
    return out


def _chunk(ctx: _Context, seed: int, index: int, first_id: int, n: int, sec_lo: int, sec_hi: int) -> bytes:
    """CSV lines of rows first_id .. first_id+n-1, timestamps in [sec_lo, sec_hi) after start.

    Built column by column with C-level map/list operations, then interleaved and joined.
    """
    tables = _tables()
    rng = _Rng(f"cardpipe-generate:{seed}:transactions:{index}")
    rnd, bits = rng.random, rng.getrandbits

    # When: n sorted seconds in [sec_lo, sec_hi] after start, as "YYYY-MM-DD HH:MM:SS," labels.
    # Sorted uniforms without sorting: normalized partial sums of n + 1 exponential gaps.
    width = max(1, sec_hi - sec_lo)
    base = ctx.start_second + sec_lo
    days, hms = ctx.day_prefix, tables["hms"]
    cum = list(accumulate(map(log, map((1.0).__sub__, islice(iter(rnd, None), n + 1)))))
    scale = width / (cum.pop() or -1.0)
    offsets = map(int, map(scale.__mul__, cum))
    if width <= n:  # dense: label every second of the range once
        labels = [days[t // 86_400] + hms[t % 86_400] for t in range(base, base + width + 1)]
        stamps = list(map(labels.__getitem__, offsets))
    else:
        stamps = [days[t // 86_400] + hms[t % 86_400] for t in map(base.__add__, offsets)]
    # Which card, what type, how much.
    cards = list(map(ctx.card_pool.__getitem__, map(bits, repeat(ctx.card_pool_bits, n))))
    types = list(map(tables["type_code"].__getitem__, map(bits, repeat(_TYPE_BITS, n))))
    dollar_idx = list(map(bits, repeat(_DOLLAR_BITS, n)))
    cent_idx = list(map(bits, repeat(_CENT_BITS, n)))
    amount_hi = list(map(tables["dollar_text"].__getitem__, dollar_idx))  # "131."
    amount_lo = list(map(tables["cent_text"].__getitem__, cent_idx))  # "76,"
    dollar_cents, cents_of = tables["dollar_cents"], tables["cents"]

    # Edge cases: forced once each per chunk (distinct rows), plus small random rates.
    edges: dict[int, int] = {}
    ties: dict[int, bool] = {}
    if n >= _FORCED_MIN_ROWS:
        p = rng.sample(range(1, n), 6)
        edges = {p[0]: _EDGE_HALF, p[1]: _EDGE_OVER, p[2]: _EDGE_SHORT_ZIP, p[3]: _EDGE_NO_ZIP}
        ties = {p[4]: False, p[5]: True}
        if p[4] + 1 < n:
            ties[p[4] + 1] = True  # a triple: three rows at one second, two of them on one card
    for i in rng.sample(range(n), int(n * _EDGE_RATE)):
        edges.setdefault(i, 1 + int(rnd() * 4))
    if n > 1:
        for i in rng.sample(range(1, n), int(n * _TIE_RATE)):
            ties.setdefault(i, rnd() < _SAME_CARD_TIE)
    for i in sorted(ties):  # ties copy the previous row's second (and maybe its card)
        stamps[i] = stamps[i - 1]
        if ties[i]:
            cards[i] = cards[i - 1]
    limits = ctx.limit_cents
    for i, kind in edges.items():
        if kind in (_EDGE_HALF, _EDGE_OVER):  # exactly half / above half the limit, never refunded
            types[i] = 2 + int(rnd() * 5) + _EDGE_TYPE_OFFSET
            lim = limits[cards[i]]
            cents = lim // 2 if kind == _EDGE_HALF else lim // 2 + 1 + int(rnd() * lim * 0.45)
            amount_hi[i], amount_lo[i] = _cents(cents) + ",", ""
    # Large amounts, like the seed's (the usual amount times 2..15).
    large: dict[int, int] = {}
    for i in rng.sample(range(n), int(n * _LARGE_RATE)):
        if 2 <= types[i] < 7:
            large[i] = (dollar_cents[dollar_idx[i]] + cents_of[cent_idx[i]]) * (2 + int(rnd() * 14))
            amount_hi[i], amount_lo[i] = _cents(large[i]) + ",", ""

    # Refunds and cancellations: negative, linked to the card's latest earlier positive row
    # (each original at most once).
    tails = list(map(tables["type_tail"].__getitem__, types))  # "purchase,\n"
    last = array("i", repeat(-1, ctx.n_cards + 1))
    for i, c, t in zip(range(n), cards, types, strict=True):
        if t >= 2:
            if t < 7:
                last[c] = i
            continue
        j = last[c]
        if j < 0:
            amount_hi[i] = "-" + amount_hi[i]
            continue
        last[c] = -1
        cents = large.get(j) or dollar_cents[dollar_idx[j]] + cents_of[cent_idx[j]]
        if t == 0 and rnd() < _PARTIAL_REFUND:
            cents = max(1, int(cents * (0.1 + rnd() * 0.85)))
        amount_hi[i], amount_lo[i] = "-" + _cents(cents) + ",", ""
        tails[i] = f"{_TYPE_NAMES[t]},{first_id + j}\n"

    # Where: the card owner's region mostly (pool per zip digit), and the location edge cases.
    locs = list(
        map(
            ctx.loc_flat.__getitem__,
            map(add, map(ctx.loc_base.__getitem__, cards), map(bits, repeat(_LOCATION_BITS, n))),
        )
    )
    for i, kind in edges.items():
        if kind == _EDGE_SHORT_ZIP:
            locs[i] = ctx.short_zip[ctx.loc_base[cards[i]] >> _LOCATION_BITS][bits(4)]
        elif kind == _EDGE_NO_ZIP:
            locs[i] = _NO_ZIP_LOCATIONS[int(rnd() * len(_NO_ZIP_LOCATIONS))] + ","

    parts: list[str] = [","] * (9 * n)  # parts[1::9] stay ","
    parts[0::9] = _id_strings(first_id, n, tables["thousands"])
    parts[2::9] = map(str, cards)
    parts[3::9] = map(ctx.merchants.__getitem__, map(bits, repeat(_MERCHANT_BITS, n)))
    parts[4::9] = stamps
    parts[5::9] = amount_hi
    parts[6::9] = amount_lo
    parts[7::9] = locs
    parts[8::9] = tails
    return "".join(parts).encode("utf-8")


def _jobs(config: GeneratorConfig) -> Iterator[tuple[int, int, int, int, int, int]]:
    total = config.transactions
    n_chunks = max(1, -(-total // CHUNK_ROWS))
    for k in range(n_chunks):
        first = k * CHUNK_ROWS
        n = min(CHUNK_ROWS, total - first)
        lo = SPAN_SECONDS * first // total
        hi = SPAN_SECONDS * (first + n) // total
        yield (config.seed, k, first + 1, n, lo, hi)


def _worker_count(chunks: int) -> int:
    """Processes for the chunks: up to two (the target machine has two cores), never more than usable."""
    return max(1, min(2, usable_cores(), chunks))


def _append_file(dst: BinaryIO, src_path: str) -> None:
    """Append a part file to the open binary file ``dst`` (in the kernel where possible)."""
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        done = 0
        copy_range = getattr(os, "copy_file_range", None)
        if copy_range is not None:
            dst.flush()
            try:
                while done < size:
                    sent = copy_range(src.fileno(), dst.fileno(), size - done)
                    if sent == 0:
                        break
                    done += sent
            except OSError:
                if done:
                    raise
        if done < size:
            src.seek(done)
            shutil.copyfileobj(src, dst, 8 << 20)


def _chunks_in_workers(
    out: BinaryIO,
    jobs: list[tuple[int, int, int, int, int, int]],
    workers: int,
    init_args: tuple[GeneratorConfig, _Plan, _Context, Path],
    advance: Callable[[int], None],
) -> None:
    """Write the customer/card files and the chunks on ``workers`` processes; append the chunks' part files to
    ``out`` in order. A worker that dies (killed, out of memory) fails the whole run with a :class:`CardpipeError`.
    """
    out_dir = init_args[3]
    methods = multiprocessing.get_all_start_methods()
    mp = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=mp, initializer=_init_worker, initargs=init_args)
    try:
        people = pool.submit(_people_job)
        parts = [pool.submit(_chunk_job, job) for job in jobs]
        for job, part in zip(jobs, parts, strict=True):
            path = part.result()
            _append_file(out, path)
            os.unlink(path)
            advance(job[3])
        people.result()
    except BrokenProcessPool:
        raise CardpipeError(
            f"a generator worker process died (killed, or out of memory?): {out_dir} is incomplete; "
            "run `cardpipe generate` again"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # at most the chunks being written: well under a second
        for job in jobs:
            _part_path(out_dir, job[1]).unlink(missing_ok=True)


def generate_dataset(
    out_dir: Path,
    config: GeneratorConfig,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write the four input CSVs into ``out_dir`` (created if needed); return their row counts.

    ``progress(rows_written)`` is called about every million transactions and once at the end.
    """
    customers, cards = config.resolved()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with open(out_dir / "credit_card_types.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CARD_TYPES_HEADER)
        w.writerows(CARD_TYPES)

    plan, ctx = _plan(config, customers, cards)
    jobs = list(_jobs(config)) if config.transactions > 0 else []
    total = config.transactions
    written = reported = 0

    def advance(rows: int) -> None:
        nonlocal written, reported
        written += rows
        if progress is not None and written < total and written - reported >= PROGRESS_EVERY:
            progress(written)
            reported = written

    with open(out_dir / "transactions.csv", "wb") as out:
        out.write((",".join(TRANSACTIONS_HEADER) + "\n").encode())
        workers = _worker_count(len(jobs))
        if workers == 1:
            _write_people(config, plan, out_dir)
            for job in jobs:
                out.write(_chunk(ctx, *job))
                advance(job[3])
        else:
            _chunks_in_workers(out, jobs, workers, (config, plan, ctx, out_dir), advance)
    if progress is not None:
        progress(total)
    return {
        "customers": customers,
        "credit_card_types": len(CARD_TYPES),
        "cards": cards,
        "transactions": total,
    }
