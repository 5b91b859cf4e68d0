"""Download, verify and unpack the Kafka Connect plugins of Dockerfile.connect.

Runs in the image's `plugins` build stage (plain Python: no curl, tar or unzip needed) and
writes one directory per plugin under --dest, ready for CONNECT_PLUGIN_PATH:

* Debezium connectors from Maven Central, each tarball checked against the SHA-1 that Maven
  Central publishes beside it (and against a SHA-256 pin when one is given);
* the Confluent Avro converter from Confluent Hub, checked as a complete zip holding the
  converter jar of the requested version (and against a SHA-256 pin when one is given).

Nothing is unpacked outside --dest (tar and zip members are checked), and a plugin whose
connector jar is missing after unpacking fails the build.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
CONFLUENT_HUB = "https://hub-downloads.confluent.io"
DEBEZIUM_CONNECTORS = ("postgres", "mysql", "mongodb", "sqlserver")


class FetchError(RuntimeError):
    """A plugin could not be downloaded or failed verification."""


def download(url: str, *, attempts: int = 3, timeout: float = 60.0) -> bytes:
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # 404 and friends: asking again will not help
                raise FetchError(f"download failed: {url}: HTTP {exc.code}") from exc
            last = exc
        except OSError as exc:  # URLError and socket errors
            last = exc
            if attempt < attempts:
                time.sleep(2 * attempt)
    raise FetchError(f"download failed after {attempts} attempts: {url}: {last}")


def check_sha256(name: str, data: bytes, pins: dict[str, str]) -> None:
    expected = pins.get(name)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise FetchError(f"{name}: sha256 {actual} does not match the pinned {expected}")


def safe_member(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def debezium_url(base: str, connector: str, version: str) -> str:
    artifact = f"debezium-connector-{connector}"
    return f"{base}/io/debezium/{artifact}/{version}/{artifact}-{version}-plugin.tar.gz"


def avro_converter_url(base: str, version: str) -> str:
    plugin = "confluentinc/kafka-connect-avro-converter"
    name = f"confluentinc-kafka-connect-avro-converter-{version}"
    return f"{base}/api/plugins/{plugin}/versions/{version}/{name}.zip"


def fetch_debezium(
    connector: str, version: str, dest: Path, base: str, pins: dict[str, str]
) -> Path:
    url = debezium_url(base, connector, version)
    data = download(url)
    published = download(url + ".sha1").decode("ascii", "replace").split()
    if not published:
        raise FetchError(f"{url}.sha1 is empty")
    actual = hashlib.sha1(data).hexdigest()  # Maven Central publishes SHA-1
    if actual != published[0].lower():
        raise FetchError(f"{url}: sha1 {actual} does not match the published {published[0]}")
    check_sha256(f"debezium-{connector}", data, pins)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = archive.getmembers()
        for member in members:
            if not safe_member(member.name) or member.issym() or member.islnk():
                raise FetchError(f"{url}: refusing archive member {member.name!r}")
        archive.extractall(dest, members=members, filter="data")
    plugin_dir = dest / f"debezium-connector-{connector}"
    jar = plugin_dir / f"debezium-connector-{connector}-{version}.jar"
    if not jar.is_file():
        raise FetchError(f"{url}: {jar.relative_to(dest)} missing after unpacking")
    return plugin_dir


def fetch_avro_converter(version: str, dest: Path, base: str, pins: dict[str, str]) -> Path:
    url = avro_converter_url(base, version)
    data = download(url)
    check_sha256("avro-converter", data, pins)
    top = f"confluentinc-kafka-connect-avro-converter-{version}"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            broken = archive.testzip()
            if broken is not None:
                raise FetchError(f"{url}: corrupt member {broken}")
            names = archive.namelist()
            for name in names:
                if not safe_member(name) or not name.startswith(top + "/"):
                    raise FetchError(f"{url}: refusing archive member {name!r}")
            archive.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{url}: not a zip archive: {exc}") from exc
    plugin_dir = dest / top
    jar = plugin_dir / "lib" / f"kafka-connect-avro-converter-{version}.jar"
    if not jar.is_file():
        raise FetchError(f"{url}: {jar.relative_to(dest)} missing after unpacking")
    return plugin_dir


def parse_pins(values: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for value in values:
        name, sep, digest = value.partition("=")
        if not sep or len(digest) != 64:
            raise SystemExit(f"--sha256 expects NAME=<64 hex digits>, got {value!r}")
        pins[name] = digest
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--debezium-version", required=True, help="e.g. 3.3.1.Final")
    parser.add_argument(
        "--connectors",
        default=",".join(DEBEZIUM_CONNECTORS),
        help="comma-separated Debezium connectors (default: %(default)s)",
    )
    parser.add_argument("--avro-converter-version", required=True, help="e.g. 8.2.0")
    parser.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="NAME=HEX",
        help="pin an archive's SHA-256: debezium-<connector>=... or avro-converter=...",
    )
    parser.add_argument("--maven-url", default=MAVEN_CENTRAL)
    parser.add_argument("--hub-url", default=CONFLUENT_HUB)
    args = parser.parse_args(argv)

    # PLUGIN_SHA256 (the Dockerfile's build argument): space-separated NAME=HEX pins.
    pins = parse_pins(args.sha256 + os.environ.get("PLUGIN_SHA256", "").split())
    args.dest.mkdir(parents=True, exist_ok=True)
    connectors = [c.strip() for c in args.connectors.split(",") if c.strip()]
    unknown = sorted(set(connectors) - set(DEBEZIUM_CONNECTORS))
    if unknown:
        raise SystemExit(f"unknown Debezium connectors: {', '.join(unknown)}")
    try:
        for connector in connectors:
            path = fetch_debezium(
                connector, args.debezium_version, args.dest, args.maven_url.rstrip("/"), pins
            )
            print(f"installed {path}")
        path = fetch_avro_converter(
            args.avro_converter_version, args.dest, args.hub_url.rstrip("/"), pins
        )
        print(f"installed {path}")
    except FetchError as exc:
        print(f"fetch_plugins: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
