import os

import pytest

from tests.harness import Site

# Fixtures that start a real peer program: a test using one is marked ``peer`` by itself,
# so ``make test-quick`` (-m 'not peer') really runs only what needs no peer.
PEER_FIXTURES = {"dovecot_server", "dovecot", "dovecot_lmtp", "dovecot_notls_server", "dovecot_notls", "dovecot_zlib_server", "dovecot_zlib", "smtp_sink",
                 "smtp_sink_factory", "postfix_smarthost_server", "postfix_smarthost", "clamd", "oauth_dovecot_server", "oauth_dovecot", "browser"}
# Under CI=true a skipped test is a failure (a missing peer must not pass unnoticed),
# except where the machine itself cannot have what the test needs.
ALLOWED_SKIP_MARK = "needs_kernel"
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{ALLOWED_SKIP_MARK}: needs a kernel feature this machine may lack "
                                       "(the only tests CI may skip)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PEER_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("peer") is None:
            item.add_marker(pytest.mark.peer)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if ON_CI and report.skipped and item.get_closest_marker(ALLOWED_SKIP_MARK) is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must not happen: {reason}"

# real-peer fixtures (Dovecot, Postfix, smtp-sink, clamd, ...)
from tests.lmtp_peer import dovecot_lmtp  # noqa: E402,F401
from tests.peers import *  # noqa: E402,F401,F403


@pytest.fixture
def site(tmp_path):
    """A dialmail installation with users alice and bob in office.test; stopped at teardown."""
    s = Site(tmp_path)
    s.add_user("alice", "alice-pw")
    s.add_user("bob", "bob-pw")
    yield s
    s.stop()


@pytest.fixture
def unrunnable_python(tmp_path, monkeypatch):
    """``sys.executable`` made a file nobody may execute, as a daemon sees an interpreter
    it cannot start again: its helper processes cannot start."""
    import sys
    (tmp_path / "bin").mkdir()
    path = tmp_path / "bin" / "python"
    path.write_text("not a program\n")
    path.chmod(0o644)
    monkeypatch.setattr(sys, "executable", str(path))
    return path


@pytest.fixture
def running(site):
    """``site`` with its daemon running."""
    site.start()
    return site


@pytest.fixture
def isp(dovecot):
    """The ISP's mailbox ``office`` on the Dovecot peer (tests/test_fetch_dovecot.ISP_PASSWORD)."""
    from tests.test_fetch_dovecot import ISP_PASSWORD
    dovecot.add_user("office", ISP_PASSWORD)
    return dovecot


@pytest.fixture
def office(tmp_path):
    """A factory of offices driven without the daemon (tests/test_relay.Office)."""
    from tests.test_relay import Office
    made = []

    def make(*args, **kw):
        o = Office(tmp_path / f"office{len(made)}", *args, **kw)
        made.append(o)
        return o
    yield make
    for o in made:
        o.queue.cat.close()


_FIGURES_KEY = pytest.StashKey[list]()


@pytest.fixture
def figure(request):
    """``figure(what, measured)``: a figure a hostile-load test measured, printed at the end
    of the run (``make torture`` shows them; the README's reliability section quotes them)."""
    figures = request.config.stash.setdefault(_FIGURES_KEY, [])

    def record(what: str, measured: str) -> None:
        figures.append((request.node.nodeid.split("::")[-1], what, measured))
    return record


def pytest_terminal_summary(terminalreporter, config):
    figures = config.stash.get(_FIGURES_KEY, [])
    if figures:
        terminalreporter.section("measured figures")
        for test, what, measured in figures:
            terminalreporter.write_line(f"{what}: {measured}  ({test})")
