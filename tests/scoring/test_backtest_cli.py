"""`loyalty backtest` as an operator runs it: flags, the report on stdout, the PNG, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scoring.test_backtest import CUTOFF, HORIZON_DAYS, history  # noqa: F401 - the shared fixture
from tools.cli import main


def test_backtest_prints_the_report_and_writes_the_plot(history: Path, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out.png"
    code = main(["backtest", "--transactions", str(history), "--cutoff", CUTOFF.isoformat(),
                 "--horizon-days", str(HORIZON_DAYS), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and "Spearman" in out and "Lift per tier" in out and f"plot written to {png}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_backtest_maps_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "export.csv"
    rows = (f"b{m},2024-0{1 + d % 6}-1{d % 9},{(m + 1) * 1000 * (1 + d % 3)}\n"
            for m in range(30) for d in range(m % 7 + 2))
    path.write_text("buyer,when,paid_fen\n" + "".join(rows))
    code = main(["backtest", "--transactions", str(path), "--cutoff", "2024-04-15", "--horizon-days", "60",
                 "--member-column", "buyer", "--date-column", "when", "--amount-column", "paid_fen",
                 "--amount-unit", "minor"])
    assert code == 0 and "Spearman" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "message"), [
    (["--cutoff", "30/09/2023"], "Invalid isoformat"),
    (["--cutoff", "2023-09-30", "--member-column", "nobody"], "nobody"),
    (["--cutoff", "2023-09-30", "--policy", "/no/such/policy.json"], "No such file"),
])
def test_bad_input_is_one_line_and_exit_2(history: Path, flags: list[str], message: str,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["backtest", "--transactions", str(history), "--horizon-days", "30", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("loyalty backtest: ") and message in err and err.count("\n") == 1
