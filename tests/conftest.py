import pytest

from tests.harness import Site

try:  # real-peer fixtures (Dovecot, Postfix, smtp-sink, clamd, ...)
    from tests.peers import *  # noqa: F401,F403
except ImportError:
    pass


@pytest.fixture
def site(tmp_path):
    """A dialmail installation with users alice and bob in office.test; stopped at teardown."""
    s = Site(tmp_path)
    s.add_user("alice", "alice-pw")
    s.add_user("bob", "bob-pw")
    yield s
    s.stop()


@pytest.fixture
def running(site):
    """``site`` with its daemon running."""
    site.start()
    return site
