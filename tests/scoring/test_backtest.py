"""The offline backtest on hand-made and generated transaction histories where the answer is known."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from services.scoring import backtest
from services.scoring.domain import kernel, learning

HISTORY_START = date(2022, 1, 1)
HISTORY_DAYS = 730
CUTOFF = date(2023, 9, 30)
HORIZON_DAYS = 90


def _write(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Members with a persistent purchase rate and basket size: who spent most before the cut-off
    keeps spending most after it. Joins are random and say nothing about spend. 5 % of purchases are
    returned a week later."""
    rng = np.random.default_rng(42)
    members = 1500
    rate = np.minimum(rng.lognormal(np.log(1 / 20), 0.8, members), 0.5)  # purchases per day
    basket = rng.lognormal(np.log(15_000), 0.5, members)  # fen
    joined = rng.integers(0, 300, members)
    counts = rng.poisson(rate * (HISTORY_DAYS - joined))
    member = np.repeat(np.arange(members), counts)
    day = rng.integers(joined[member], HISTORY_DAYS)
    amount = np.round(basket[member] * rng.lognormal(0.0, 0.3, member.size)).astype(np.int64)
    returned = (rng.uniform(size=member.size) < 0.05) & (day + 7 < HISTORY_DAYS)
    member = np.concatenate([member, member[returned]])
    day = np.concatenate([day, day[returned] + 7])
    amount = np.concatenate([amount, -amount[returned]])
    rows = [[f"m{m:05d}", (HISTORY_START + timedelta(days=int(d))).isoformat(), f"{a / 100:.2f}"]
            for m, d, a in zip(member.tolist(), day.tolist(), amount.tolist(), strict=True)]
    return _write(tmp_path_factory.mktemp("backtest") / "history.csv", ["member_id", "timestamp", "amount"], rows)


def test_offline_features_by_hand(tmp_path: Path) -> None:
    path = _write(tmp_path / "tx.csv", ["member_id", "timestamp", "amount"], [
        ["a", "2023-01-10", "100.00"], ["a", "2023-03-01", "50"], ["a", "2023-03-01", "-20.00"],
        ["a", "2022-01-01", "30.00"],  # outside the 365-day window: lifetime only
        ["b", "2023-06-30", "10.00"],  # on the cut-off day: counted
        ["b", "2023-07-01", "999.00"],  # after the cut-off: ignored
        ["c", "2023-07-05", "5.00"],  # unknown at the cut-off: not a member yet
        ["d", "2023-05-01", "-5.00"],  # a refund only
    ])
    tx = backtest.read_transactions(path)
    ids, features, names = backtest.offline_features(tx, date(2023, 6, 30))
    assert names == list(backtest.FEATURE_NAMES)
    assert ids.tolist() == ["a", "b", "d"]
    expected = {
        "a": [2, 13_000, 6_000, 121, 545, 2, 2_000 / 15_000],
        "b": [1, 1_000, 1_000, 0, 0, 1, 0.0],
        "d": [0, -500, 0, 3650, 60, 1, 0.0],
    }
    assert features == pytest.approx(np.array([expected[i] for i in ids.tolist()]))


def test_timestamps_in_every_form_land_on_their_day(tmp_path: Path) -> None:
    path = _write(tmp_path / "tx.csv", ["member_id", "timestamp", "amount"], [
        ["m", "2023-03-01", "1"], ["m", "2023-03-01T23:30:00+08:00", "1"], ["m", "2023-03-01 10:00:00", "1"],
        ["m", "2023-03-01T10:00:00Z", "1"], ["m", "1677628800", "1"], ["m", "1677628800000", "1"],
        ["m", "1677628800.5", "1"], ["m", "20230301", "1"],
    ])
    tx = backtest.read_transactions(path)
    assert set(tx.day.tolist()) == {backtest.day_number(date(2023, 3, 1))}
    assert tx.amount_minor.tolist() == [100] * 8


def test_column_mapping_minor_units_quantity_and_category(tmp_path: Path) -> None:
    path = _write(tmp_path / "tx.csv", ["cat", "fen", "when", "cust", "qty"], [
        ["books", "1250", "2023-01-02", "z9", "3"], ["", "-250", "2023-01-03", "a1", ""],
        ["toys", "800", "2023-01-03", "z9", "1"],
    ])
    columns = backtest.ColumnMap(member="cust", timestamp="when", amount="fen", quantity="qty", category="cat")
    tx = backtest.read_transactions(path, columns, amount_unit="minor")
    assert tx.member_ids.tolist() == ["a1", "z9"]
    assert tx.member.tolist() == [1, 0, 1]
    assert tx.amount_minor.tolist() == [1250, -250, 800]
    assert tx.quantity.tolist() == [3, 1, 1]
    assert [tx.categories[c] if c >= 0 else None for c in tx.category.tolist()] == ["books", None, "toys"]


def test_optional_columns_are_found_by_their_default_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "tx.csv", ["member_id", "timestamp", "amount", "quantity", "category"],
                  [["m", "2023-01-01", "12.345", "2", "food"]])
    tx = backtest.read_transactions(path)
    assert tx.amount_minor.tolist() == [1235]  # rounded half up to the fen
    assert tx.quantity.tolist() == [2] and tx.categories == ("food",)
    plain = backtest.read_transactions(_write(tmp_path / "plain.csv", ["member_id", "timestamp", "amount"],
                                              [["m", "2023-01-01", "1"]]))
    assert plain.quantity.tolist() == [1] and plain.category.tolist() == [-1]


@pytest.mark.parametrize(("row", "unit", "message"), [
    (["m", "2023-02-30", "1.00"], "major", r"line 3: column 'timestamp': cannot read '2023-02-30'"),
    (["m", "yesterday", "1.00"], "major", r"line 3: column 'timestamp'"),
    (["m", "2023-02-01", "1,00"], "major", r"line 3: column 'amount': cannot read '1,00'"),
    (["m", "2023-02-01", "NaN"], "major", r"line 3: column 'amount'"),
    (["m", "2023-02-01", "1.50"], "minor", r"line 3: column 'amount'"),
    (["m", "2023-02-01"], "major", r"line 3: 2 fields, the header has 3"),
    (["", "2023-02-01", "1"], "major", r"line 3: column 'member_id': empty member id"),
])
def test_bad_rows_name_the_line_and_column(tmp_path: Path, row: list[str], unit: str, message: str) -> None:
    path = _write(tmp_path / "bad.csv", ["member_id", "timestamp", "amount"], [["m", "2023-01-01", "1"], row])
    with pytest.raises(ValueError, match=message):
        backtest.read_transactions(path, amount_unit=unit)


def test_missing_columns_and_bad_options(tmp_path: Path) -> None:
    path = _write(tmp_path / "tx.csv", ["customer", "timestamp", "amount"], [["m", "2023-01-01", "1"]])
    with pytest.raises(ValueError, match=r"no column 'member_id' in the header \(customer, timestamp, amount\)"):
        backtest.read_transactions(path)
    with pytest.raises(ValueError, match="no column 'qty'"):
        backtest.read_transactions(path, backtest.ColumnMap(member="customer", quantity="qty"))
    with pytest.raises(ValueError, match="amount_unit"):
        backtest.read_transactions(path, amount_unit="cents")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="header row"):
        backtest.read_transactions(tmp_path / "empty.csv")


def test_persistent_spenders_are_found_by_the_policy_and_by_learned_weights(history: Path) -> None:
    tx = backtest.read_transactions(history)
    report = backtest.run_backtest(tx, CUTOFF, HORIZON_DAYS, seed=1)
    members_before_cutoff = len(set(tx.member[tx.day <= backtest.day_number(CUTOFF)].tolist()))
    assert report.members == members_before_cutoff > 1400 and report.warnings == ()
    # The kernel's quantile tiers: 60 / 30 / 10 % to within one member.
    sizes = [round(report.members * 0.6), round(report.members * 0.9) - round(report.members * 0.6)]
    sizes.append(report.members - sum(sizes))
    assert report.training_as_of == CUTOFF - timedelta(days=HORIZON_DAYS)
    assert report.learned is not None
    for scoring in (report.policy, report.learned):
        assert scoring.metrics.spearman > 0.5
        assert scoring.metrics.top20_revenue_share > 0.4
        top, bottom = scoring.lift[-1], scoring.lift[0]
        assert top.lift > 2.0 > 1.0 > bottom.lift
        assert [row.members for row in scoring.lift] == sizes
        assert sum(row.spend_minor for row in scoring.lift) == pytest.approx(report.horizon_spend_minor, abs=3)
        assert scoring.gains[0] == 0.0 and scoring.gains[-1] == pytest.approx(1.0)
        assert scoring.gains[20] == pytest.approx(scoring.metrics.top20_revenue_share)
        assert np.all(np.diff(scoring.gains) >= -1e-12)
    # Weights kept the policy's signs and its Σ|w|.
    policy_weights = np.array([w for _, w in report.policy.weights])
    learned_weights = np.array([w for _, w in report.learned.weights])
    assert np.all(learned_weights * policy_weights >= 0)
    assert np.abs(learned_weights).sum() == pytest.approx(np.abs(policy_weights).sum())


def test_a_policy_that_rewards_the_wrong_thing_scores_below_chance(history: Path, tmp_path: Path) -> None:
    policy_file = tmp_path / "backwards.json"
    policy_file.write_text(json.dumps({
        "name": "fewest orders first",
        "features": [{"name": "purchase_count_365d", "transform": "log1p", "weight": -1.0}],
        "tiers": ["basic", "plus"], "rule": {"kind": "quantile", "shares_bps": [8000, 2000]}}))
    policy = backtest.load_policy(policy_file)
    assert policy.name == "fewest orders first" and policy.tier_names == ("basic", "plus")
    report = backtest.run_backtest(backtest.read_transactions(history), CUTOFF, HORIZON_DAYS, policy)
    assert report.policy.metrics.spearman < -0.5
    assert report.policy.metrics.top20_revenue_share < 0.1
    assert report.policy.lift[-1].lift < 1.0
    # Learning keeps the policy's signs: a penalty on orders cannot explain spend, so nothing is learned.
    assert report.learned is None
    assert any("signs" in w for w in report.warnings)


def test_load_policy_with_a_fixed_rule_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({
        "features": [{"name": "net_spend_365d", "transform": "winsorize", "winsorize_percentile": 99, "weight": 1},
                     {"name": "refund_ratio_365d", "transform": "IDENTITY", "weight": -2}],
        "tiers": 3, "rule": {"kind": "fixed", "min_scores": [10_000, 100_000]}}))
    policy = backtest.load_policy(path)
    assert policy.tier_names == ("tier 0", "tier 1", "tier 2")
    assert policy.spec.rule == kernel.Rule.FIXED and policy.spec.fixed_min_scores == (10_000.0, 100_000.0)
    assert policy.spec.features[0] == kernel.FeatureSpec("net_spend_365d", kernel.Transform.WINSORIZE, 1.0, 99.0)
    for broken, message in (
            ({"features": [{"name": "gender", "weight": 1}], "tiers": 2,
              "rule": {"kind": "quantile", "shares_bps": [5000, 5000]}}, r"features\[0\].name: 'gender'"),
            ({"features": [{"name": "tenure_days", "transform": "sqrt", "weight": 1}], "tiers": 2,
              "rule": {"kind": "quantile", "shares_bps": [5000, 5000]}}, r"features\[0\].transform: 'sqrt'"),
            ({"features": [{"name": "tenure_days", "weight": 1}], "tiers": 2,
              "rule": {"kind": "quantile", "shares_bps": [5000, 4000]}}, "sum to 10000"),
            ({"features": [{"name": "tenure_days", "weight": 1}], "tiers": 2, "rule": {"kind": "best"}}, "rule.kind"),
            ({"features": [{"name": "tenure_days", "weight": 1}], "tiers": 2}, "missing 'rule'")):
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            backtest.load_policy(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"policy\.json"):
        backtest.load_policy(path)


def test_a_horizon_past_the_history_is_flagged(history: Path) -> None:
    tx = backtest.read_transactions(history)
    report = backtest.run_backtest(tx, date(2023, 12, 1), HORIZON_DAYS)
    assert any("partial" in w for w in report.warnings)
    with pytest.raises(ValueError, match="no member"):
        backtest.run_backtest(tx, date(2020, 1, 1), HORIZON_DAYS)


def test_gains_match_top_share_with_ties() -> None:
    rng = np.random.default_rng(3)
    score = rng.integers(0, 5, 37).astype(np.float64)
    value = rng.lognormal(0.0, 1.0, 37)
    gains = backtest._gains(score, value)
    for percent in (0, 10, 20, 33, 50, 90, 100):
        expected = learning.top_share(score, value, percent / 100) if percent else 0.0
        assert gains[percent] == pytest.approx(expected)


def test_report_text_and_png(history: Path, tmp_path: Path) -> None:
    report = backtest.run_backtest(backtest.read_transactions(history), CUTOFF, HORIZON_DAYS)
    text = backtest.report_text(report)
    assert "Spearman" in text and "Top 20 % share of spend" in text and "Lift per tier: learned weights" in text
    assert all(feature in text for feature in backtest.FEATURE_NAMES)
    assert text.index("gold") < text.index("regular")  # best tier first
    png = tmp_path / "backtest.png"
    backtest.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
