"""Mail client auto-configuration, open without a login like the static files: Thunderbird's
autoconfig (``config-v1.1.xml``) and Outlook's POX autodiscover.  Both name the servers
``dialmail users add`` prints (``gateway.office.mailclient``).

Autodiscover's POST body comes from anyone: it is capped in size and parsed only once expat
has seen it carries no DTD (so no entities to expand); the answer is built with ElementTree,
which escapes every value.  It changes nothing and answers only what the settings say, so it
carries no CSRF token, unlike every console form.
"""
from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from xml.parsers import expat

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config import Config
from gateway.office.mailclient import ClientServer, client_servers

THUNDERBIRD_PATHS = ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml")
AUTODISCOVER_PATHS = ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml")
MAX_REQUEST = 64 * 1024  # a real request is a few hundred bytes
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
XML = "application/xml; charset=utf-8"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrib) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = str(text)
    return el


def _domain(config: Config, address: str | None) -> str:
    """The local domain the address is in (the first local domain without one); 404 for others."""
    if not address:
        return config.server.domains[0]
    domain = address.rpartition("@")[2].lower()
    if not config.server.is_local_domain(domain):
        raise HTTPException(404, "not a mail domain of this gateway")
    return domain


def thunderbird(config: Config, address: str | None) -> bytes:
    domain = _domain(config, address)
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=domain)
    for d in config.server.domains:
        _sub(provider, "domain", d)
    _sub(provider, "displayName", f"{domain} ({config.server.hostname})")
    _sub(provider, "displayShortName", domain)
    for server in client_servers(config):
        el = _sub(provider, "incomingServer" if server.incoming else "outgoingServer",
                  type=server.protocol.lower())
        _sub(el, "hostname", server.host)
        _sub(el, "port", server.port)
        _sub(el, "socketType", "STARTTLS" if server.starttls else "plain")
        _sub(el, "authentication", "password-cleartext" if server.login_needed else "none")
        if server.login_needed:
            _sub(el, "username", "%EMAILLOCALPART%")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _protocol(account: ET.Element, server: ClientServer, login: str) -> None:
    el = _sub(account, "Protocol")
    _sub(el, "Type", server.protocol)
    _sub(el, "Server", server.host)
    _sub(el, "Port", server.port)
    _sub(el, "DomainRequired", "off")
    _sub(el, "LoginName", login)
    _sub(el, "SPA", "off")
    _sub(el, "SSL", "on" if server.starttls else "off")
    _sub(el, "Encryption", "TLS" if server.starttls else "None")
    _sub(el, "AuthRequired", "on" if server.login_needed else "off")


def outlook(config: Config, address: str, login: str) -> bytes:
    _domain(config, address)
    root = ET.Element("Autodiscover", xmlns=RESPONSE_NS)
    response = _sub(root, "Response", xmlns=OUTLOOK_NS)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for server in client_servers(config):
        _protocol(account, server, login)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def requested_address(body: bytes) -> str:
    """The EMailAddress of an autodiscover request; ValueError for anything else."""
    def refuse(*_args) -> None:
        raise ValueError("DTDs and entities are not accepted")
    guard = expat.ParserCreate()
    guard.StartDoctypeDeclHandler = refuse
    guard.EntityDeclHandler = refuse
    try:
        guard.Parse(body, True)
        root = ET.fromstring(body)
    except (expat.ExpatError, ET.ParseError) as exc:
        raise ValueError(f"not XML: {exc}") from None
    for el in root.iter():
        if el.tag.rpartition("}")[2] == "EMailAddress" and el.text and "@" in el.text:
            return el.text.strip()
    raise ValueError("no EMailAddress in the request")


async def _body(request: Request) -> bytes:
    if int(request.headers.get("content-length") or 0) > MAX_REQUEST:
        raise HTTPException(400, "the request is too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST:
            raise HTTPException(400, "the request is too large")
    return bytes(body)


def routes(config: Config, users) -> list[Route]:
    """The open endpoints; ``users`` (spool.users.Users) tells a NAME@DOMAIN user's login name."""
    async def autoconfig(request: Request) -> Response:
        return Response(thunderbird(config, request.query_params.get("emailaddress")), media_type=XML)

    async def autodiscover(request: Request) -> Response:
        try:
            address = requested_address(await _body(request))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        local = address.rpartition("@")[0].lower()
        # A user made for one domain only logs in with the whole address.
        login = address.lower() if await asyncio.to_thread(users.exists, address.lower()) else local
        return Response(outlook(config, address, login), media_type=XML)

    return ([Route(p, autoconfig, methods=["GET"]) for p in THUNDERBIRD_PATHS]
            + [Route(p, autodiscover, methods=["POST"]) for p in AUTODISCOVER_PATHS])
