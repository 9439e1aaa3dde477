"""``cardpipe card|customer|transaction ID``: the views in the terminal (orchestration.views.show)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cardpipe.config import Settings
from cardpipe.orchestration.views import format_table, show
from cardpipe.serving.database import make_engine
from tests.serving.test_views import CARD_1_JSON, whole_scenario


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded defaults (SQLite in the results folder), holding the views tests' scenario."""
    settings = Settings.from_env(env={}, results_dir=tmp_path / "results", load_dotenv_file=False)
    engine = make_engine(settings.database_url)
    whole_scenario(engine)
    engine.dispose()
    return settings


def run(settings: Settings, kind: str, ident: int, *, as_json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    return show(settings, kind, ident, as_json=as_json, out=out), out.getvalue()


def test_card_table(settings, capsys):
    code, text = run(settings, "card", 1)
    assert code == 0 and capsys.readouterr().err == ""
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == [
        "card_id",
        "customer_id",
        "card_type_id",
        "card_number",
        "credit_limit",
        "settled_balance",
        "pending_amount",
        "pending_count",
        "available_credit",
        "settlement_id",
    ]
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # values aligned in one column
    table = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert table["card_number"] == "****-****-****-7934" and "4109-1661-0231-7934" not in text
    assert (table["credit_limit"], table["available_credit"], table["settlement_id"]) == ("14300.00", "13762.32", "2")


def test_json_is_the_apis(settings):
    code, text = run(settings, "card", 1, as_json=True)
    assert code == 0 and text.count("\n") == 1
    assert json.loads(text) == CARD_1_JSON
    code, text = run(settings, "transaction", 8, as_json=True)
    assert json.loads(text)["status"] == "pending" and json.loads(text)["timestamp"] == "2025-04-01 10:00:08"


def test_customer_and_transaction_tables(settings):
    code, text = run(settings, "customer", 2)
    assert code == 0 and "card_ids" in text and "1, 2" in text and "Kyle Silva" in text
    code, text = run(settings, "customer", 1)
    assert code == 0 and [line.split(None, 1) for line in text.splitlines() if line.startswith("card_ids")] == [
        ["card_ids", "-"]
    ]
    code, text = run(settings, "transaction", 3)
    table = dict(line.split(None, 1) for line in text.splitlines())
    assert (table["status"], table["decline_reason"], table["settlement_id"]) == (
        "declined",
        "amount_over_half_limit",
        "1",
    )


@pytest.mark.parametrize(
    ("kind", "ident"), [("card", 123), ("customer", 999), ("transaction", 500), ("card", 2**70), ("transaction", -1)]
)
def test_unknown_id_is_one_line_on_stderr(settings, capsys, kind, ident):
    code, text = run(settings, kind, ident)
    err = capsys.readouterr().err
    assert code == 1 and text == ""
    assert err == f"cardpipe: no {kind} {ident} in {settings.describe_database()}\n"


def test_unknown_kind(settings):
    with pytest.raises(ValueError, match="unknown view"):
        run(settings, "merchant", 1)


def test_format_table():
    assert format_table({"a": 1, "long_key": None, "ids": [1, 2]}) == "a         1\nlong_key  -\nids       1, 2\n"


def test_a_view_of_a_folder_never_set_up_says_what_to_run_first(tmp_path):
    from cardpipe.orchestration.locks import NotReady

    settings = Settings.from_env(env={}, results_dir=tmp_path / "never", load_dotenv_file=False)
    with pytest.raises(NotReady, match=r"^cardpipe card: nothing set up in .*: run `cardpipe run`"):
        run(settings, "card", 1)
    assert not (tmp_path / "never").exists(), "no SQLite file (nor folder) created as a side effect"
