import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from backend.images import ImageError, ImageFetcher
from tests.conftest import png_bytes


def _encode(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_data_uri_and_modes():
    fetcher = ImageFetcher()
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()
    assert np.array_equal(fetcher.fetch(uri), rgb)
    grey = fetcher.decode(_encode(Image.fromarray(rgb[..., 0])))
    assert grey.shape == (20, 30, 3) and np.array_equal(grey[..., 1], rgb[..., 0])
    deep = np.linspace(0, 65535, 20 * 30).astype(np.uint16).reshape(20, 30)
    decoded = fetcher.decode(_encode(Image.fromarray(deep)))
    assert decoded.dtype == np.uint8 and decoded.shape == (20, 30, 3) and decoded.max() == 255 and decoded.min() == 0
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (fetcher.decode(_encode(transparent)) == 255).all()  # composited on white


def test_exif_orientation_is_applied():
    image = Image.fromarray(np.zeros((10, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    decoded = ImageFetcher().decode(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.shape[:2] == (40, 10)


def test_broken_and_oversized_images_are_refused():
    fetcher = ImageFetcher(max_pixels=100 * 100, max_bytes=10_000)
    with pytest.raises(ImageError, match="not a readable image"):
        fetcher.decode(b"definitely not a png")
    with pytest.raises(ImageError, match="over the limit"):
        fetcher.decode(_encode(Image.new("L", (200, 200))))
    with pytest.raises(ImageError, match="over the limit"):
        fetcher.fetch("data:image/png;base64," + base64.b64encode(b"x" * 20_000).decode())


def test_label_studio_paths_use_the_token(file_server):
    image = np.full((5, 6, 3), 7, np.uint8)
    path = file_server.add("a.png", png_bytes(image))
    assert np.array_equal(ImageFetcher(file_server.url, "good-token").fetch(path), image)
    with pytest.raises(ImageError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
        ImageFetcher(file_server.url, "wrong-token").fetch(path)
    with pytest.raises(ImageError, match="HTTP 404"):
        ImageFetcher(file_server.url, "good-token").fetch("/data/upload/1/missing.png")
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        ImageFetcher().fetch(path)


def test_personal_access_tokens_are_exchanged_cached_and_refreshed(file_server):
    import jwt

    file_server.refresh_token = jwt.encode({"exp": int(time.time()) + 3600, "token_type": "refresh"},
                                           "test-signing-key-of-32-bytes-or-more")
    image = np.full((5, 6, 3), 9, np.uint8)
    path = file_server.add("pat.png", png_bytes(image))
    fetcher = ImageFetcher(file_server.url, file_server.refresh_token)
    assert np.array_equal(fetcher.fetch(path), image) and file_server.refreshes == 1
    assert np.array_equal(fetcher.fetch(path), image) and file_server.refreshes == 1  # the access token is kept
    file_server.accepted = set()  # Label Studio revoked it before its expiry: a 401, one refresh, a retry
    assert np.array_equal(fetcher.fetch(path), image) and file_server.refreshes == 2
    stranger = jwt.encode({"exp": int(time.time()) + 3600, "token_type": "refresh"}, "another-signing-key-32-bytes-long")
    with pytest.raises(ImageError, match="refused the personal access token"):
        ImageFetcher(file_server.url, stranger).fetch(path)


def test_untrusted_urls_to_private_addresses_are_refused(file_server):
    path = file_server.add("b.png", png_bytes(np.zeros((4, 4, 3), np.uint8)))
    fetcher = ImageFetcher("http://label-studio.invalid", "good-token")
    for url in (file_server.url + path, "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png"):
        with pytest.raises(ImageError, match="non-public address"):
            fetcher.fetch(url)
    assert file_server.requests == []  # nothing was sent
    allowed = ImageFetcher("", "", allowed_hosts=["127.0.0.1"])
    with pytest.raises(ImageError, match="HTTP 401"):  # reached, and no credentials leaked to it
        allowed.fetch(file_server.url + path)


def test_cloud_uris_resolve_through_label_studio():
    fetcher = ImageFetcher("http://ls.example:8080", "t")
    url, credentials = fetcher.resolve("s3://bucket/key.png", task_id=7)
    assert url.startswith("http://ls.example:8080/tasks/7/presign/?fileuri=") and credentials
    with pytest.raises(ImageError, match="unsupported"):
        fetcher.resolve("ftp://x/y.png")


@pytest.mark.parametrize("path, data", [
    ("/data/upload/3/a.png", True), ("/data/local-files/?d=x/a.png", True), ("/tasks/12/presign/", True),
    ("/projects/4/resolve/", True), ("/storage-data/uploaded/", True), ("/api/current-user/whoami", False),
    ("/data/upload/../../api/x", False), ("/data/upload/%2E%2E/api/x", False), ("/tasks/x/presign/", False),
    ("/user/login/", False),
])
def test_the_token_goes_to_label_studio_data_paths_alone(path, data):
    from backend.images import is_data_path

    assert is_data_path(path.split("?")[0]) is data


def test_relative_paths_outside_the_data_paths_are_refused_and_absolute_ones_get_no_token():
    fetcher = ImageFetcher("http://ls:8080", "secret")
    with pytest.raises(ImageError, match="not one of Label Studio's data paths"):
        fetcher.resolve("/api/current-user/whoami")
    assert fetcher.resolve("http://ls:8080/api/projects/")[1] is None
    assert fetcher.resolve("http://ls:8080/data/upload/1/a.png")[1] is fetcher.label_studio
    assert fetcher.resolve("http://elsewhere/data/upload/1/a.png")[1] is None
