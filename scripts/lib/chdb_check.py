"""Runs SQL statements on a current ClickHouse engine in-process (chDB), failing on any error.

Reads the statements from stdin, each ended by a line holding only `;` (the output of
`storage-service print-sql`), runs them in order in a fresh session and exits 1 naming the
first statement the engine refuses.
"""

import sys
import tempfile

import chdb
from chdb import session


def main() -> int:
    text = sys.stdin.read()
    statements = [s.strip() for s in text.split("\n;\n") if s.strip()]
    if not statements:
        print("chdb-check: no statements on stdin", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="chdb-check.") as path:
        sess = session.Session(path)
        version = str(sess.query("SELECT version()", "CSV")).strip().strip('"')
        for number, statement in enumerate(statements, 1):
            try:
                sess.query(statement, "CSV")
            except Exception as error:  # chDB raises its own error types
                first = statement.splitlines()[0][:120]
                print(f"chdb-check: statement {number} ({first}…) failed on ClickHouse "
                      f"{version}:\n{error}", file=sys.stderr)
                return 1
        sess.close()
    print(f"chdb-check: {len(statements)} statements ran on ClickHouse {version} "
          f"(chdb {chdb.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
