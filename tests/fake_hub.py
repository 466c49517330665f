"""A fake Hugging Face Hub on loopback, for tests: just the endpoints `huggingface_hub` and `transformers` call to
create a repository, commit files to it and download them again.

Run as a script: ``python tests/fake_hub.py --root DIR --port-file FILE``. It binds 127.0.0.1 on a free port,
writes the port to FILE once it listens, and serves until it is sent SIGTERM. The test that starts it stops it by
its process id.

What it implements (model repositories only):

* ``GET  /api/whoami-v2``                                      the user behind the bearer token
* ``POST /api/repos/create``                                   a repository with one empty initial commit
* ``POST /api/validate-yaml``                                  the README metadata must parse as a YAML mapping
* ``POST /api/models/{repo}/preupload/{rev}``                  answers upload mode "regular" for every file, so the
  client sends all contents inline in the commit (no LFS or Xet storage to fake)
* ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``       ndjson header + base64 files; a PR goes to refs/pr/N
* ``POST /api/models/{repo}/branch/{branch}``                  a branch from main
* ``GET  /api/models/{repo}[/revision/{rev}]``                 repo info with siblings
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``                    file downloads

Storage under ``--root``: ``repos/<ns>/<name>/commits/<oid>/<files>`` (one full tree per commit),
``repos/<ns>/<name>/repo.json`` (private flag, refs, commit log) and ``requests.jsonl`` (one line per request:
method, path, whether it carried the expected token; never the token itself). The expected token comes from the
environment variable ``FAKE_HUB_TOKEN``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER = "fake-user"
_LOCK = threading.Lock()  # one writer at a time: commits copy whole trees
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


# ----------------------------------------------------------------------------------------------------------------------
# Storage (also imported by the tests to read what arrived)


def repo_dir(root: Path, repo_id: str) -> Path:
    return Path(root) / "repos" / repo_id


def read_repo(root: Path, repo_id: str) -> dict | None:
    path = repo_dir(root, repo_id) / "repo.json"
    return json.loads(path.read_text()) if path.exists() else None


def tree(root: Path, repo_id: str, revision: str = "main") -> Path:
    """The folder holding the files of `repo_id` at `revision` (a branch, `refs/pr/N` or a commit id)."""
    meta = read_repo(root, repo_id)
    if meta is None:
        raise FileNotFoundError(f"no repository {repo_id}")
    oid = meta["refs"].get(revision, revision)
    path = repo_dir(root, repo_id) / "commits" / oid
    if not path.is_dir():
        raise FileNotFoundError(f"no revision {revision} in {repo_id}")
    return path


def requests_log(root: Path) -> list[dict]:
    path = Path(root) / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _write_repo(root: Path, repo_id: str, meta: dict) -> None:
    (repo_dir(root, repo_id) / "repo.json").write_text(json.dumps(meta, indent=1))


def _new_commit(root: Path, repo_id: str, parent: str | None, files: dict[str, bytes], message: str) -> str:
    meta = read_repo(root, repo_id)
    oid = hashlib.sha1(f"{repo_id}:{parent}:{len(meta['commits'])}:{message}".encode()).hexdigest()
    dest = repo_dir(root, repo_id) / "commits" / oid
    if parent is not None:
        shutil.copytree(repo_dir(root, repo_id) / "commits" / parent, dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        target = (dest / path).resolve()
        if dest.resolve() not in target.parents:
            raise ValueError(f"path escapes the repository: {path}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    meta["commits"].append({"oid": oid, "parent": parent, "message": message, "files": sorted(files)})
    _write_repo(root, repo_id, meta)
    return oid


# ----------------------------------------------------------------------------------------------------------------------
# HTTP


class FakeHubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path = Path(".")

    def log_message(self, format, *args) -> None:  # keep the test output quiet
        pass

    # -- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        expected = os.environ.get("FAKE_HUB_TOKEN")
        return bool(expected) and self.headers.get("Authorization") == f"Bearer {expected}"

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, error_code: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if error_code:
            headers["X-Error-Code"] = error_code
            headers["X-Error-Message"] = str(payload.get("error", "")) if isinstance(payload, dict) else ""
        self._send(status, json.dumps(payload).encode(), headers, head=self.command == "HEAD")

    def _log(self) -> None:
        with _LOCK, open(self.root / "requests.jsonl", "a") as f:
            path = urlsplit(self.path).path
            f.write(
                json.dumps({"method": self.command, "path": unquote(path), "authorized": self._authorized()}) + "\n"
            )

    def _route(self) -> None:
        self._log()
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", self.preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>.+)", self.commit),
            ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>.+)", self.create_branch),
            ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", self.repo_info),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>refs/pr/\d+|[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>refs/pr/\d+|[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                try:
                    return handler(query=query, **match.groupdict())
                except Exception as error:  # a bug in the fake must not hang the client
                    return self._json(500, {"error": f"fake hub: {type(error).__name__}: {error}"})
        self._json(404, {"error": f"fake hub: no route for {self.command} {path}"})

    do_GET = do_POST = do_HEAD = _route

    def _repo_or_404(self, repo: str, write: bool = False) -> dict | None:
        meta = read_repo(self.root, repo)
        if meta is None or (meta["private"] and not self._authorized()):
            self._json(404, {"error": "Repository not found"}, "RepoNotFound")
            return None
        if write and not self._authorized():
            self._json(401, {"error": "Invalid credentials"})
            return None
        return meta

    # -- endpoints

    def whoami(self, query) -> None:
        if not self._authorized():
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        self._json(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, query) -> None:
        payload = json.loads(self._body())
        if not self._authorized():
            return self._json(401, {"error": "Invalid credentials"})
        if payload.get("type", "model") != "model":
            return self._json(400, {"error": "the fake hub only hosts models"})
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with _LOCK:
            if read_repo(self.root, repo_id) is not None:
                return self._json(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
            repo_dir(self.root, repo_id).mkdir(parents=True)
            meta = {"private": payload.get("visibility") == "private", "refs": {}, "commits": []}
            _write_repo(self.root, repo_id, meta)
            oid = _new_commit(self.root, repo_id, None, {}, "initial commit")
            meta = read_repo(self.root, repo_id)
            meta["refs"]["main"] = oid
            _write_repo(self.root, repo_id, meta)
        self._json(200, {"url": self._url(repo_id), "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:
        import yaml

        content = json.loads(self._body())["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            ok = match is not None and isinstance(yaml.safe_load(match.group(1)), dict)
        except yaml.YAMLError:
            ok = False
        if not ok:
            return self._json(400, {"errors": [{"message": "metadata is not a YAML mapping"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo, rev, query) -> None:
        payload = json.loads(self._body())
        if self._repo_or_404(repo, write=True) is None:
            return
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": None})

    def commit(self, repo, rev, query) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        with _LOCK:
            meta = self._repo_or_404(repo, write=True)
            if meta is None:
                return
            if rev not in meta["refs"]:
                return self._json(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound")
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {}
            for item in lines:
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._json(400, {"error": f"the fake hub does not support {item['key']} operations"})
            oid = _new_commit(self.root, repo, meta["refs"][rev], files, header["summary"])
            meta = read_repo(self.root, repo)
            pr_url = None
            if query.get("create_pr") == ["1"]:
                number = 1 + sum(ref.startswith("refs/pr/") for ref in meta["refs"])
                meta["refs"][f"refs/pr/{number}"] = oid
                pr_url = f"{self._url(repo)}/discussions/{number}"
            else:
                meta["refs"][rev] = oid
            _write_repo(self.root, repo, meta)
        self._json(200, {"commitUrl": f"{self._url(repo)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url})

    def create_branch(self, repo, branch, query) -> None:
        self._body()
        with _LOCK:
            meta = self._repo_or_404(repo, write=True)
            if meta is None:
                return
            if branch in meta["refs"]:
                return self._json(409, {"error": "Reference already exists"})
            meta["refs"][branch] = meta["refs"]["main"]
            _write_repo(self.root, repo, meta)
        self._json(200, {})

    def repo_info(self, repo, query, rev=None) -> None:
        meta = self._repo_or_404(repo)
        if meta is None:
            return
        try:
            folder = tree(self.root, repo, rev or "main")
        except FileNotFoundError:
            return self._json(404, {"error": "Invalid rev id"}, "RevisionNotFound")
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": folder.name,
                "private": meta["private"],
                "tags": [],
                "siblings": [{"rfilename": name} for name in files],
            },
        )

    def resolve(self, repo, rev, file, query) -> None:
        head = self.command == "HEAD"
        meta = self._repo_or_404(repo)
        if meta is None:
            return
        try:
            folder = tree(self.root, repo, rev)
        except FileNotFoundError:
            return self._json(404, {"error": "Invalid rev id"}, "RevisionNotFound")
        path = folder / file
        if not path.is_file():
            return self._json(404, {"error": "Entry not found"}, "EntryNotFound")
        content = path.read_bytes()
        headers = {
            "X-Repo-Commit": folder.name,
            "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, content, headers, head=head)

    def _url(self, repo_id: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{repo_id}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="where repositories and the request log go")
    parser.add_argument("--port-file", type=Path, required=True, help="the chosen port is written here")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    FakeHubHandler.root = args.root
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.rename(args.port_file)  # atomic: the test never reads a half-written port
    server.serve_forever()


if __name__ == "__main__":
    main()
