"""After the suite: no log written during this run holds a password a test used.

Runs last in `make test` (tests/torture sorts after every tests/test_*.py file and this
module after the other torture modules).  Logs: every ``*.log`` under pytest's base
temp directory, where each test's site keeps ``dialmail.log`` and its session
transcripts (``spool/sessions/*.log``).  Passwords: those given to ``Site.add_user``
and every OAuth2 token, code and device code the test authorization server issued
(tests/oauth_server.py; both in tests.harness.PASSWORDS), and the contents of every
password file the tests wrote there,
and the web console's cookie-signing key (``console.key``).
"""
import pytest

from tests.harness import PASSWORDS

MIN_LEN = 5  # shorter "passwords" (pw) would match ordinary words


def secrets_in(base) -> set[str]:
    found = {p for p in PASSWORDS if len(p) >= MIN_LEN}
    for path in [*base.rglob("*password*"), *base.rglob("console.key")]:
        if path.is_file() and path.stat().st_size < 4096:
            value = path.read_text(errors="replace").strip()
            if len(value) >= MIN_LEN and "\n" not in value:
                found.add(value)
    return found


def test_no_log_of_this_run_holds_a_password(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    logs = [p for p in base.rglob("*.log") if p.is_file()]
    secrets = secrets_in(base)
    if not logs or not secrets:
        pytest.skip("no logs or passwords from other tests in this run (run the whole suite)")
    leaks = []
    for log in logs:
        data = log.read_bytes()
        leaks += [(str(log.relative_to(base)), s) for s in secrets if s.encode() in data]
    print(f"\nscanned {len(logs)} logs ({sum(p.stat().st_size for p in logs)} bytes) for {len(secrets)} passwords")
    assert not leaks, leaks
