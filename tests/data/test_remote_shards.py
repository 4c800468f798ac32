"""Shards from anywhere webdataset reads (``align.data.remote``): http(s) URLs with brace patterns,
``pipe:`` commands and hub dataset repositories, read by the data modules, ``align data verify`` and
``align plan``, against a local HTTP server on 127.0.0.1 serving synthetic shards."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch

from align.cli import main
from align.data.commands import verify
from align.data.pickapic import PickAPicDataModule
from align.data.pipeline import expand_shards
from align.data.synthetic import write_synthetic_pickapic
from align.data.tars import iter_tar_samples, sha256_file

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/dpo/tiny.yaml")
SHARDS = "pairs-{000000..000003}.tar"
PER_SHARD = 8
# the server cuts this file off halfway, as a dropped connection would
CUT_OFF = "/broken/pairs-000001.tar"
HUB_REPO = "org/shapes"
HUB_FILES = [".gitattributes", "README.md", "data/manifest.json"] + [
    f"data/pairs-{i:06d}.tar" for i in range(4)
]
LOADER = dict(batch_size=2, resolution=16, num_workers=0, crop="center", flip_prob=0.0)


class ShardServer(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records every request; cuts ``CUT_OFF`` off after half its bytes."""

    requests: list[tuple[str, str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.requests.append(("HEAD", self.path))
        super().do_HEAD()

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path))
        if self.path != CUT_OFF:
            return super().do_GET()
        data = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


def write_manifest(folder: Path) -> None:
    """A manifest as the converters write it: samples, bytes and sha256 per shard."""
    shards = {
        tar.name: {
            "samples": sum(1 for _ in iter_tar_samples(str(tar))),
            "bytes": tar.stat().st_size,
            "sha256": sha256_file(tar),
        }
        for tar in sorted(folder.glob("*.tar"))
    }
    (folder / "manifest.json").write_text(
        json.dumps({"format": "align-shards/1", "shards": shards})
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(local folder of 4 pair shards, server base URL). The server's folders: ``plain/`` (no
    manifest), ``listed/`` (manifest), ``broken/`` (manifest; CUT_OFF is cut off), ``tampered/``
    (a manifest with a wrong sha256) and a hub repository's resolve paths."""
    root = tmp_path_factory.mktemp("served")
    local = root / "local"
    write_synthetic_pickapic(local, pairs=4 * PER_SHARD, shards=4, resolution=32, seed=1)
    hub = root / "site" / "datasets" / HUB_REPO / "resolve" / "main" / "data"
    for name in ("plain", "listed", "broken", "tampered"):
        shutil.copytree(local, root / "site" / name)
    shutil.copytree(local, hub)
    for folder in ("listed", "broken", "tampered"):
        write_manifest(root / "site" / folder)
    write_manifest(hub)
    tampered = json.loads((root / "site/tampered/manifest.json").read_text())
    tampered["shards"]["pairs-000002.tar"]["sha256"] = "0" * 64
    (root / "site/tampered/manifest.json").write_text(json.dumps(tampered))
    write_manifest(local)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(ShardServer, directory=str(root / "site"))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield local, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub(served, monkeypatch):
    """The hub as seen by ``huggingface_hub``: ``HUB_FILES`` listed, resolve URLs on the server
    (what HF_ENDPOINT pointing at a mirror gives)."""
    _, base = served
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        base + "/{repo_id}/resolve/{revision}/{filename}",
    )
    listed = {HUB_REPO: HUB_FILES}

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        assert repo_type == "dataset"
        if repo_id not in listed:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 Client Error: {repo_id}")
        return listed[repo_id]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    return listed


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def batches(datamodule) -> list[dict]:
    return list(datamodule.train_dataloader())


def skipped(loaded: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for batch in loaded:
        for reason, n in batch["skipped"].items():
            totals[reason] = totals.get(reason, 0) + n
    return totals


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [y["key"] for y in b]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))


def test_a_brace_url_streams_the_same_batches_as_the_local_folder(served, caplog):
    local, base = served
    from_disk = PickAPicDataModule(str(local), **LOADER)
    with caplog.at_level("WARNING", logger="align.data.epochs"):
        over_http = PickAPicDataModule(f"{base}/plain/{SHARDS}", **LOADER)
    assert over_http.train_urls == [f"{base}/plain/pairs-{i:06d}.tar" for i in range(4)]
    # no manifest there: counted by reading each shard once, and said so
    assert over_http.train_sizes == from_disk.train_sizes == [PER_SHARD] * 4
    assert "counting their samples by reading each through once" in caplog.text
    assert_same_batches(batches(from_disk), batches(over_http))


def test_the_manifest_is_read_over_http_and_no_shard_is_downloaded_at_start(served):
    local, base = served
    ShardServer.requests.clear()
    datamodule = PickAPicDataModule(f"{base}/listed/{SHARDS}", **LOADER)
    assert datamodule.train_sizes == [PER_SHARD] * 4
    gets = [path for method, path in ShardServer.requests if method == "GET"]
    assert gets == ["/listed/manifest.json"]  # and one HEAD per shard: they exist
    assert sorted(p for m, p in ShardServer.requests if m == "HEAD") == [
        f"/listed/pairs-{i:06d}.tar" for i in range(4)
    ]
    assert_same_batches(batches(PickAPicDataModule(str(local), **LOADER)), batches(datamodule))


def test_a_pipe_command_reads_the_shards_and_the_manifest_beside_them(served, caplog):
    local, _ = served
    with caplog.at_level("WARNING", logger="align.data.epochs"):
        piped = PickAPicDataModule(f"pipe:cat {local}/{SHARDS}", **LOADER)
    assert piped.train_sizes == [PER_SHARD] * 4
    assert "counting" not in caplog.text  # the sizes came from `cat <folder>/manifest.json`
    assert_same_batches(batches(PickAPicDataModule(str(local), **LOADER)), batches(piped))


def test_unreachable_or_missing_urls_fail_at_start_naming_them(served):
    _, base = served
    url = f"http://127.0.0.1:{closed_port()}/pairs-000000.tar"
    with pytest.raises(FileNotFoundError, match=f"{url}: cannot connect"):
        PickAPicDataModule(url, **LOADER)
    with pytest.raises(FileNotFoundError) as err:
        PickAPicDataModule(f"{base}/plain/pairs-{{000002..000005}}.tar", **LOADER)
    assert "2 of 4 shard(s)" in str(err.value) and "pairs-000004.tar: HTTP 404" in str(err.value)
    with pytest.raises(FileNotFoundError, match="'not-a-program' is not installed"):
        PickAPicDataModule("pipe:not-a-program s3://b/pairs-000000.tar", **LOADER)
    with pytest.raises(FileNotFoundError, match="'pipe:aws s3 cp s3://b/x.tar -'"):
        PickAPicDataModule("s3://b/x.tar", **LOADER)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_align_fit_names_an_unreachable_url_in_one_line_before_anything_runs(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/pairs-000000.tar"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", TINY, "--data.train_shards", url])
    assert url in str(done.value.code) and "cannot connect" in str(done.value.code)
    assert not (tmp_path / "logs").exists()


def test_a_shard_cut_off_mid_stream_is_skipped_and_counted(served):
    _, base = served
    datamodule = PickAPicDataModule(f"{base}/broken/{SHARDS}", **LOADER)
    assert datamodule.train_sizes == [PER_SHARD] * 4  # the manifest's: the cut shows in the run
    loaded = batches(datamodule)
    assert len(loaded) == 4 * PER_SHARD // 2  # a whole epoch, the other shards repeated to fill
    totals = skipped(loaded)
    assert totals.get("unreadable_shard", 0) >= 1 and totals.get("repeated_to_fill", 0) >= 1
    shards_read = {int(key) // PER_SHARD for batch in loaded for key in batch["key"]}
    assert shards_read >= {0, 2, 3}


def run_verify(*args: str) -> int:
    return verify.main([*args, "--no-progress", "--workers", "1"])


def test_verify_reads_urls_and_checks_them_against_their_manifest(served, capsys):
    local, base = served
    url = f"http://127.0.0.1:{closed_port()}/pairs-000000.tar"
    assert run_verify(f"{base}/listed/{SHARDS}") == 0
    assert "verified 4 shards ({'pair': 4}): 32 samples, 0 bad samples" in capsys.readouterr().out
    assert run_verify(f"pipe:cat {local}/pairs-000000.tar") == 0
    assert run_verify(f"{base}/tampered/{SHARDS}") == 1  # the sha256 is taken while streaming
    assert "pairs-000002.tar: 8 samples, 0 bad, problems {'checksum_mismatch': 1}" in (
        capsys.readouterr().out
    )
    assert run_verify(f"{base}/broken/{SHARDS}") == 1
    out = capsys.readouterr().out
    assert f"{base}{CUT_OFF}" in out and "corrupt_tar" in out
    assert run_verify(url) == 2
    assert f"{url}: cannot connect" in capsys.readouterr().err


def test_align_plan_reads_remote_manifests_and_downloads_no_shard(served, capsys):
    _, base = served
    args = ["--data.init_args.val_shards", "null", "--data.init_args.batches_per_epoch", "null"]
    ShardServer.requests.clear()
    for folder, expect in (
        ("listed", "32 pairs (from the shards)"),
        ("plain", "would download them (pass --num-samples)"),
    ):
        shards = f"{base}/{folder}/{SHARDS}"
        code = main(["plan", TINY, "--no-estimate", "--data.init_args.train_shards", shards, *args])
        assert code == 0 and expect in capsys.readouterr().out
    assert not [p for m, p in ShardServer.requests if m == "GET" and p.endswith(".tar")]


def test_a_hub_repository_expands_to_resolve_urls_and_trains_like_the_local_folder(served, hub):
    local, base = served
    resolve = f"{base}/datasets/{HUB_REPO}/resolve/main/data"
    urls = [f"{resolve}/pairs-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"hf://datasets/{HUB_REPO}") == urls  # README and manifest left out
    assert expand_shards(f"hf://datasets/{HUB_REPO}/data") == urls
    assert expand_shards(f"hf://datasets/{HUB_REPO}/data/pairs-00000[12].tar") == urls[1:3]
    assert expand_shards(f"hf://datasets/{HUB_REPO}/data/pairs-000003.tar") == urls[3:]
    ShardServer.requests.clear()
    datamodule = PickAPicDataModule(f"hf://datasets/{HUB_REPO}", **LOADER)
    # sizes from the repository's manifest; one HEAD checks access, no shard is fetched
    assert datamodule.train_sizes == [PER_SHARD] * 4
    assert [m for m, _ in ShardServer.requests] == ["HEAD", "GET"]
    assert_same_batches(batches(PickAPicDataModule(str(local), **LOADER)), batches(datamodule))


def test_a_hub_repository_without_tars_is_named_at_start(hub):
    hub["org/parquet-only"] = ["README.md", "data/train-00000-of-00002.parquet"]
    with pytest.raises(FileNotFoundError, match="'org/parquet-only' .* holds no .tar file"):
        PickAPicDataModule("hf://datasets/org/parquet-only", **LOADER)
    with pytest.raises(FileNotFoundError, match="no .tar file .* matches 'val'; its 4 .tar"):
        PickAPicDataModule(f"hf://datasets/{HUB_REPO}/val", **LOADER)
    with pytest.raises(FileNotFoundError, match="cannot list hub dataset repository 'org/typo'"):
        PickAPicDataModule("hf://datasets/org/typo", **LOADER)
    with pytest.raises(FileNotFoundError, match="hf://datasets/<org>/<repo>"):
        PickAPicDataModule("hf://org/shapes", **LOADER)
