"""Configuration: the sample is valid; every mistake is one clear line naming the key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.mail.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = '[server]\ndomains = ["office.test"]\nspool_dir = "/tmp/x"\n'


def test_sample_config_is_accepted():
    cfg = config.load(ROOT / "etc" / "dialmail.toml")
    assert cfg.server.domains == ("office.example", "branch.office.example")
    assert cfg.smtp.max_message_size == 50_000_000
    assert cfg.fetch[0].mode == "multidrop" and cfg.fetch[0].envelope_header == "Delivered-To"
    assert cfg.queue.queue_lifetime == 4 * 86400


def test_config_found_via_environment(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL)
    assert config.find_config_path(None, {"DIALMAIL_CONFIG": str(p)}) == p
    assert config.find_config_path("/x.toml", {"DIALMAIL_CONFIG": str(p)}) == Path("/x.toml")
    assert config.find_config_path(None, {}) == Path("/etc/dialmail/dialmail.toml")


@pytest.mark.parametrize("text, key, line", [
    (MINIMAL + "[smtp]\nmax_message_size = \"lots\"\n", "smtp.max_message_size", 5),
    (MINIMAL + "[smtp]\nlisten = [\"nohost\"]\n", "smtp.listen", 5),
    (MINIMAL + "[smarthost]\nstarttls = \"maybe\"\n", "smarthost.starttls", 5),
    (MINIMAL + "[smtp]\nlisen = [\"127.0.0.1:25\"]\n", "smtp.lisen", 5),
    ('[server]\ndomains = []\n', "server.domains", 2),
    (MINIMAL + "[[fetch]]\nname = \"isp\"\nhost = \"h\"\nusername = \"u\"\nmode = \"multidrop\"\n",
     "fetch[isp].envelope_header", 4),
    (MINIMAL + "[[fetch]]\nhost = \"h\"\nusername = \"u\"\n", "fetch[u].deliver_to", 4),
    (MINIMAL.replace('"/tmp/x"', '"/tmp/x"\nmynetworks = ["10.0.0.0/33"]'), "server.mynetworks", 4),
    # unknown sections, keys of sub-tables, dotted keys, inline tables, the n-th [[fetch]]
    (MINIMAL + "\n[smpt]\nlisten = []\n", "smpt", 5),
    (MINIMAL + "[groups.support]\nmembers = [\"a\"]\nmdoe = \"all\"\n", "groups.support.mdoe", 6),
    (MINIMAL + "[groups.support]\nmembers = [\"a\"]\nmode = \"rr\"\n", "groups.support.mode", 6),
    (MINIMAL + "[groups]\nsupport.members = [\"a\"]\nsupport.mode = \"rr\"\n", "groups.support.mode", 6),
    (MINIMAL + "[groups.\"board@office.test\"]\nmembers = []\n", "groups.board@office.test.members", 5),
    (MINIMAL + "[forward]\nalice = { to = [\"bob\"] }\nbob = { to = [] }\n", "forward.bob.to", 6),
    (MINIMAL + "[smarthost.rewrite]\n\"@office.test\" = \"nobody\"\n", "smarthost.rewrite.@office.test", 5),
    (MINIMAL + '[[fetch]]\nname = "a"\nhost = "h"\nusername = "u"\ndeliver_to = "x"\n'
     '[[fetch]]\nname = "b"\nhost = "h"\nusername = "u"\ndeliver_to = "x"\nport = 0\n', "fetch[b].port", 14),
    (MINIMAL + '[[fetch]]\nname = "a"\nhost = "h"\nusername = "u"\ndeliver_to = "x"\n'
     '[[fetch]]\nname = "a"\nhost = "h"\nusername = "u"\ndeliver_to = "x"\n', "fetch[a].name", 10),
    (MINIMAL + '[autoreply."info@office.test"]\nfile = "missing.eml"\n', "autoreply.info@office.test.file", 5),
])
def test_config_errors_name_key_and_line(text, key, line, tmp_path):
    p = tmp_path / "dialmail.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    msg = str(exc.value)
    assert f"{p}:{line}: {key}:" in msg, msg


@pytest.mark.parametrize("text, line", [
    ("[server\ndomains = []\n", 1),
    (MINIMAL + "[smtp]\nmax_message_size = \"50MB\n", 5),
    (MINIMAL + "[server]\n", 4),
    (MINIMAL + "listen = [1,\n", 4),
])
def test_toml_syntax_errors_name_the_line(text, line, tmp_path):
    p = tmp_path / "dialmail.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    assert str(exc.value).startswith(f"{p}:{line}: TOML syntax error: "), exc.value


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL + "[smtp]\nlisen = []\n")
    with pytest.raises(ConfigError, match="did you mean 'listen'"):
        config.load(p)


def test_world_readable_password_file_is_refused(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o644)
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL + f'[smarthost]\nhost = "h"\nusername = "u"\npassword_file = "{pw}"\n')
    cfg = config.load(p)
    with pytest.raises(ConfigError, match="chmod 600"):
        cfg.smarthost.password()
    os.chmod(pw, 0o600)
    assert cfg.smarthost.password() == "s3cret"


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL + "[smtp]\nmax_message_size = -5\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "-c", str(p), "check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 78
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "smtp.max_message_size" in r.stderr


def test_cli_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[server\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "-c", str(p), "check"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 78 and "TOML syntax error" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "gateway", "-c", str(tmp_path / "none.toml"), "check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 78 and "not found" in r.stderr


def test_sizes_and_durations():
    assert config.parse_size("50MB") == 50_000_000
    assert config.parse_size("10 MiB") == 10 * 1024 * 1024
    assert config.parse_duration("4d") == 345600
    assert config.parse_duration("30 minutes") == 1800
    with pytest.raises(ValueError):
        config.parse_size("ten")
