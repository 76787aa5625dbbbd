"""The layout's contract (pyproject.toml [tool.importlinter]) holds: spool/ and modem/ are
leaves, and inside gateway/ each job imports only the shared layers below it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 3 kept, 0 broken." in r.stdout


# The spool's catalogue is reached only through spool/'s own methods: SQL on its tables,
# a transaction opened on it, the connection or the catalogue behind a queue, a callback
# handed a connection to run inside an enqueue, or sqlite3 itself.
_SPOOL_SQL_CALLS = {"execute", "executemany", "executescript", "transaction"}
_SPOOL_INSIDES = {"cat", "conn"}
_SPOOL_HOOKS = {"in_txn", "conn"}


def _spool_sql(source: str, name: str) -> list[str]:
    import ast
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in _SPOOL_SQL_CALLS:
            found.append(f"{where}: .{node.func.attr}(")
        if isinstance(node, ast.Attribute) and node.attr in _SPOOL_INSIDES:
            found.append(f"{where}: .{node.attr}")
        if isinstance(node, ast.Call):
            found += [f"{where}: {k.arg}=" for k in node.keywords if k.arg in _SPOOL_HOOKS]
        if isinstance(node, ast.Import) and any(a.name == "sqlite3" for a in node.names) \
                or isinstance(node, ast.ImportFrom) and node.module == "sqlite3":
            found.append(f"{where}: import sqlite3")
    return sorted(found, key=lambda hit: int(hit.split(":")[1]) if hit.split(":")[1].isdigit() else 0)


def test_no_sql_against_the_spool_above_spool():
    modules = sorted((ROOT / "gateway").rglob("*.py"))
    assert len(modules) > 40
    found = [hit for p in modules for hit in _spool_sql(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "the spool's tables are spool/'s business:\n" + "\n".join(found)


def test_the_spool_sql_check_sees_what_it_forbids():
    sample = ("import sqlite3\n"
              "def settle(queue, q):\n"
              "    with queue.cat.transaction() as conn:\n"
              "        conn.execute('DELETE FROM messages')\n"
              "        q.record('id', 'rcpt', 'bounced', conn=conn)\n"
              "    q.enqueue('', [], b'', in_txn=lambda conn, qid: None)\n")
    assert sorted(hit.split(": ", 1)[1] for hit in _spool_sql(sample, "sample.py")) == \
        sorted(["import sqlite3", ".transaction(", ".cat", ".execute(", "conn=", "in_txn="])
