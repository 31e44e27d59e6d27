"""``examples/get_data.py`` and the examples' data lookup (``examples/_data.py``).

Nothing leaves the machine: the preparation runs on small synthetic archives shaped like the
official ACDC and CHAOS releases, and the downloads come from an HTTP server on 127.0.0.1
(a thread of this process) that serves those files, cuts a transfer short, ignores ranges
or serves a corrupt file on request.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
h5py = pytest.importorskip("h5py")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _data  # noqa: E402
import get_data  # noqa: E402


# ----------------------------------------------------------------------------- fixtures: ACDC
def _nifti_gz(arr: np.ndarray, zooms=(1.5, 1.5, 10.0)) -> bytes:
    img = nib.Nifti1Image(arr, np.diag([*zooms, 1.0]))
    return gzip.compress(img.to_bytes())


def _acdc_volume(pid: int, frame: int, shape=(12, 10, 4)):
    """A synthetic frame: image x + 10 y + 100 z + 1000 * pid + frame, labels in bands."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = (x + 10 * y + 100 * z + 1000 * pid + frame).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:5] = 1
    label[5:8] = 2
    label[8:10] = 3 if frame == 1 else 2  # the ED frame (frame 1) has label 3, the ES frame none
    return image, label


def make_acdc(tmp: Path, patients=(1, 2, 3), drop=None, slices=4):
    """An ACDC-like zip (``database/training/patientXXX/...``) and split lists for it."""
    zpath = tmp / "acdc_release.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("database/MANDATORY_CITATION.md", "cite Bernard et al. 2018")
        for pid in patients:
            p = f"patient{pid:03d}"
            es = 12 if pid % 2 else 9
            zf.writestr(f"database/training/{p}/Info.cfg", f"ED: 1\nES: {es}\nGroup: NOR\nNbFrame: 30\n")
            zf.writestr(f"database/training/{p}/{p}_4d.nii.gz", b"not read")
            for frame in (1, es):
                image, label = _acdc_volume(pid, 1 if frame == 1 else 2, shape=(12, 10, slices))
                if drop != (pid, frame):
                    zf.writestr(f"database/training/{p}/{p}_frame{frame:02d}.nii.gz", _nifti_gz(image))
                zf.writestr(f"database/training/{p}/{p}_frame{frame:02d}_gt.nii.gz", _nifti_gz(label))
    splits = tmp / "splits"
    splits.mkdir(exist_ok=True)
    names = lambda pid: [f"patient{pid:03d}_frame01", f"patient{pid:03d}_frame02"]  # noqa: E731
    (splits / "train.list").write_text("\n".join(names(patients[0])) + "\n")
    (splits / "val.list").write_text("\n".join(names(patients[1])) + "\n")
    (splits / "test.list").write_text("\n".join(n for pid in patients[2:] for n in names(pid)) + "\n")
    (splits / "train_slices.list").write_text(
        "\n".join(f"{v}_slice_{z}" for v in names(patients[0]) for z in range(1, slices + 1)) + "\n")
    return zpath, splits


def test_prepare_acdc_writes_the_ssl4mis_layout(tmp_path):
    zpath, splits = make_acdc(tmp_path)
    out = tmp_path / "cache" / "data" / "ACDC"
    counts = get_data.prepare_acdc(zpath, out, splits_dir=splits, progress=False, log=lambda m: None)
    assert counts == {"patients": 3, "volumes": 6, "slices": 8}
    for name in get_data.ACDC_LISTS:
        assert (out / name).read_text() == (splits / name).read_text()
    files = sorted(p.name for p in (out / "data").iterdir())
    assert len(files) == 6 + 8 and "patient001_frame02_slice_4.h5" in files and "patient001_frame01_slice_0.h5" not in files
    with h5py.File(out / "data" / "patient002_frame01.h5", "r") as f:
        image, label = f["image"][()], f["label"][()]
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == label.shape == (4, 10, 12)  # (slices, H = Y, W = X)
    assert image.min() == 0.0 and image.max() == 1.0
    ref, ref_label = _acdc_volume(2, 1, (12, 10, 4))
    ref = ref.transpose(2, 1, 0).astype(np.float32)
    np.testing.assert_allclose(image, (ref - ref.min()) / (ref.max() - ref.min()), rtol=1e-6)
    np.testing.assert_array_equal(label, ref_label.transpose(2, 1, 0))
    # frame01 = ED (Info.cfg ED: 1), frame02 = ES (frame 09 or 12): only ED has label 3
    with h5py.File(out / "data" / "patient002_frame02.h5", "r") as f:
        assert 3 not in f["label"][()]
    assert 3 in label
    # a training slice is the volume's slice, numbered from 1, normalised with the volume
    with h5py.File(out / "data" / "patient001_frame01.h5", "r") as f:
        vol = f["image"][()]
    with h5py.File(out / "data" / "patient001_frame01_slice_3.h5", "r") as f:
        assert f["image"].shape == (10, 12)
        np.testing.assert_array_equal(f["image"][()], vol[2])
    assert not (tmp_path / "cache" / "data" / "ACDC.partial").exists()


def test_prepared_acdc_reads_with_the_examples_reader(tmp_path):
    pytest.importorskip("torch")
    import acdc_data

    zpath, splits = make_acdc(tmp_path)
    get_data.prepare_acdc(zpath, tmp_path / "root" / "ACDC", splits_dir=splits, progress=False, log=lambda m: None)
    acdc = acdc_data.find_acdc_dir(tmp_path / "root")
    cases = acdc_data.read_list(acdc, "train_slices.list")
    image, label = acdc_data.read_case(acdc / "data" / f"{cases[0]}.h5", ndim=2)
    assert image.shape == label.shape == (10, 12)
    for name in ("val.list", "test.list"):
        for case in acdc_data.read_list(acdc, name):
            acdc_data.read_case(acdc / "data" / f"{case}.h5", ndim=3)


def test_prepare_acdc_rejects_an_incomplete_release(tmp_path):
    zpath, splits = make_acdc(tmp_path, drop=(3, 12))
    out = tmp_path / "out" / "ACDC"
    with pytest.raises(get_data.ArchiveError, match="patient003 frame 12"):
        get_data.prepare_acdc(zpath, out, splits_dir=splits, progress=False, log=lambda m: None)
    assert not out.exists() and not (tmp_path / "out" / "ACDC.partial").exists()
    (splits / "val.list").write_text("patient007_frame01\n")
    with pytest.raises(get_data.ArchiveError, match="not the official ACDC release.*patient007"):
        get_data.prepare_acdc(zpath, out, splits_dir=splits, progress=False, log=lambda m: None)
    # slices named by the list that the volumes do not have
    zpath, splits = make_acdc(tmp_path / "", slices=3)
    (splits / "train_slices.list").write_text("patient001_frame01_slice_9\n")
    with pytest.raises(get_data.ArchiveError, match="slice_9"):
        get_data.prepare_acdc(zpath, out, splits_dir=splits, progress=False, log=lambda m: None)
    assert not out.exists()
    with pytest.raises(get_data.ArchiveError, match="neither a zip archive nor a folder"):
        get_data.prepare_acdc(splits / "val.list", out, splits_dir=splits, progress=False, log=lambda m: None)


def test_prepare_acdc_from_an_unpacked_folder(tmp_path):
    zpath, splits = make_acdc(tmp_path)
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(tmp_path / "unpacked")
    counts = get_data.prepare_acdc(tmp_path / "unpacked", tmp_path / "out" / "ACDC", splits_dir=splits,
                                   progress=False, log=lambda m: None)
    assert counts["volumes"] == 6


def test_shipped_acdc_lists_are_the_standard_split():
    lists = get_data.read_lists(EXAMPLES / "splits" / "acdc")
    assert [len(lists[n]) for n in get_data.ACDC_LISTS] == [1312, 140, 20, 40]
    patients = lambda names: {n.split("_")[0] for n in names}  # noqa: E731
    train, val, test = (patients(lists[n]) for n in ("train.list", "val.list", "test.list"))
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert not (train & val or train & test or val & test)
    assert patients(lists["train_slices.list"]) == train
    assert patients(lists["train_slices.list"][:68]) and len(patients(lists["train_slices.list"][:68])) == 3
    assert len(patients(lists["train_slices.list"][:136])) == 7


# ----------------------------------------------------------------------------- fixtures: CHAOS
def _dicom(pixels: np.ndarray, position, instance: int, spacing=(1.5, 1.6), thickness=6.0) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_chaos(tmp: Path, ids=("1", "2"), rows=20, cols=24, n=4, drop_png=False) -> Path:
    """A CHAOS-like ``CHAOS_Train_Sets.zip``: ``Train_Sets/MR/<id>/T2SPIR/{DICOM_anon,Ground}``.

    In each slice the liver (63) fills the first 5 columns (patient right), the spleen (252)
    the first 4 rows (anterior, rows run posterior), and the right kidney (126) the whole
    most superior slice's centre; the files are written from superior to inferior.
    """
    zpath = tmp / "CHAOS_Train_Sets.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for cid in ids:
            base = f"Train_Sets/MR/{cid}/T2SPIR"
            for k in range(n):  # file k lies at z = -6 k: the first file is the most superior
                pixels = np.full((rows, cols), 100 + 10 * k, np.uint16)
                pixels[0, 0] = 1000
                gt = np.zeros((rows, cols), np.uint8)
                gt[:, :5] = 63
                gt[:4, 5:] = 252
                if k == 0:
                    gt[8:12, 10:14] = 126
                stem = f"IMG-0002-{k + 1:05d}"
                zf.writestr(f"{base}/DICOM_anon/{stem}.dcm", _dicom(pixels, (-20.0, -30.0, -6.0 * k), k + 1))
                if not (drop_png and k == 2):
                    zf.writestr(f"{base}/Ground/{stem}.png", _png(gt))
            zf.writestr(f"Train_Sets/MR/{cid}/T1DUAL/DICOM_anon/InPhase/IMG-0004-00001.dcm", b"not read")
        zf.writestr("Train_Sets/CT/1/DICOM_anon/i0000,0000b.dcm", b"not read")
    return zpath


def test_prepare_chaos_native_geometry_and_orientation(tmp_path):
    pytest.importorskip("pydicom")
    zpath = make_chaos(tmp_path)
    out = tmp_path / "data" / "CHAOS-T2"
    counts = get_data.prepare_chaos(zpath, out, ids=("1", "2"), resample=False, progress=False, log=lambda m: None)
    assert counts == {"volumes": 2, "slices": 8}
    img, lab = nib.load(str(out / "image_1.nii.gz")), nib.load(str(out / "label_1.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S") and np.allclose(img.affine, lab.affine)
    assert img.shape == lab.shape == (24, 20, 4)  # (columns, rows, slices)
    assert np.allclose(img.header.get_zooms(), (1.6, 1.5, 6.0))
    image, label = np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2, 4}
    assert (label[:5] == 1).all()  # liver: patient right = low i under "L"
    assert (label[5:, -4:] == 4).all()  # spleen: anterior = high j under "A"
    assert (label[..., -1] == 2).any() and not (label[..., :-1] == 2).any()  # kidney on the top slice: last k
    np.testing.assert_array_equal(image[5, 5, :], [130, 120, 110, 100])  # inferior to superior
    assert image[0, -1, -1] == 1000  # pixel (row 0, col 0) of the top slice: right, anterior, superior


def test_prepare_chaos_resampled_reads_with_the_examples_reader(tmp_path):
    pytest.importorskip("pydicom")
    pytest.importorskip("scipy")
    import synapse_data as sd

    zpath = make_chaos(tmp_path, ids=("5",))
    root = tmp_path / "data" / "CHAOS-T2"
    get_data.prepare_chaos(zpath, root, ids=("5",), progress=False, log=lambda m: None)
    img = nib.load(str(root / "image_5.nii.gz"))
    assert img.shape[:2] == (256, 256) and np.allclose(img.header.get_zooms(), (1.25, 1.25, 7.7))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    vol = sd.read_generic_case(root, "5")
    assert vol.image.shape == vol.label.shape and vol.image.shape[1:] == (256, 256)
    assert set(np.unique(vol.label).tolist()) == {0, 1, 2, 4}


def test_prepare_chaos_rejects_an_incomplete_release(tmp_path):
    pytest.importorskip("pydicom")
    zpath = make_chaos(tmp_path, ids=("1",), drop_png=True)
    with pytest.raises(get_data.ArchiveError, match="no ground-truth PNG"):
        get_data.prepare_chaos(zpath, tmp_path / "o", ids=("1",), resample=False, progress=False, log=lambda m: None)
    with pytest.raises(get_data.ArchiveError, match=r"MR case\(s\) \['2'\] missing"):
        get_data.prepare_chaos(zpath, tmp_path / "o", ids=("1", "2"), progress=False, log=lambda m: None)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- local HTTP server
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        srv.log.append((path, rng))
        if path not in srv.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files[path]
        start = 0
        if rng and path not in srv.no_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = srv.cut.pop(path, None)  # cut this transfer short once, after `cut` bytes
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.log, srv.cut, srv.no_range = {}, [], {}, set()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def _get(server, dest, **kw):
    kw.setdefault("md5", PAYLOAD_MD5)
    kw.setdefault("size", len(PAYLOAD))
    return get_data.download(f"{server.url}/f.zip?download=1", dest, progress=False, timeout=10, chunk=65536,
                             log=lambda m: None, **kw)


def test_download_verifies_and_skips_a_verified_file(server, tmp_path):
    server.files["/f.zip"] = PAYLOAD
    dest = _get(server, tmp_path / "dl" / "f.zip")
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "dl" / "f.zip.part").exists()
    assert server.log == [("/f.zip", None)]
    _get(server, dest)
    assert len(server.log) == 1  # already there and verified: no request


def test_download_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    server.files["/f.zip"] = PAYLOAD
    dest = tmp_path / "f.zip"
    (tmp_path / "f.zip.part").write_bytes(PAYLOAD[:123_456])
    _get(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/f.zip", "bytes=123456-")]


def test_download_resumes_after_the_connection_drops(server, tmp_path):
    server.files["/f.zip"] = PAYLOAD
    server.cut["/f.zip"] = 100_000
    dest = _get(server, tmp_path / "f.zip")
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/f.zip", None), ("/f.zip", "bytes=100000-")]


def test_download_starts_over_when_the_server_ignores_ranges(server, tmp_path):
    server.files["/f.zip"] = PAYLOAD
    server.no_range.add("/f.zip")
    (tmp_path / "f.zip.part").write_bytes(b"x" * 5000)  # stale bytes that must not survive
    dest = _get(server, tmp_path / "f.zip")
    assert dest.read_bytes() == PAYLOAD


def test_download_complete_part_file_is_verified_not_refetched(server, tmp_path):
    server.files["/f.zip"] = PAYLOAD
    (tmp_path / "f.zip.part").write_bytes(PAYLOAD)
    dest = _get(server, tmp_path / "f.zip")  # the server answers 416 to bytes=300000-
    assert dest.read_bytes() == PAYLOAD and server.log == [("/f.zip", "bytes=300000-")]


def test_download_rejects_a_corrupt_file_and_deletes_it(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[1000] ^= 0xFF
    server.files["/f.zip"] = bytes(corrupt)
    with pytest.raises(get_data.DownloadError, match="does not match the published"):
        _get(server, tmp_path / "f.zip")
    assert not (tmp_path / "f.zip").exists() and not (tmp_path / "f.zip.part").exists()
    server.files["/f.zip"] = PAYLOAD[:-10]
    with pytest.raises(get_data.DownloadError, match="expected 300000"):
        _get(server, tmp_path / "f.zip")
    # a corrupt file already in place is caught too
    (tmp_path / "g.zip").write_bytes(bytes(corrupt))
    with pytest.raises(get_data.DownloadError, match="MD5"):
        _get(server, tmp_path / "g.zip")


def test_download_missing_file_fails_at_once(server, tmp_path):
    with pytest.raises(get_data.DownloadError, match="HTTP 404"):
        get_data.download(f"{server.url}/nothing.zip", tmp_path / "n.zip", progress=False, timeout=10,
                          log=lambda m: None)
    assert server.log == [("/nothing.zip", None)]


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: the connection is refused, as offline."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_download_unreachable_fails_at_once_without_retries(tmp_path):
    import time

    logs = []
    t = time.monotonic()
    with pytest.raises(get_data.UnreachableError, match="cannot reach 127.0.0.1.*ConnectionRefusedError"):
        get_data.download(f"{_closed_port_url()}/f.zip", tmp_path / "f.zip", progress=False, log=logs.append)
    assert time.monotonic() - t < 5 and not any("retrying" in m for m in logs)
    assert not (tmp_path / "f.zip.part").exists()


def test_download_broken_transfer_says_what_it_kept(server, tmp_path, monkeypatch):
    """Retries only a transfer that broke off; the message names the part file only if it exists."""
    monkeypatch.setattr(get_data.time, "sleep", lambda s: None)
    server.files["/f.zip"] = PAYLOAD
    server.cut["/f.zip"] = 1000
    with pytest.raises(get_data.DownloadError, match=r"after 0 retries; 1000 bytes kept in .*f\.zip\.part"):
        _get(server, tmp_path / "f.zip", retries=0)
    assert (tmp_path / "f.zip.part").stat().st_size == 1000
    (tmp_path / "f.zip.part").unlink()
    server.files["/f.zip"] = PAYLOAD
    server.cut["/f.zip"] = 0
    with pytest.raises(get_data.DownloadError, match="nothing was kept") as e:
        _get(server, tmp_path / "f.zip", retries=0)
    assert ".part" not in str(e.value) and not (tmp_path / "f.zip.part").exists()


@pytest.mark.parametrize("dataset", ["acdc", "chaos"])
def test_get_data_offline_exits_fast_naming_the_manual_route(tmp_path, dataset):
    """``get_data.py`` with no network: one line, well within 15 s, naming ``--archive`` and
    the page to download from by hand, and no partial file."""
    import os
    import subprocess
    import time

    env = dict(os.environ, TORCH_DACL_CACHE=str(tmp_path / "cache"), TORCH_DACL_MIRROR=_closed_port_url())
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(EXAMPLES / "get_data.py"), dataset, "--no-progress"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert time.monotonic() - t < 15
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip()
    assert err.startswith("error: cannot reach") and len(err.splitlines()) == 1, err
    assert f"get_data.py {dataset} --archive FILE" in err and get_data.SOURCES[dataset].page.split()[0] in err
    assert "retrying" not in r.stdout and ".part" not in err
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_get_data_command_downloads_verifies_and_prepares_from_a_mirror(server, tmp_path, monkeypatch, capsys):
    pytest.importorskip("pydicom")
    zpath = make_chaos(tmp_path, ids=("1",))
    blob = zpath.read_bytes()
    server.files["/CHAOS_Train_Sets.zip"] = blob
    server.cut["/CHAOS_Train_Sets.zip"] = len(blob) // 3
    pinned = get_data.Source(url="https://example.invalid/never-used", filename="CHAOS_Train_Sets.zip",
                             md5=hashlib.md5(blob).hexdigest(), size=len(blob), provenance="test fixture",
                             page="https://example.invalid/page", what="a test archive")
    monkeypatch.setitem(get_data.SOURCES, "chaos", pinned)
    monkeypatch.setattr(get_data, "CHAOS_MR_IDS", ("1",))
    cache = tmp_path / "cache"
    out = get_data.main(["chaos", "--cache", str(cache), "--url", f"{server.url}/CHAOS_Train_Sets.zip",
                         "--no-progress", "--native"])
    assert out == cache / "data" / "CHAOS-T2"
    assert (out / "image_1.nii.gz").is_file() and (out / "label_1.nii.gz").is_file()
    assert [r for _, r in server.log] == [None, f"bytes={len(blob) // 3}-"]  # resumed after the cut
    assert (cache / "downloads" / "CHAOS_Train_Sets.zip").read_bytes() == blob
    # the examples find it through the cache
    monkeypatch.delenv("TORCH_DACL_DATA", raising=False)
    monkeypatch.setenv("TORCH_DACL_CACHE", str(cache))
    assert _data.resolve_data_root(None, "chaos") == cache / "data"
    # a second run does nothing
    get_data.main(["chaos", "--cache", str(cache), "--no-progress"])
    assert "nothing to do" in capsys.readouterr().out
    assert len(server.log) == 2


def test_get_data_acdc_from_a_local_archive(tmp_path, monkeypatch):
    zpath, splits = make_acdc(tmp_path)
    monkeypatch.setattr(get_data, "SPLITS_DIR", tmp_path)
    (tmp_path / "acdc").mkdir()
    for name in get_data.ACDC_LISTS:
        (tmp_path / "acdc" / name).write_text((splits / name).read_text())
    out = get_data.main(["acdc", "--cache", str(tmp_path / "c"), "--archive", str(zpath), "--no-progress"])
    assert (out / "train_slices.list").is_file() and len(list((out / "data").iterdir())) == 14


# ----------------------------------------------------------------------------- the lookup
def test_data_root_lookup_order(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_DACL_CACHE", str(cache))
    monkeypatch.delenv("TORCH_DACL_DATA", raising=False)
    # nothing anywhere: the error names the command and where it looked
    with pytest.raises(_data.DataNotFoundError, match=r"python examples/get_data\.py acdc") as e:
        _data.resolve_data_root(None, "acdc")
    assert str(cache / "data") in str(e.value) and "TORCH_DACL_DATA not set" in str(e.value)
    # the cache, where get_data.py puts it
    (cache / "data" / "ACDC").mkdir(parents=True)
    assert _data.resolve_data_root(None, "acdc") == cache / "data"
    with pytest.raises(_data.DataNotFoundError, match=r"get_data\.py chaos"):
        _data.resolve_data_root(None, "chaos")
    # the environment variable before the cache, the argument before everything, as given
    monkeypatch.setenv("TORCH_DACL_DATA", str(tmp_path / "env"))
    assert _data.resolve_data_root(None, "acdc") == tmp_path / "env"
    assert _data.resolve_data_root(str(tmp_path / "arg"), "acdc") == tmp_path / "arg"
    assert [w for w, _ in _data.data_sources("x")] == ["--data-root", "$TORCH_DACL_DATA", "cache"]


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_DACL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _data.cache_dir() == tmp_path / "xdg" / "torch-dacl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _data.cache_dir() == Path.home() / ".cache" / "torch-dacl"


# ----------------------------------------------------------------------------- end to end
def make_acdc_release_for_the_shipped_split(tmp: Path) -> Path:
    """A synthetic release with every patient of the shipped split (small frames whose slice
    counts match ``train_slices.list``), annulus-shaped labels the smoke preset can read."""
    lists = get_data.read_lists(EXAMPLES / "splits" / "acdc")
    n_slices: dict = {}
    for name in lists["train_slices.list"]:
        vol, z = name.rsplit("_slice_", 1)
        n_slices[vol] = max(n_slices.get(vol, 0), int(z))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:36, :40]
    zpath = tmp / "acdc_full.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        for pid in sorted({n.split("_")[0] for n in lists["train.list"] + lists["val.list"] + lists["test.list"]}):
            zf.writestr(f"database/training/{pid}/Info.cfg", "ED: 1\nES: 10\n")
            for tag, frame in (("frame01", 1), ("frame02", 10)):
                z = n_slices.get(f"{pid}_{tag}", 5)
                label = np.zeros((z, 36, 40), np.uint8)
                for k in range(z):
                    c = (18 + rng.integers(-3, 4), 20 + rng.integers(-3, 4))
                    r2 = (yy - c[0]) ** 2 + (xx - c[1]) ** 2
                    label[k][r2 <= 100], label[k][r2 <= 49], label[k][r2 <= 16] = 1, 2, 3
                image = (label * 80 + rng.integers(0, 40, label.shape)).astype(np.int16)
                for suffix, arr in (("", image), ("_gt", label)):
                    zf.writestr(f"database/training/{pid}/{pid}_frame{frame:02d}{suffix}.nii.gz",
                                _nifti_gz(np.ascontiguousarray(arr.transpose(2, 1, 0))))
    return zpath


@pytest.mark.slow
def test_main_command_downloads_prepares_and_trains_in_one_go(server, tmp_path):
    """The README's main command on a machine with no data anywhere: it says what it fetches,
    how large it is and where it goes, downloads it (here from a local mirror, through
    ``$TORCH_DACL_MIRROR``), prepares it into the cache and trains; ``evaluate_acdc.py`` then
    finds the data where the run read them (its config), with no --data-root."""
    import json
    import os
    import subprocess

    pytest.importorskip("segmentation_models_pytorch")
    pytest.importorskip("medpy")
    zpath = make_acdc_release_for_the_shipped_split(tmp_path)
    server.files["/ACDC.zip"] = zpath.read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DACL_DATA"}
    env.update(TORCH_DACL_CACHE=str(tmp_path / "cache"), TORCH_DACL_MIRROR=server.url, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(EXAMPLES / "acdc_cps_dacl.py"), "--preset", "smoke", "--no-plot",
                        "--threads", "1", "--output-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "no ACDC data found" in out and "--no-download refuses" in out
    assert f"from  {server.url}/ACDC.zip" in out and "size  not published" in out
    assert f"into  {tmp_path / 'cache' / 'downloads' / 'ACDC.zip'}" in out and "1312 training slices" in out
    assert [p for p, _ in server.log] == ["/ACDC.zip"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["acdc_dir"] == str(tmp_path / "cache" / "data" / "ACDC")
    assert (tmp_path / "run" / "metrics.json").is_file()
    env.pop("TORCH_DACL_CACHE")  # the evaluation reads the run's data location from its config
    r = subprocess.run([sys.executable, str(EXAMPLES / "evaluate_acdc.py"), str(tmp_path / "run" / "best.pt"),
                        "--limit", "1", "--output", str(tmp_path / "eval.json")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["num_cases"] == 1


@pytest.mark.parametrize("mode", ["no-download", "offline"])
def test_examples_without_data_name_the_command(tmp_path, mode):
    """In a checkout with an empty cache, both examples stop with one line and no traceback:
    ``--no-download`` names the command that gets the data; offline, the automatic download
    fails at once and names ``get_data.py --archive``."""
    import os
    import shutil
    import subprocess
    import time

    repo = tmp_path / "clone"
    shutil.copytree(EXAMPLES, repo / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DACL_DATA"}
    env.update(TORCH_DACL_CACHE=str(tmp_path / "empty-cache"), TORCH_DACL_MIRROR=_closed_port_url(),
               PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent), env.get("PYTHONPATH", "")]))
    for script, dataset in (("acdc_cps_dacl.py", "acdc"), ("synapse_cps_dacl.py", "chaos")):
        t = time.monotonic()
        r = subprocess.run([sys.executable, str(repo / "examples" / script), "--preset", "smoke",
                            "--output-dir", str(tmp_path / "run"), *(["--no-download"] if mode == "no-download" else [])],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        err = r.stderr.strip().splitlines()[-1]
        if mode == "no-download":
            assert f"python examples/get_data.py {dataset}" in err, r.stderr[-3000:]
        else:
            assert err.startswith("error: cannot reach") and f"get_data.py {dataset} --archive FILE" in err, err
            assert time.monotonic() - t < 60  # (the import of torch and the examples' packages counts)
