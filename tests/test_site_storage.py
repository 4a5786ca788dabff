"""Product images: the checks and re-encoding, the local folder, and S3 (boto3 against moto)."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import pytest
from moto import mock_aws
from PIL import Image

from watchbuy.site.storage import ImageRejected, LocalStorage, S3Storage, prepare_image

# pytest resets warning filters per test; storage.py silences this one for the site itself
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def png(size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, "PNG")
    return out.getvalue()


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def test_prepare_image_accepts_images_and_refuses_the_rest():
    prepared = prepare_image(png(), 1 << 20)
    assert (prepared.ext, prepared.content_type, prepared.width, prepared.height) == \
        ("png", "image/png", 8, 8)
    with pytest.raises(ImageRejected, match="not an image"):
        prepare_image(b"<script>alert(1)</script>", 1 << 20)
    with pytest.raises(ImageRejected, match="larger than"):
        prepare_image(png(), 10)
    with pytest.raises(ImageRejected, match="not an image"):
        prepare_image(png()[:40], 1 << 20)  # truncated
    with pytest.raises(ImageRejected, match="Use a JPEG, PNG, WebP or GIF image."):
        prepare_image(encoded(Image.new("RGB", (4, 4)), "BMP"), 1 << 20)


@pytest.mark.parametrize("kind, ext, content_type", [
    ("JPEG", "jpg", "image/jpeg"), ("PNG", "png", "image/png"), ("WEBP", "webp", "image/webp"),
    ("GIF", "png", "image/png"),  # stored as a PNG of its first frame
])
def test_every_upload_is_re_encoded_with_its_own_type(kind, ext, content_type):
    original = encoded(Image.new("RGB", (16, 8), (10, 200, 30)), kind)
    # a polyglot: an image with a script appended, which a sniffing browser could run
    upload = original + b"<script>alert(document.cookie)</script>"
    prepared = prepare_image(upload, 1 << 20)
    assert (prepared.ext, prepared.content_type) == (ext, content_type)
    assert prepared.data != upload and b"<script>" not in prepared.data
    with Image.open(io.BytesIO(prepared.data)) as stored:
        assert stored.format == ext.upper().replace("JPG", "JPEG") and stored.size == (16, 8)


def test_exif_and_gps_are_stripped_and_the_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to show upright
    exif[0x010F] = "SpyCam"
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 7.0), 3: "E", 4: (13.0, 24.0, 0.0)}  # GPS
    upload = encoded(Image.new("RGB", (40, 20), (90, 90, 90)), "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(upload)) as original:  # the test image really has them
        assert original.getexif().get_ifd(0x8825)[2] == (52.0, 31.0, 7.0)
    prepared = prepare_image(upload, 1 << 20)
    with Image.open(io.BytesIO(prepared.data)) as stored:
        assert dict(stored.getexif()) == {} and "exif" not in stored.info
        assert stored.size == (20, 40)  # turned upright, as the orientation said
    assert b"SpyCam" not in prepared.data and b"Exif" not in prepared.data


def forged_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width × height pixels (its CRC made valid)."""
    data = bytearray(png())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("width, height", [(5001, 5000), (60_000, 60_000)])
def test_too_many_pixels_are_refused_before_decoding(width, height, caplog):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageRejected, match="too many pixels"):
        prepare_image(forged_png(width, height), 1 << 20, max_pixels=25_000_000)
    # never decoded: 60000² RGB would be 10 GB; the peak memory did not move by 100 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024
    assert any("refused an image upload" in r.getMessage() for r in caplog.records)


def test_a_real_image_with_too_many_pixels_is_refused():
    # one-bit pixels compress to almost nothing: 30 Mpx in a few kB
    big = encoded(Image.new("1", (6000, 5000)), "PNG")
    assert len(big) < 1 << 20
    with pytest.raises(ImageRejected, match="too many pixels"):
        prepare_image(big, 1 << 20, max_pixels=25_000_000)


def test_local_storage_writes_under_the_data_folder(tmp_path):
    storage = LocalStorage(tmp_path / "uploads")
    name = asyncio.run(storage.save(png(), "png", "image/png"))
    assert (tmp_path / "uploads" / name).read_bytes() == png()
    assert storage.url(name) == f"/uploads/{name}"


def test_s3_storage_puts_the_object_with_its_type(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="wb-images")
        storage = S3Storage("wb-images", "products/", "us-east-1")
        data = png()
        name = asyncio.run(storage.save(data, "png", "image/png"))
        assert name.startswith("products/") and name.endswith(".png")
        stored = storage.client.get_object(Bucket="wb-images", Key=name)
        assert stored["Body"].read() == data
        assert stored["ContentType"] == "image/png"
        assert storage.url(name) == f"https://wb-images.s3.amazonaws.com/{name}"
