"""`buf breaking` for protos/meter against the git history (run by `make lint`).

python scripts/buf_breaking.py            # against the merge-base with main (HEAD~1 on main)
python scripts/buf_breaking.py REF        # against any commit, branch or tag

The base is what this branch started from: the merge-base of HEAD with `main` (or
`origin/main` in a clone that only has the remote branch). On main itself that is HEAD, so
the last commit (HEAD~1) is compared instead. The base's protos/meter files are built together
with the *current* vendored protos/google, so the check also works against commits from
before the googleapis files were vendored (their buf.yaml needed the BSR).

A base file without any language option (go_package, java_package, ...: the files had none
before they were first set) is compared as if it had the current file's options: setting them
the first time broke no published code, changing them later is reported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
CHECKED = "protos/meter"
OPTION = re.compile(r"^option \w+ = .*;\n", re.M)
PACKAGE = re.compile(r"^package [\w.]+;\n", re.M)


def _with_current_options(old: str, current: Path) -> str:
    if OPTION.search(old) or not current.exists() or not (found := PACKAGE.search(old)):
        return old
    options = "".join(OPTION.findall(current.read_text()))
    return old[: found.end()] + options + old[found.end() :]


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _base() -> str | None:
    head = _git("rev-parse", "HEAD")
    for branch in ("main", "origin/main"):
        base = _git("merge-base", "HEAD", branch)
        if base and base != head:
            return base
        if base == head:
            return _git("rev-parse", "--verify", "--quiet", "HEAD~1")
    return _git("rev-parse", "--verify", "--quiet", "HEAD~1")


def main() -> int:
    ref = sys.argv[1] if len(sys.argv) > 1 else _base()
    if not ref:
        print("buf breaking: no base commit (no main branch and no parent commit); skipped")
        return 0
    files = _git("ls-tree", "-r", "--name-only", ref, "--", CHECKED)
    if not files:
        print(f"buf breaking: {ref} has no {CHECKED}; nothing to compare")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "protos"
        for name in files.splitlines():
            dest = Path(tmp) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob = subprocess.run(
                ["git", "show", f"{ref}:{name}"], cwd=ROOT, capture_output=True, check=True
            )
            dest.write_text(_with_current_options(blob.stdout.decode(), ROOT / name))
        shutil.copytree(ROOT / "protos" / "google", old / "google", dirs_exist_ok=True)
        (Path(tmp) / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\n")
        image = Path(tmp) / "base.binpb"
        subprocess.run([str(BUF), "build", tmp, "-o", str(image)], check=True)
        done = subprocess.run([str(BUF), "breaking", str(ROOT), "--against", str(image)], cwd=ROOT)
        short = _git("rev-parse", "--short", ref) or ref
        if done.returncode != 0:
            print(f"buf breaking: protos/meter break compatibility with {short}")
            return 1
        print(f"buf breaking: protos/meter compatible with {short}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
