"""The storage module: local paths and s3:// through a real (local) S3 server."""

import pytest

from uniner import storage
from uniner.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A writable root, once local and once on the local S3 server."""
    if request.param == "local":
        return storage.locate(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return storage.locate(f"{bucket}/root", s3_endpoint_url=request.getfixturevalue("s3_endpoint"))


def test_write_read_round_trip(root):
    storage.write_text(root.join("a/b.txt"), "héllo ☃")
    assert storage.read_text(root.join("a/b.txt")) == "héllo ☃"
    storage.write_json(root.join("x.json"), {"k": [1, 2]})
    assert storage.read_json(root.join("x.json")) == {"k": [1, 2]}
    assert storage.exists(root.join("a/b.txt")) and not storage.exists(root.join("a/c.txt"))


def test_list_files_directory_glob_and_single_file(root):
    for name in ["d/1.jsonl", "d/2.txt", "d/sub/3.jsonl", "d/_hidden/4.jsonl", "d/.x.jsonl"]:
        storage.write_text(root.join(name), "x")
    names = [f.uri.rsplit("/root/", 1)[1] for f in storage.list_files(root.join("d"))]
    assert names == ["d/1.jsonl", "d/2.txt", "d/sub/3.jsonl"]
    globbed = [f.uri.rsplit("/root/", 1)[1] for f in storage.list_files(root.join("d/*.jsonl"))]
    assert globbed == ["d/1.jsonl"]
    deep = [f.uri.rsplit("/root/", 1)[1] for f in storage.list_files(root.join("d/**/*.jsonl"))]
    assert deep == ["d/1.jsonl", "d/sub/3.jsonl"]  # `**/` matches zero or more folders
    assert [f.uri for f in storage.list_files(root.join("d/2.txt"))] == [root.join("d/2.txt").uri]


def test_list_files_names_a_missing_location(root):
    with pytest.raises(UserError, match="does not exist|no files found"):
        storage.list_files(root.join("missing"))


def test_prepare_output_refuses_to_clobber_without_overwrite(root):
    out = root.join("out")
    storage.prepare_output(out, overwrite=False)
    storage.write_text(out.join("part.parquet"), "x")
    with pytest.raises(UserError, match="already holds files: pass --overwrite"):
        storage.prepare_output(out, overwrite=False)
    storage.prepare_output(out, overwrite=True)
    assert not storage.exists(out.join("part.parquet"))


def test_prepare_output_clears_what_an_interrupted_run_left(root):
    out = root.join("out")
    storage.write_text(out.join("_work/staging/part-0.parquet"), "x")  # Ctrl-C mid-stage leaves only work files
    storage.prepare_output(out, overwrite=False)
    assert not storage.exists(out.join("_work/staging/part-0.parquet"))
    storage.write_text(out.join("_summary.json"), "{}")  # a finished stage is not leftovers
    with pytest.raises(UserError, match="already holds files"):
        storage.prepare_output(out, overwrite=False)


def test_delete_tree(root):
    storage.write_text(root.join("t/a.txt"), "x")
    storage.delete_tree(root.join("t"))
    assert not storage.exists(root.join("t/a.txt"))


def test_upload_and_download_tree(root, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f.bin").write_bytes(b"\x00\x01")
    storage.upload_tree(str(source), root.join("tree"))
    target = tmp_path / "dst"
    storage.download_tree(root.join("tree"), str(target))
    assert (target / "sub" / "f.bin").read_bytes() == b"\x00\x01"


def test_missing_bucket_is_named(s3_endpoint):
    location = storage.locate("s3://no-such-bucket-here/x.txt", s3_endpoint_url=s3_endpoint)
    with pytest.raises(UserError, match="s3://no-such-bucket-here/x.txt"):
        storage.read_text(location)


def test_unreachable_endpoint_fails_fast_with_the_fix():
    location = storage.locate("s3://bucket/key", s3_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(UserError, match="cannot be reached; check the S3 endpoint"):
        storage.read_bytes(location)


def test_endpoint_comes_from_the_environment(monkeypatch, s3_bucket, s3_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    location = storage.locate(f"{s3_bucket}/env.txt")
    storage.write_text(location, "ok")
    assert storage.read_text(location) == "ok"


@pytest.mark.parametrize(
    "uri, message",
    [("", "empty location"), ("gs://b/x", "unsupported location scheme gs://"), ("s3://", "names no bucket")],
)
def test_bad_locations(uri, message):
    with pytest.raises(UserError, match=message):
        storage.locate(uri)


def test_bad_endpoint_url():
    with pytest.raises(UserError, match="is not a URL"):
        storage.locate("s3://b/k", s3_endpoint_url="localhost")


class RotatingCredentials:
    """A container credentials endpoint (what ECS and EKS give a task) that hands out credentials expiring in 3 s,
    new ones on every request; it counts the requests."""

    def __init__(self):
        import datetime
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(time.time())
                expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
                body = json.dumps(
                    {
                        "AccessKeyId": f"ASIA{len(outer.requests):012d}",
                        "SecretAccessKey": "rotating",
                        "Token": "session",
                        "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/credentials"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.slow
def test_expiring_credentials_are_refreshed_during_a_long_job(s3_endpoint, tmp_path):
    """A copy of temporary credentials taken at start would expire mid-job: storage keeps asking their source."""
    import os
    import subprocess
    import sys

    credentials = RotatingCredentials()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=credentials.url,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        HOME=str(tmp_path),
    )
    job = f"""
import time, boto3
from uniner import storage
boto3.client("s3", endpoint_url="{s3_endpoint}").create_bucket(Bucket="rotation")
assert boto3.Session().get_credentials().method == "container-role"
location = storage.locate("s3://rotation/run", s3_endpoint_url="{s3_endpoint}")
print("started", time.time(), flush=True)
for part in range(3):  # a job that outlives its first credentials
    storage.write_text(location.join(f"part-{{part}}.txt"), str(part))
    time.sleep(4)
print(storage.read_text(location.join("part-2.txt")))
"""
    result = subprocess.run([sys.executable, "-c", job], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    started = float(result.stdout.split("started ")[1].split()[0])
    assert result.stdout.strip().endswith("2")
    assert sum(t > started for t in credentials.requests) >= 2  # asked again as they expired, not copied once
    credentials.server.shutdown()
