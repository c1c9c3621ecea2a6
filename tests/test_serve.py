"""`mmsearch serve`'s API: the hits are the CLI's, files leave only by id, tokens and host names
are checked, uploads are bounded and private, a concurrent index run shows up without a restart."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import anyio
import numpy as np
import pytest
from conftest import make_image, make_note
from typer.testing import CliRunner

pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
from starlette.testclient import TestClient  # noqa: E402

from mmsearch.cli import app as cli_app  # noqa: E402
from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec  # noqa: E402
from mmsearch.loaders.files import content_hash  # noqa: E402
from mmsearch.pipeline.run import index_paths  # noqa: E402
from mmsearch.serve import ServeOptions, create_app  # noqa: E402

runner = CliRunner()
SECRET = b"top secret: not for the web"
NOTE = "# Trip\nWe went to the beach.\nThe dog ran after a ball.\nThen it rained.\n"
ADDED = ("hit", "id", "url", "thumb")  # what a hit has beyond `mmsearch search --json`


def build(media: Path, root: Path, model: Path, **kw) -> None:
    spec = ModelSpec.parse(str(model))
    options = IndexOptions(
        roots=(media,), root_dir=root, encoder=EncoderOptions(model=spec), workers=0, **kw
    )
    index_paths(options)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """Photos and a note indexed once, beside a hidden file and a file that is not indexed."""
    base = tmp_path_factory.mktemp("served")
    media = base / "media"
    for i in range(4):
        make_image(media / "photos" / f"p{i}.jpg", pattern=i, size=(64 + 16 * i, 48))
    make_note(media / "notes" / "trip.md", NOTE)
    latin1 = os.path.join(os.fsencode(media / "photos"), b"caf\xe9.jpg")  # not UTF-8
    make_image(Path(os.fsdecode(latin1)), pattern=7, size=(50, 50))
    (media / "photos" / ".hidden.jpg").write_bytes(SECRET)
    build(media, base / "indexes", tiny_model)
    (media / "notes" / "unindexed.md").write_bytes(SECRET)  # after indexing: not in the index
    return media, base / "indexes"


def serve(root: Path, **kw) -> TestClient:
    return TestClient(create_app(ServeOptions(root_dir=root, **kw)), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(library):
    with serve(library[1]) as c:
        yield c


def cli_hits(root: Path, *args) -> list[dict]:
    r = runner.invoke(cli_app, ["search", *map(str, args), "--json", "--index-dir", str(root)])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines()]


def same_hits(api: list[dict], cli: list[dict]) -> None:
    """The API's hits are the CLI's objects (scores to float noise) plus id, url and thumb."""
    assert len(api) == len(cli)
    for a, c in zip(api, cli, strict=True):
        assert a.pop("score") == pytest.approx(c.pop("score"), abs=2e-6)
        assert {k: v for k, v in a.items() if k not in ADDED} == c


@pytest.mark.parametrize(
    "query", ["the dog ran after a ball", "beach + 2:sunset - people", "a photo"]
)
def test_hits_are_the_cli_json_plus_where_to_fetch_them(client, library, query):
    media, root = library
    r = client.get("/api/search", params={"q": query, "k": 10})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    hits = r.json()["hits"]
    same_hits([dict(h) for h in hits], cli_hits(root, query, "-k", 10))
    for h in hits:
        body = client.get(h["url"]).content
        assert body == Path(h["path"]).read_bytes()
        assert ("thumb" in h) == (h["modality"] == "image")
    latin1 = [h for h in hits if h["path"].endswith("caf\udce9.jpg")]
    assert len(latin1) == 1 and base64.b64decode(latin1[0]["path_bytes"]).endswith(b"caf\xe9.jpg")
    assert b"\\udce9" in r.content  # escaped as the CLI escapes it: still valid UTF-8


@pytest.mark.parametrize(
    "params, args",
    [
        ({"path": "*.md"}, ["--path", "*.md"]),
        ({"path": ["*/p1.jpg", "*/p2.jpg"]}, ["--path", "*/p1.jpg", "--path", "*/p2.jpg"]),
        (
            {"after": "2001-01-01", "max_size": "100k"},
            ["--after", "2001-01-01", "--max-size", "100k"],
        ),
        ({"before": "2001-01-01"}, ["--before", "2001-01-01"]),
        ({"group": "1", "type": "image", "k": 2}, ["--group", "--type", "image", "-k", "2"]),
    ],
)
def test_filters_are_the_search_options_of_their_names(client, library, params, args):
    r = client.get("/api/search", params={"q": "a dog", **params})
    if "before" in params:  # every file is newer: nothing found, as the CLI finds nothing
        assert r.status_code == 200 and r.json()["hits"] == []
        return
    same_hits(r.json()["hits"], cli_hits(library[1], "a dog", *args))
    assert r.json()["hits"]


def test_type_and_k_and_their_errors(client):
    hits = client.get("/api/search", params={"q": "dog", "type": "image", "k": 2}).json()["hits"]
    assert len(hits) == 2 and {h["modality"] for h in hits} == {"image"}
    for params, message in [
        ({"q": "dog", "type": "video?"}, "unknown type 'video?'"),
        ({"like": "0" * 32, "type": "video?"}, "unknown type"),
        ({"q": "dog", "k": 0}, "k must be"),
        ({"q": "dog", "k": "ten"}, "not a number"),
        ({"q": "dog", "colour": "red"}, "unknown parameter 'colour'"),
        ({"q": "dog + "}, "empty term"),
        ({"q": "   "}, "nothing to search for"),
        ({"q": "dog - dog"}, "cancel"),
        ({"q": "dog", "index": "nope"}, "not served here"),
        ({"q": "dog", "after": "yesterday"}, "is not a date"),
        ({"q": "dog", "group": "maybe"}, "not a yes or no"),
        ({"q": "dog", "min_size": "big"}, "min-size"),
    ]:
        r = client.get("/api/search", params=params)
        assert r.status_code in (400, 404), (params, r.text)
        assert message in r.json()["error"], (params, r.json())


def test_upload_finds_the_same_photo_first_and_combines_with_text(client, library):
    media, root = library
    photo = media / "photos" / "p2.jpg"
    files = {"image": ("holiday.jpg", photo.read_bytes(), "image/jpeg")}
    r = client.post("/api/search", files=files, data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["path"] == str(photo) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    same_hits(hits, cli_hits(root, "--image", photo, "-k", 3))
    r = client.post("/api/search?q=a+dog&type=image", files=files)
    same_hits(r.json()["hits"], cli_hits(root, "a dog", "--image", photo, "--type", "image"))


def test_bad_uploads_are_json_errors_and_leave_nothing_behind(library):
    with serve(library[1], max_upload=10_000) as c:
        uploads = _service(c).uploads
        assert oct(uploads.stat().st_mode & 0o777) == "0o700"
        big = {"image": ("big.jpg", b"\xff" * 20_000, "image/jpeg")}
        r = c.post("/api/search", files=big)
        assert r.status_code == 413 and "larger than 10000 bytes" in r.json()["error"]
        junk = {"image": ("holiday.jpg", b"not a picture", "image/jpeg")}
        r = c.post("/api/search", files=junk)
        assert r.status_code == 400
        assert r.json()["error"].startswith("cannot use holiday.jpg as a query image")
        r = c.post("/api/search", files={"video": ("a.mp4", b"x", "video/mp4")})
        assert r.status_code == 400 and "'video'" in r.json()["error"]
        r = c.post("/api/search", files={"image": ("a.jpg", b"x")}, data={"q": "a", "like": "x"})
        assert r.status_code == 400 and "like=" in r.json()["error"]
        assert list(uploads.iterdir()) == []
    assert not uploads.exists()  # removed when the server stops


def _service(client: TestClient):
    return client.app.state.service


def test_more_like_this_uses_the_stored_vectors(client, library):
    media, root = library
    photo = media / "photos" / "p1.jpg"
    (target,) = [h for h in client.get("/api/search?q=photo&k=10").json()["hits"]
                 if h["path"] == str(photo)]  # fmt: skip
    r = client.get("/api/search", params={"like": target["id"], "k": 4})
    hits = r.json()["hits"]
    assert hits[0]["path"] == str(photo) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    by_example = cli_hits(root, "--image", photo, "-k", 4)
    assert [h["path"] for h in hits] == [h["path"] for h in by_example]
    note = client.get("/api/search?q=beach&type=text").json()["hits"][0]
    r = client.get("/api/search", params={"like": note["id"], "at": note["start"]})
    assert r.json()["hits"][0]["path"] == note["path"]
    r = client.get("/api/search", params={"like": "0" * 32})
    assert r.status_code == 404 and "no file with id" in r.json()["error"]


def test_a_note_hit_carries_its_lines(client):
    note = client.get("/api/search?q=beach&type=text").json()["hits"][0]
    assert (note["start"], note["end"]) == (1, 4)
    assert note["snippet"] == NOTE.splitlines()
    assert "thumb" not in note and client.get(note["url"]).text == NOTE


def test_thumbnails_are_small_jpegs_kept_in_the_index(client, library):
    from PIL import Image

    media, root = library
    before = sorted(p.name for p in media.rglob("*"))
    for h in client.get("/api/search?q=dog&type=image&k=4").json()["hits"]:
        r = client.get(h["thumb"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb, original = Image.open(io.BytesIO(r.content)), Image.open(h["path"])
        assert thumb.format == "JPEG" and max(thumb.size) <= 400
        assert thumb.size[0] / thumb.size[1] == pytest.approx(
            original.size[0] / original.size[1], rel=0.05
        )
        assert (root / "default" / "thumbs" / h["id"][:2] / f"{h['id']}.jpg").is_file()
    assert sorted(p.name for p in media.rglob("*")) == before  # nothing beside the user's files
    note = client.get("/api/search?q=beach&type=text").json()["hits"][0]
    assert client.get(f"/thumb/default/{note['id']}").status_code == 404


def raw_get(client: TestClient, raw_path: bytes) -> tuple[int, bytes]:
    """The answer to a request line naming exactly `raw_path`, unnormalised (HTTP clients
    remove dot segments; an attacker's raw socket does not), passed as uvicorn passes it."""
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": unquote(path.decode("ascii")), "raw_path": path,
        "query_string": query, "root_path": "", "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    anyio.run(client.app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_no_crafted_url_returns_a_file_that_is_not_served(client, library):
    media, root = library
    hidden = content_hash((media / "photos" / ".hidden.jpg").read_bytes())
    unindexed = content_hash((media / "notes" / "unindexed.md").read_bytes())
    indexed = client.get("/api/search?q=dog&k=1").json()["hits"][0]["id"]
    passwd = "/etc/passwd"
    attempts = [
        f"/file/default/{hidden}", f"/file/default/{unindexed}", f"/thumb/default/{hidden}",
        f"/file/default/{indexed.upper()}", f"/file/default/{indexed}/..", "/file/default/",
        "/file/default/../../../../etc/passwd", "/file/default/..%2f..%2f..%2fetc%2fpasswd",
        "/file/default/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/file/..%2f..%2f..%2fetc/passwd",
        f"/file/default/{passwd}", f"/file/default/{quote_all(passwd)}", f"/file{passwd}",
        f"/file/default/{media}/notes/unindexed.md", f"/file/default/{indexed}%00.md",
        "/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
        "/static/../../../../etc/passwd", "/static/", "/static", "/thumb/default/..%2f..%2fthumbs",
        f"/static/{passwd}", f"/file/default/{indexed}/../../etc/passwd",
    ]  # fmt: skip
    for url in attempts:
        status, body = raw_get(client, url.encode())
        assert SECRET not in body and b"root:" not in body and b"import" not in body, url
        if status == 307:  # /static -> /static/, which is refused in turn
            assert body == b"" and url == "/static"
            continue
        assert status in (400, 404), (url, status, body[:200])
        assert json.loads(body)["error"], url


def quote_all(text: str) -> str:
    return "".join(f"%{b:02x}" for b in text.encode())


def test_a_token_is_required_by_header_or_cookie(library):
    with serve(library[1], token="s3cret", allowed_hosts=None) as c:
        r = c.get("/api/search?q=dog")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["error"]
        assert c.get("/", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/info", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert c.get("/?token=wrong", follow_redirects=False).status_code == 401
        hits = c.get("/api/search?q=dog", headers={"Authorization": "Bearer s3cret"}).json()
        file_url = hits["hits"][0]["url"]
        assert c.get(file_url).status_code == 401
        r = c.get("/?q=dog&token=s3cret", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?q=dog"  # token not in the URL
        cookie = r.headers["set-cookie"]
        assert "mmsearch_token=s3cret" in cookie and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert c.get(file_url).status_code == 200  # the cookie from now on
        assert c.get("/").status_code == 200


def test_only_loopback_names_are_answered_without_a_token(client):
    for host in ("localhost:8765", "127.0.0.1", "[::1]:8765"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8765", "192.168.1.7:8765"):
        r = client.get("/api/info", headers={"host": host})
        assert r.status_code == 403 and "addressed to" in r.json()["error"], host


def test_errors_are_json_with_their_status(client):
    assert client.get("/no/such/page").json() == {"error": "Not Found"}
    r = client.delete("/api/search")
    assert r.status_code == 405 and r.json()["error"]
    r = client.post(
        "/api/search",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert r.status_code == 400 and r.json()["error"]
    r = client.post("/api/search", data={"k": "3"})
    assert r.status_code == 400 and "nothing to search for" in r.json()["error"]


def test_page_and_info(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>mmsearch</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    info = client.get("/api/info").json()
    assert info["indexes"] == ["default"] and {"q", "like", "k", "type"} <= set(info["params"])
    (ix,) = client.get("/api/indexes").json()["indexes"]
    assert (ix["name"], ix["files"], ix["vectors"]) == ("default", 6, 6)


def test_sees_new_commits_and_rebuilds_without_a_restart(
    library, tmp_path, tiny_model, other_model
):
    media, served_root = library
    root = tmp_path / "indexes"
    shutil.copytree(served_root, root)
    with serve(root, poll_s=0.05) as c:
        query = {"q": "a red kite over the dunes", "type": "text", "k": 10}
        paths = lambda: {h["path"] for h in c.get("/api/search", params=query).json()["hits"]}  # noqa: E731
        assert len(paths()) == 1
        new = make_note(media.parent / "more" / "kite.md", "a red kite over the dunes")
        build(new.parent, root, tiny_model)  # a second index run, while the server reads
        assert _eventually(lambda: str(new) in paths())
        build(media, root, other_model, rebuild=True)  # a new generation, of another model
        model = lambda: c.get("/api/indexes").json()["indexes"][0]["model"]  # noqa: E731
        assert _eventually(lambda: str(other_model) in model())
        assert str(media / "notes" / "unindexed.md") in paths()  # indexed by the rebuild
        assert c.get("/api/indexes").json()["indexes"][0]["problem"] is None


def _eventually(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_concurrent_requests_get_their_own_answers(client):
    queries = ["dog", "beach", "a photo", "rain + 2:ball", "sunset - people"]
    expected = {q: client.get("/api/search", params={"q": q}).json() for q in queries}
    wrong, done = [], []

    def worker(i):
        for n in range(6):
            q = queries[(i + n) % len(queries)]
            got = client.get("/api/search", params={"q": q}).json()
            if [h["path"] for h in got["hits"]] != [h["path"] for h in expected[q]["hits"]]:
                wrong.append((q, got))
            done.append(q)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 48 and not wrong


def test_the_encoder_thread_batches_texts_that_arrive_together():
    import numpy as np

    from mmsearch.serve.encoder import EncoderThread

    release, calls = threading.Event(), []

    class Model:
        def embed(self, texts):
            calls.append(list(texts))
            release.wait(5)
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    model, encoder = Model(), EncoderThread()
    try:
        results = {}
        threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, encoder.texts(model.embed, [t, "x"]))) for t in ("a", "bb", "ccc", "dddd")]  # fmt: skip
        threads[0].start()
        while not calls:
            time.sleep(0.01)
        for t in threads[1:]:
            t.start()
        time.sleep(0.2)  # the other three wait behind the first batch
        release.set()
        for t in threads:
            t.join()
        assert calls[0] == ["a", "x"] and sorted(calls[1]) == ["bb", "ccc", "dddd", "x"]
        assert len(calls) == 2
        for t, rows in results.items():
            assert rows.tolist() == [[len(t), 1.0], [1.0, 1.0]]
        with pytest.raises(ZeroDivisionError):
            encoder.call(lambda: 1 / 0)
    finally:
        encoder.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only directories")
def test_read_only_index_keeps_thumbnails_in_a_private_temporary_directory(library, tmp_path):
    root = tmp_path / "indexes"
    shutil.copytree(library[1], root)
    shutil.rmtree(root / "default" / "thumbs", ignore_errors=True)
    os.chmod(root / "default", 0o555)
    try:
        with serve(root) as c:
            hit = c.get("/api/search?q=dog&type=image").json()["hits"][0]
            assert c.get(hit["thumb"]).status_code == 200
            thumbs = _service(c).thumbs["default"].dir
            assert not thumbs.is_relative_to(root) and oct(thumbs.stat().st_mode & 0o777) == "0o700"
        assert not thumbs.exists()
    finally:
        os.chmod(root / "default", 0o755)


# --- the command ------------------------------------------------------------------------------
def _cli(*args) -> object:
    return runner.invoke(cli_app, ["serve", *map(str, args)])


def test_other_addresses_need_a_token_and_a_taken_port_is_one_line(library):
    r = _cli("--host", "0.0.0.0", "--port", 0, "--index-dir", library[1])
    assert r.exit_code == 2 and "give --token" in r.stderr and "0.0.0.0" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _cli("--port", taken.getsockname()[1], "--index-dir", library[1])
    assert r.exit_code == 2 and "address already in use" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("--port", 0, "--index", "nope", "--index-dir", library[1])
    assert r.exit_code == 2 and "no index named 'nope'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, "twice"])
def test_the_command_serves_until_ctrl_c_or_sigterm(library, stop):
    """The real command in a new process: prints where it listens, answers, stops cleanly."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MMSEARCH_TOKEN": "t0ken"}
    cmd = [sys.executable, "-m", "mmsearch.cli", "serve", "--port", "0", "--index-dir", str(library[1])]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+)\?token=t0ken ", line).group(1)
        request = urllib.request.Request(url + "api/search?q=dog&k=2")
        request.add_header("Authorization", "Bearer t0ken")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert len(json.load(answer)["hits"]) == 2
        for sig in [signal.SIGINT] * 2 if stop == "twice" else [stop]:  # twice: impatient
            proc.send_signal(sig)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err.strip().endswith("mmsearch: stopped"), err
    assert "Traceback" not in err


def test_readme_curl_examples_run(library, tmp_path, monkeypatch):
    """The README's curl lines, each sent as curl would send it (ID: a hit's id)."""
    from test_docs import code_blocks

    media, root = library
    (block,) = [b for b in code_blocks("### The gallery and the search API") if "curl" in b]
    monkeypatch.chdir(tmp_path)
    shutil.copy(media / "photos" / "p1.jpg", "query.jpg")
    with serve(root) as c:
        file_id = c.get("/api/search?q=dog&type=image").json()["hits"][0]["id"]
        for line in block.splitlines():
            words = shlex.split(line.replace("ID", file_id), comments=True)
            assert words[0] == "curl", line
            status, body, out = _curl(c, words[1:])
            assert status == 200, (line, body)
            if out:
                Path(out).write_bytes(body)
    original = {p.read_bytes() for p in (media / "photos").glob("p*.jpg")}
    assert Path("found.jpg").read_bytes() in original


def _curl(client: TestClient, args: list[str]) -> tuple[int, bytes, str | None]:
    """The request curl makes for -F NAME=@FILE / -F NAME=VALUE / -H / -o OUT and a URL."""
    files, data, headers, out, url = {}, {}, {}, None, None
    words = iter(args)
    for word in words:
        if word == "-F":
            name, value = next(words).split("=", 1)
            if value.startswith("@"):
                files[name] = (value[1:], Path(value[1:]).read_bytes())
            else:
                data[name] = value
        elif word == "-H":
            name, value = next(words).split(":", 1)
            headers[name] = value.strip()
        elif word == "-o":
            out = next(words)
        else:
            url = word.removeprefix("http://127.0.0.1:8765")
    if files or data:
        r = client.post(url, files=files, data=data, headers=headers)
    else:
        r = client.get(url, headers=headers)
    return r.status_code, r.content, out


def test_a_video_hit_has_the_frame_of_its_moment_as_thumbnail(tmp_path, tiny_model):
    """Shots of a video are hits at their second; the thumbnail is the picture shown there."""
    from PIL import Image
    from videos import make_video

    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]
    make_video(tmp_path / "v" / "trip.mp4", [(c, 4.0) for c in colours], tone=None, gop=5)
    build(tmp_path / "v", tmp_path / "indexes", tiny_model)
    with serve(tmp_path / "indexes") as c:
        hits = c.get("/api/search?q=a+trip&type=video&k=10").json()["hits"]
        assert len(hits) == 3 and {h["start"] for h in hits} == {0, 4, 8}
        for h in hits:
            assert h["thumb"] == f"/thumb/default/{h['id']}?at={h['start']}"
            r = c.get(h["thumb"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            pixels = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float32)
            colour = np.array(colours[int(h["start"]) // 4], np.float32)
            assert np.abs(pixels.mean(axis=(0, 1)) - colour).max() < 25, (
                h["start"],
                pixels.mean((0, 1)),
            )
        assert c.get(f"/thumb/default/{hits[0]['id']}?at=soon").status_code == 400


def test_min_relevance_filters_as_the_cli_does(client, library):
    rels = [h["relevance"] for h in cli_hits(library[1], "beach")]
    cut = (rels[0] + rels[-1]) / 2
    hits = client.get("/api/search", params={"q": "beach", "min_relevance": cut}).json()["hits"]
    assert [h["relevance"] for h in hits] == [x for x in rels if x >= cut]
    r = client.get("/api/search", params={"q": "beach", "min_relevance": 2})
    assert r.status_code == 400 and "between 0 and 1" in r.json()["error"]


def test_the_calibration_is_read_once_not_per_request(library, monkeypatch):
    """Each request searches through a copy of the served Searcher: the relevance calibration is
    read from the index once and shared, not re-read (or re-fitted) for every request."""
    from mmsearch.storage import calibration

    reads = []
    real = calibration.load
    monkeypatch.setattr(calibration, "load", lambda col: reads.append(1) or real(col))
    with serve(library[1]) as c:
        for q in ("beach", "a dog", "sunset", "beach"):
            assert c.get("/api/search", params={"q": q}).status_code == 200
    assert len(reads) == 1
