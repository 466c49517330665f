"""Re-vendor transformers' common model and config tests for one release.

    python tests/hf_common/revendor.py 5.25.0

Downloads that release's source distribution from the package registry (`pip download --no-deps --no-binary :all:`),
copies `tests/test_modeling_common.py` and `tests/test_configuration_common.py` out of it unmodified, and records
their origin, licence and sha256 (and the sdist's) in `tests/hf_common/VENDORED.json`, which the suite reads to
decide whether the installed transformers matches. Nothing is replaced until both files have been read and checked,
so a failed download or a release without one of the files leaves the vendored set as it was.

After re-vendoring, pin the same version in `tests/constraints.txt` and run the suite: the common tests of a new
release often find something (see `tests/test_hf_common_bd3lm.py` for where their flags and expected failures live).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "VENDORED.json"
FILES = ("test_modeling_common.py", "test_configuration_common.py")
LICENCE_MARK = "Licensed under the Apache License, Version 2.0"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_sdist(version: str, into: Path) -> Path:
    """The release's sdist, fetched through pip so that the registry configured for pip is the one used."""
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?(rc\d+|\.dev\d+)?", version):
        raise SystemExit(f"version must look like 5.25.0, got {version!r}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(into),
        f"transformers=={version}",
    ]
    subprocess.run(cmd, check=True)
    found = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip downloaded no transformers-{version}.tar.gz into {into}: {os.listdir(into)}")
    return found[0]


def read_test_files(sdist: Path, version: str) -> dict[str, bytes]:
    """The two test files of the sdist, each checked to carry the Apache-2.0 header."""
    contents: dict[str, bytes] = {}
    with tarfile.open(sdist) as tar:
        for name in FILES:
            member = f"transformers-{version}/tests/{name}"
            try:
                handle = tar.extractfile(member)
            except KeyError:
                handle = None
            if handle is None:
                raise SystemExit(f"{sdist.name} has no {member}; this release cannot be vendored as is")
            data = handle.read()
            if LICENCE_MARK not in data.decode("utf-8", errors="replace")[:2000]:
                raise SystemExit(f"{member} does not start with the Apache-2.0 header; check its licence first")
            contents[name] = data
    return contents


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def revendor(version: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(version, Path(tmp))
        contents = read_test_files(sdist, version)
        record = {
            "transformers": version,
            "origin": f"pip download --no-deps --no-binary :all: transformers=={version}",
            "sdist": {"name": sdist.name, "sha256": sha256(sdist.read_bytes())},
            "licence": "Apache-2.0 (© The HuggingFace Team; the header of each file)",
            "files": {
                name: {"from": f"transformers-{version}/tests/{name}", "sha256": sha256(data)}
                for name, data in contents.items()
            },
            "vendored_on": datetime.date.today().isoformat(),
        }
    for name, data in contents.items():
        write_atomically(HERE / name, data)
    write_atomically(RECORD, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="the transformers release whose common tests to vendor, e.g. 5.25.0")
    record = revendor(parser.parse_args(argv).version)
    print(json.dumps(record, indent=2, ensure_ascii=False))
    print(f"Now pin transformers=={record['transformers']} in tests/constraints.txt and run the suite.")


if __name__ == "__main__":
    main()
