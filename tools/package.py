"""Build dist/rs_deep.zip: the plugin folder `rs_deep/` without tests or development files."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "rs_deep"
EXCLUDE_DIRS = ("tests/", "tools/", ".ci/", "docs/dev/", "build/", "dist/", ".venv/")
EXCLUDE_FILES = {"Makefile", "pytest.ini", "requirements-dev.txt", ".gitignore", "constraints.txt"}


def files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode().split("\0")
    for f in sorted(set(out)):
        if not f or f.startswith(EXCLUDE_DIRS) or f in EXCLUDE_FILES or f.startswith("."):
            continue
        if "/__pycache__/" in f or f.endswith(".pyc") or not os.path.isfile(os.path.join(ROOT, f)):
            continue
        yield f


def main(dest=None):
    dest = dest or os.path.join(ROOT, "dist", f"{NAME}.zip")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".tmp"
    n = 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files():
            zf.write(os.path.join(ROOT, f), f"{NAME}/{f}")
            n += 1
    os.replace(tmp, dest)
    print(f"wrote {dest}: {n} files, {os.path.getsize(dest) / 1e6:.1f} MB")
    return dest


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
