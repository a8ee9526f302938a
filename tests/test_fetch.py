"""igd fetch and the cache fill behind it (issue 20.3): downloads served by a local HTTP server on 127.0.0.1 go
through the code path of real downloads; several processes filling one entry at once download it once and never
see or leave a partial file; offline, one line names what to place where."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from igd_cli.download import download, fill, torchvision_archive_fill
from igd_cli.errors import IgdError

REPO = Path(__file__).resolve().parents[1]
ZOO = "Addepalli2022Efficient_RN18"


class Server:
    """Serves ``files`` (path -> bytes) slowly, in chunks, counting GET requests; ``truncate`` sends only half of
    a file while announcing all of it (a connection that dies midway)."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0, truncate: bool = False):
        self.files, self.delay, self.truncate, self.gets = files, delay, truncate, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.gets.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                send = body[: len(body) // 2] if outer.truncate else body
                step = max(1, len(send) // 20)
                for i in range(0, len(send), step):
                    self.wfile.write(send[i:i + step])
                    self.wfile.flush()
                    time.sleep(outer.delay)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def start(*a, **k):
        made.append(Server(*a, **k))
        return made[-1]

    yield start
    for s in made:
        s.close()


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "IGD_NO_PROGRESS": "1", **extra}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_four_processes_fill_one_entry_once_and_never_see_it_partial(server, tmp_path):
    payload = os.urandom(3 << 20)
    srv = server({"/blob.bin": payload}, delay=0.05)  # about 1 s per download: the processes overlap
    dest = tmp_path / "cache" / "blob.bin"
    go = tmp_path / "go"
    code = ("import sys, time, pathlib; from igd_cli.download import download\n"
            "go = pathlib.Path(sys.argv[3])\n"
            "while not go.exists(): time.sleep(0.01)\n"
            "print(download(sys.argv[1], pathlib.Path(sys.argv[2]), sha256=sys.argv[4]))")
    sha = hashlib.sha256(payload).hexdigest()
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{srv.url}/blob.bin", str(dest), str(go), sha],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.0)  # let the four interpreters start
    go.touch()
    sizes = set()
    while any(p.poll() is None for p in procs):  # whoever looks sees no entry or the whole entry
        if dest.exists():
            sizes.add(dest.stat().st_size)
        time.sleep(0.005)
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["False", "False", "False", "True"]  # filled once
    assert srv.gets == ["/blob.bin"]  # downloaded once
    assert sizes <= {len(payload)}
    assert dest.read_bytes() == payload
    assert _leftovers(dest.parent) == []


def test_a_broken_or_wrong_download_leaves_nothing(server, tmp_path, monkeypatch):
    payload = b"x" * 100_000
    dest = tmp_path / "c" / "f.bin"
    cut = server({"/f.bin": payload}, truncate=True)
    with pytest.raises(IgdError, match=r"cannot download .*50000 of 100000 bytes received"):
        download(f"{cut.url}/f.bin", dest)
    assert not dest.exists() and _leftovers(dest.parent) == []
    ok = server({"/f.bin": payload})
    with pytest.raises(IgdError, match="sha256 is not 00ff.*nothing was written"):
        download(f"{ok.url}/f.bin", dest, sha256="00ff")
    assert not dest.exists() and _leftovers(dest.parent) == []
    with pytest.raises(IgdError, match="place f.bin in c/"):
        download(f"{ok.url}/missing.bin", dest, offline="place f.bin in c/")
    monkeypatch.setenv("IGD_OFFLINE", "1")
    with pytest.raises(IgdError, match="offline"):
        download(f"{ok.url}/f.bin", dest)
    assert ok.gets == ["/f.bin", "/missing.bin"]  # IGD_OFFLINE asks nothing
    monkeypatch.delenv("IGD_OFFLINE")
    assert download(f"{ok.url}/f.bin", dest, md5=hashlib.md5(payload).hexdigest()) is True
    assert download(f"{ok.url}/f.bin", dest) is False and dest.read_bytes() == payload
    # a file:// URL goes the same way
    src = tmp_path / "src.bin"
    src.write_bytes(payload[:10])
    assert download(src.as_uri(), tmp_path / "c" / "g.bin") is True
    assert (tmp_path / "c" / "g.bin").read_bytes() == payload[:10]


def test_a_process_killed_midway_leaves_only_a_temporary_that_the_next_fill_removes(tmp_path):
    dest = tmp_path / "entry"
    stale = tmp_path / ".entry.999999.partial"
    stale.write_bytes(b"half")  # what a killed process leaves
    assert fill(dest, lambda tmp: tmp.write_bytes(b"whole")) is True
    assert dest.read_bytes() == b"whole" and not stale.exists()

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise IgdError("interrupted")

    other = tmp_path / "other"
    with pytest.raises(IgdError):
        fill(other, boom)
    assert not other.exists() and _leftovers(tmp_path) == []


def _fake_cifar(tmp_path: Path):
    """A CIFAR-10-shaped archive (2 images per batch) and a torchvision-like class whose md5s are its own."""
    import numpy as np

    buf, md5s = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        for name in names:
            obj = ({"label_names": [f"c{i}" for i in range(10)]} if name == "batches.meta" else
                   {"data": np.full((2, 3072), len(name), np.uint8), "labels": [0, 1]})
            raw = pickle.dumps(obj)
            md5s[name] = hashlib.md5(raw).hexdigest()
            info = tarfile.TarInfo(f"fake-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    data = buf.getvalue()
    cls = SimpleNamespace(url="https://example.invalid/fake-cifar.tar.gz", base_folder="fake-batches-py",
                          tgz_md5=hashlib.md5(data).hexdigest(),
                          train_list=[[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)],
                          test_list=[["test_batch", md5s["test_batch"]]])
    return data, cls


def test_the_data_set_archive_is_downloaded_checked_and_extracted_atomically(server, tmp_path, monkeypatch):
    data, cls = _fake_cifar(tmp_path)
    srv = server({"/data/fake-cifar.tar.gz": data})
    monkeypatch.setenv("IGD_MIRROR", srv.url + "/")
    root = tmp_path / "data"
    assert torchvision_archive_fill(cls, root) is True
    assert sorted(p.name for p in (root / "fake-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    assert torchvision_archive_fill(cls, root) is False and srv.gets == ["/data/fake-cifar.tar.gz"]
    # a corrupt member (torchvision's md5 list disagrees) is refused: no folder appears
    bad = SimpleNamespace(**{**vars(cls), "base_folder": "fake-batches-py",
                             "test_list": [["test_batch", "0" * 32]]})
    root2 = tmp_path / "data2"
    root2.mkdir()
    (root2 / "fake-cifar.tar.gz").write_bytes(data)
    with pytest.raises(IgdError, match="test_batch is missing or corrupt"):
        torchvision_archive_fill(bad, root2)
    assert not (root2 / "fake-batches-py").exists() and _leftovers(root2) == []


def test_igd_fetch_offline_is_one_line_naming_what_to_place_where(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("IGD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IGD_OFFLINE", "1")
    monkeypatch.delenv("IGD_MIRROR", raising=False)
    r = cli("fetch", "--model", ZOO)
    ckpt = tmp_path / "home" / "models" / "cifar10" / "Linf" / f"{ZOO}.pt"
    assert r.code == 2 and r.err.strip() == (f"error: cannot download RobustBench model {ZOO} (offline?): place "
                                             f"its checkpoint at {ckpt}")
    r = cli("fetch", "--dataset", "cifar10", "--data-dir", tmp_path / "d")
    assert r.code == 2 and r.err.strip() == (f"error: --dataset cifar10: not in {tmp_path / 'd'} and cannot be "
                                             f"downloaded (offline?): place cifar-10-python.tar.gz (or its "
                                             f"extracted cifar-10-batches-py/) there or pass --data-dir")
    assert not (tmp_path / "d").exists() or _leftovers(tmp_path / "d") == []
    r = cli("fetch", "--json")  # the demo needs nothing
    assert r.code == 0 and r.json()["model"]["status"] == "embedded in igd"


def test_four_igd_fetch_processes_fill_the_zoo_checkpoint_once(server, tmp_path):
    """The command a login node runs, four times at once, against a mirror of the zoo checkpoint."""
    import torch

    from igd_cli._compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    net = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][ZOO]["model"]()
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    srv = server({f"/models/cifar10/Linf/{ZOO}.pt": buf.getvalue()}, delay=0.02)
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "igd_cli", "fetch", "--model", ZOO, "--dataset", "digits", "--mirror", srv.url,
           "--json"]
    procs = [subprocess.Popen(cmd, env=_env(IGD_HOME=str(home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    res = [json.loads(o[0]) for o in outs]
    ckpt = home / "models" / "cifar10" / "Linf" / f"{ZOO}.pt"
    assert sorted(r["model"]["status"] for r in res) == ["downloaded", *["present (verified by loading)"] * 3]
    assert srv.gets == [f"/models/cifar10/Linf/{ZOO}.pt"]  # once, whatever the others did
    assert {r["model"]["fingerprint"] for r in res} == {res[0]["model"]["fingerprint"]}
    assert ckpt.read_bytes() == buf.getvalue() and _leftovers(ckpt.parent) == []
    # a second fetch verifies what is there and downloads nothing
    again = subprocess.run(cmd, env=_env(IGD_HOME=str(home)), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout)["model"]["status"] == "present (verified by loading)"
    assert len(srv.gets) == 1
