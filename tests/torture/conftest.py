import pytest

from tests.torture import budget


def pytest_addoption(parser):
    parser.addoption("--torture-long", action="store_true", default=False,
                     help="run the long torture (at least 500 carrier drops and 200 kill -9s) and print the report")


def pytest_configure(config):
    budget.LONG = bool(config.getoption("--torture-long", default=False))


@pytest.fixture
def torture_long(request) -> bool:
    # Without the option registered (tests/torture not named on the command line) it is the short run.
    return bool(request.config.getoption("--torture-long", default=False))


_REPORTS_KEY = pytest.StashKey[list]()


@pytest.fixture
def torture_report(request):
    """``record(title, report)``: the checker's report, printed at the end of the run."""
    reports = request.config.stash.setdefault(_REPORTS_KEY, [])

    def record(title: str, report) -> None:
        reports.append((title, report))
    return record


def pytest_terminal_summary(terminalreporter, config):
    reports = config.stash.get(_REPORTS_KEY, [])
    if not reports:
        return
    terminalreporter.section("torture report")
    for title, report in reports:
        terminalreporter.write_line(f"{title}\n{report.format()}\n")
    total = sum((r.lost for _, r in reports))
    dups = sum((r.duplicated for _, r in reports))
    drops = sum(r.drops for _, r in reports)
    kills = sum(r.kills for _, r in reports)
    window = sum(r.dup_out_window for _, r in reports)
    out = sum(r.submitted_out for _, r in reports)
    terminalreporter.write_line(
        f"TOTAL: {drops} carrier drops, {kills} kill -9; lost {total}, duplicated {dups}; "
        f"RFC 1047 window duplicates {window} ({window / max(1, drops + kills):.2%} of interruptions, "
        f"{window / max(1, out):.2%} of {out} outbound messages)")
