"""The aiosmtpd code that gateway.smtp.server copies or reaches into is the code it was written against.

``SubmissionProtocol.smtp_DATA`` is aiosmtpd 1.4's ``SMTP.smtp_DATA`` rewritten to write
the message to the spool as it arrives, and it (with ``connection_made`` and ``smtp_AUTH``)
uses aiosmtpd internals (and ``SubmissionProtocol._copy`` the state its ``__init__`` sets) that have no public equivalent: ``_reader``/``_writer`` (set in
``_cb_client_connected``), ``_call_handler_hook``, ``_set_post_data_state``,
``_create_session``, ``_create_envelope``, the idle timer ``_timeout_handle`` (set by
``_reset_timeout``) and ``_auth_require_tls`` (read by ``smtp_EHLO`` and ``smtp_AUTH``).
pyproject.toml pins aiosmtpd below 1.5; this test catches a change inside that range.
"""
from __future__ import annotations

import hashlib
import inspect

import pytest
from aiosmtpd.smtp import SMTP

# SHA-256 of inspect.getsource(SMTP.<method>) in aiosmtpd 1.4.6.
RECORDED = {
    "smtp_DATA": "3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df",
    "_cb_client_connected": "a73e95bb7f362ab9dbd9f0a4f310c203c525c0c98682dede6f98af4c97d15ad4",
    "_set_post_data_state": "1dc8a8abca2a81644a605b8ebf427fc7472eeadf5149dd3cf2591fa86b2256e9",
    "_call_handler_hook": "6ff23a6634ea03076444ef30df9fd65b01c4d52e9fda0bd3d99339aacc488d74",
    "_create_session": "22b243e82ff1c7a4956a63363835200a9594c8f401894721f493b99fa2db1bc8",
    "_create_envelope": "54afceea638744d4ea97af532464ace6ff754e61becd52e64059cdd938e086a0",
    "_reset_timeout": "fef19b94d28dff319ca0ca9ecc1884e8f419d9f016d1d25380b01d5e85ff3c78",
    "connection_made": "77a45df5065bba343a040b6f6c88de8907b40c80bc03727e7f18ede20d19f4bf",
    "smtp_EHLO": "1d91592dd954c4cd87bf365fc57f0a16e36d9ff911cda1b2b253a4981618f19f",
    "smtp_AUTH": "79078b308377ac485368dfe255ad6d84581da9696acfe55d973a18e2d41f9c5c",
    "__init__": "8a9ca80f23ad9bf273e58e284170e9f919dc6269b280ca0624ac0603a8ad3604",
}

WHAT_TO_RECHECK = {
    "smtp_DATA": "port its changes (replies, limits, order of events) into SubmissionProtocol.smtp_DATA",
    "_cb_client_connected": "check that self._reader/self._writer are still the connection's streams",
    "_set_post_data_state": "check that it is still the one reset after DATA",
    "_call_handler_hook": "check that it still calls handler.handle_DATA(server, session, envelope)",
    "_create_session": "check that SubmissionProtocol._create_session still replaces it",
    "_create_envelope": "check that SubmissionProtocol._create_envelope still replaces it (post-DATA and RSET)",
    "_reset_timeout": "check that self._timeout_handle is still the one idle timer smtp_DATA cancels and restarts",
    "connection_made": "check that it still creates self.session (with .peer) before our override reads it, "
                       "and that self.transport is None on the first call",
    "smtp_EHLO": "check that it still reads self._auth_require_tls when offering AUTH",
    "smtp_AUTH": "check that it still reads self._auth_require_tls and assigns session.login_data",
    "__init__": "check that SubmissionProtocol._copy still makes afresh everything that belongs to one "
                "connection (the streams, methods bound to the protocol) and shares only settings",
}


@pytest.mark.parametrize("method", sorted(RECORDED))
def test_aiosmtpd_code_we_depend_on_is_unchanged(method):
    digest = hashlib.sha256(inspect.getsource(getattr(SMTP, method)).encode()).hexdigest()
    assert digest == RECORDED[method], (
        f"aiosmtpd.smtp.SMTP.{method} changed upstream: {WHAT_TO_RECHECK[method]} "
        f"(gateway/smtp/server.py), run tests/test_submit_data.py and tests/test_policy_bigmail.py, "
        f"then record the new digest here and move the pin in pyproject.toml")
