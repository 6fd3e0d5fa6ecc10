"""Runs the calling script again inside a virtualenv of its own under .tools/ that holds its
pinned PyPI packages (installed on first use, or when the pins change), so that any python3
can run it."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reexec(name, packages):
    """Re-executes the script under .tools/<name>-venv with `packages`; returns at once when
    already there."""
    marker = f"PINNED_VENV_{name.upper().replace('-', '_')}"
    if marker in os.environ:
        return
    venv = os.path.join(ROOT, ".tools", f"{name}-venv")
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".requirements")
    if not os.path.exists(stamp) or open(stamp).read() != " ".join(packages):
        print(f"{name}: installing {' '.join(packages)} into {venv}", file=sys.stderr)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-input", *packages], check=True, stdin=subprocess.DEVNULL)
        with open(stamp, "w") as file:
            file.write(" ".join(packages))
    os.environ[marker] = "1"
    os.execv(python, [python, *sys.argv])
