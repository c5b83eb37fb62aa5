"""Every input and output location: a local path or s3://bucket/prefix, through pyarrow filesystems.

S3 credentials come from boto3's default chain (environment, profiles, instance roles); an endpoint override
(the `s3_endpoint_url` setting, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) reaches S3-compatible stores.
Failures become one-line `UserError`s that name the location and the likely fix.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from uniner.errors import UserError

GLOB_CHARS = re.compile(r"[*?\[]")
# A stage writes it last into its output: its presence means the stage finished (resume and the pipeline rely on it).
SUMMARY_FILE = "_summary.json"


@dataclass(frozen=True)
class Location:
    """A file or directory on some filesystem; `uri` is how the user names it, `path` how the filesystem does."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> Location:
        suffix = "/".join(part.strip("/") for part in parts if part)
        return Location(f"{self.uri.rstrip('/')}/{suffix}", self.fs, f"{self.path.rstrip('/')}/{suffix}")

    def __str__(self) -> str:
        return self.uri


def endpoint_from_env() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


# boto3's names of credential sources that never expire; a copy of them is as good as the source.
STATIC_CREDENTIALS = {"explicit", "env", "shared-credentials-file", "config-file", "boto-config"}


def s3_filesystem(endpoint_url: str = "") -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem with boto3's credentials and region, and the endpoint override if any."""
    import boto3

    session = boto3.Session()
    credentials = session.get_credentials()
    options: dict[str, Any] = {
        "region": session.region_name or "us-east-1",
        "connect_timeout": 5,
        "request_timeout": 60,
        # Few retries: an unreachable store should fail in seconds, not minutes.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if credentials is None:
        options["anonymous"] = True
    elif credentials.method in STATIC_CREDENTIALS:
        frozen = credentials.get_frozen_credentials()
        options.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    # Otherwise the credentials expire (an IAM role, SSO, a container or web identity role): a copy taken now would
    # stop working within hours, so the filesystem resolves them itself through the AWS SDK's default chain, which
    # finds the same source and refreshes it before it expires.
    endpoint_url = endpoint_url or endpoint_from_env()
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if not parsed.scheme or not parsed.netloc:
            raise UserError(f"S3 endpoint {endpoint_url!r} is not a URL: use e.g. http://127.0.0.1:9000")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**options)


def locate(uri: str, *, s3_endpoint_url: str = "") -> Location:
    """Resolve a local path or s3:// URI to its filesystem."""
    if not uri:
        raise UserError("empty location: give a local path or an s3://bucket/prefix URI")
    if uri.startswith("s3://"):
        bucket_and_key = uri[len("s3://") :].strip("/")
        if not bucket_and_key:
            raise UserError(f"{uri} names no bucket: use s3://bucket/prefix")
        return Location(uri.rstrip("/"), s3_filesystem(s3_endpoint_url), bucket_and_key)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(f"unsupported location scheme {scheme}:// in {uri}: use a local path or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(path, pafs.LocalFileSystem(), path)


def overlap(output: str, source: str) -> str:
    """How an output location meets an input (a path, glob or s3:// URI): "is", "contains", "lies inside" or ""
    when they are apart. Writing an output that meets an input would delete or mix into what the stage reads."""

    def canonical(uri: str) -> str:
        if uri.startswith("s3://"):
            return uri.rstrip("/")
        return os.path.realpath(os.path.expanduser(uri))

    out, src = canonical(output), canonical(source)
    if GLOB_CHARS.search(source):
        base = canonical(GLOB_CHARS.split(source, 1)[0].rsplit("/", 1)[0] or ".")
        if out == base or src.startswith(out + "/") or base.startswith(out + "/"):
            return "contains"
        matched = any(fnmatch.fnmatchcase(parent, src) for parent in [out, *_parents(out)])
        return "lies inside" if matched else ""
    if out == src:
        return "is"
    if src.startswith(out + "/"):
        return "contains"
    if out.startswith(src + "/"):
        return "lies inside"
    return ""


def _parents(path: str) -> list[str]:
    parts = path.rstrip("/").split("/")
    return ["/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _reason(error: BaseException) -> tuple[str, str]:
    """A short reason and a fix for a filesystem error."""
    text = " ".join(str(error).split())
    if "NETWORK_CONNECTION" in text or "curlCode: 7" in text or "Couldn't connect" in text or "resolve host" in text:
        return "the storage endpoint cannot be reached", "check the S3 endpoint setting and that the store is running"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "the bucket does not exist", "create it or fix the bucket name"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text or isinstance(error, PermissionError):
        return "access denied", "check the credentials (boto3's default chain) and permissions"
    if (
        isinstance(error, FileNotFoundError)
        or "No such file" in text
        or "NoSuchKey" in text
        or "Path does not exist" in text
    ):
        return "it does not exist", "check the path"
    return text[:300], "check the location and the storage settings"


@contextlib.contextmanager
def storage_errors(action: str, location: Location | str) -> Iterator[None]:
    """Turn filesystem errors inside the block into one-line UserErrors naming the action and the location."""
    try:
        yield
    except UserError:
        raise
    except (OSError, pa.ArrowException) as error:
        reason, fix = _reason(error)
        raise UserError(f"cannot {action} {location}: {reason}; {fix}") from None


def info(location: Location) -> pafs.FileInfo:
    with storage_errors("read", location):
        return location.fs.get_file_info(location.path)


def exists(location: Location) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_dir(location: Location) -> bool:
    return info(location).type == pafs.FileType.Directory


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """`**` crosses directories, `*` and `?` stay within one path component."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern)
    regex = "".join(
        ".*" if part.startswith("**") else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
        for part in parts
    )
    return re.compile(regex + r"\Z")


def _hidden(relative_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_path.split("/"))


def list_files(location: Location) -> list[Location]:
    """The files a location names: itself, every file under a directory (hidden and _-prefixed left out), or a glob's
    matches; sorted by path. A location that names nothing is a UserError."""
    match = GLOB_CHARS.search(location.path)
    base_path = location.path if match is None else location.path[: match.start()].rsplit("/", 1)[0]
    base_uri = (
        location.uri if match is None else location.uri[: len(location.uri) - len(location.path) + len(base_path)]
    )
    with storage_errors("list", location):
        base_info = location.fs.get_file_info(base_path)
        if base_info.type == pafs.FileType.File and match is None:
            return [location]
        if base_info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(base_path)
        infos = location.fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
    pattern = _glob_regex(location.path) if match else None
    files = []
    for entry in infos:
        relative = entry.path[len(base_path) :].lstrip("/")
        if entry.type != pafs.FileType.File or _hidden(relative):
            continue
        if pattern is None or pattern.match(entry.path):
            files.append(Location(f"{base_uri.rstrip('/')}/{relative}", location.fs, entry.path))
    if not files:
        raise UserError(f"no files found at {location.uri}: check the path or glob")
    return sorted(files, key=lambda loc: loc.path)


def read_bytes(location: Location) -> bytes:
    with storage_errors("read", location), location.fs.open_input_stream(location.path) as stream:
        return stream.read()


def write_bytes(location: Location, data: bytes) -> None:
    with storage_errors("write", location):
        parent = location.path.rsplit("/", 1)[0]
        if not location.is_s3:
            location.fs.create_dir(parent, recursive=True)
        with location.fs.open_output_stream(location.path) as stream:
            stream.write(data)


def read_text(location: Location) -> str:
    data = read_bytes(location)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{location} is not UTF-8 text: convert it to UTF-8") from None


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def read_json(location: Location) -> Any:
    try:
        return json.loads(read_text(location))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{location} is not valid JSON (line {error.lineno}: {error.msg}): fix or regenerate it"
        ) from None


def read_json_records(location: Location, *, lines: bool | None = None) -> list[tuple[str, Any]]:
    """The records of a JSON Lines file (one JSON value per line; `lines`, or by default a `.jsonl` name) or of a
    JSON list, each with where it stands (`FILE:LINE`, or `FILE record N`) for error messages. A line or file that
    is not valid JSON is a UserError naming the file and the line."""
    text = read_text(location)
    if lines or (lines is None and location.path.endswith(".jsonl")):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{location}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{location}:{number}: not valid JSON ({error.msg} at column {error.colno}): fix or "
                    "remove that line"
                ) from None
        return records
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{location}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}): fix that "
            "line, or write one record per line as .jsonl"
        ) from None
    if not isinstance(value, list):
        raise UserError(f"{location}: expected a JSON list of records, found a JSON {type(value).__name__}")
    return [(f"{location} record {index}", record) for index, record in enumerate(value, start=1)]


def write_json(location: Location, value: Any) -> None:
    write_text(location, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def delete_tree(location: Location) -> None:
    """Remove a directory and everything under it (no error when it is absent)."""
    with storage_errors("delete", location):
        if location.fs.get_file_info(location.path).type == pafs.FileType.Directory:
            location.fs.delete_dir(location.path)
        elif location.fs.get_file_info(location.path).type == pafs.FileType.File:
            location.fs.delete_file(location.path)


def prepare_output(location: Location, *, overwrite: bool) -> None:
    """Make sure an output directory can be written: absent or empty, or emptied when `overwrite` is set."""
    with storage_errors("write", location):
        kind = location.fs.get_file_info(location.path).type
        if kind == pafs.FileType.File:
            raise UserError(f"output {location} is a file, not a directory: choose a directory")
        entries = location.fs.get_file_info(pafs.FileSelector(location.path)) if kind == pafs.FileType.Directory else []
        names = {PurePosixPath(entry.path).name for entry in entries}
        # Only `_` work files and no summary: what an interrupted run of a stage leaves; nothing to keep.
        leftovers = bool(names) and all(n.startswith("_") for n in names) and "_summary.json" not in names
        if names and not (overwrite or leftovers):
            raise UserError(
                f"output {location} already holds files: pass --overwrite to replace them, or choose another"
            )
        if names:
            location.fs.delete_dir_contents(location.path)
        location.fs.create_dir(location.path, recursive=True)
        if location.is_s3:
            # S3 has no directories: a round trip of a marker object checks that the bucket takes writes.
            marker = location.join("_writable").path
            with location.fs.open_output_stream(marker) as stream:
                stream.write(b"")
            location.fs.delete_file(marker)


def download_tree(location: Location, local_dir: str) -> None:
    """Copy every file under `location` into `local_dir`, keeping relative paths."""
    with storage_errors("download", location):
        pafs.copy_files(
            location.path, local_dir, source_filesystem=location.fs, destination_filesystem=pafs.LocalFileSystem()
        )


def upload_tree(local_dir: str, location: Location) -> None:
    """Copy a local directory's files under `location`."""
    with storage_errors("upload to", location):
        pafs.copy_files(
            local_dir, location.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=location.fs
        )
