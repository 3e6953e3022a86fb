"""Fetching task images safely: Label Studio uploads, local files, cloud storage, http(s), data URIs.

The ``/predict`` payload is untrusted, so a URL is fetched only if it is Label Studio's
own host, an allow-listed host, or a host whose addresses are all public. Credentials
are sent to Label Studio alone. Sizes are bounded before decoding.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import logging
import re
import socket
import time
import warnings
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from backend.labelstudio import LabelStudioClient, LabelStudioError

log = logging.getLogger(__name__)
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")


class ImageError(Exception):
    """A task's image could not be used; the message says why (shown to the user)."""


def _describe(error: Exception) -> str:
    """An exception as words, without the memory addresses that requests/urllib3 messages carry."""
    return f"{error.__class__.__name__}: " + re.sub(r" object at 0x[0-9a-fA-F]+", "", str(error))


def _sniff(data: bytes) -> str:
    """What a byte string looks like, for error messages: its size and first bytes."""
    return f"{len(data)} bytes starting {data[:8]!r}"


class ImageFetcher:
    """Loads a task's image as an RGB uint8 array (H, W, 3).

    Args:
        label_studio_url: where relative paths (``/data/upload/...``) live.
        api_key: Label Studio token (legacy or personal access token).
        allowed_hosts: hosts that may be fetched even if they resolve to private addresses.
        max_bytes: largest download accepted.
        max_pixels: largest decoded image accepted (decompression bombs).
        timeout: seconds for connecting and for each read.
        deadline: seconds for a whole download, however the server paces it.
    """

    def __init__(self, label_studio_url: str = "", api_key: str = "", allowed_hosts=(),
                 max_bytes: int = 50 * 2**20, max_pixels: int = 64 * 2**20, timeout: float = 10.0,
                 deadline: float = 60.0):
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout = timeout
        self.deadline = deadline
        self.allowed_hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.session = requests.Session()
        self.label_studio: LabelStudioClient | None = None
        self.configure(label_studio_url, api_key)

    @classmethod
    def from_settings(cls, settings) -> "ImageFetcher":
        """The fetcher the settings describe; the API key goes to ``LABEL_STUDIO_URL`` alone."""
        return cls(settings.label_studio_url, settings.label_studio_api_key if settings.label_studio_url else "",
                   settings.allowed_image_hosts, settings.max_image_bytes, settings.max_image_pixels,
                   settings.fetch_timeout, settings.fetch_deadline)

    def configure(self, label_studio_url: str, api_key: str) -> None:
        """Point at a Label Studio instance; ``api_key`` is sent to that host and no other.

        Raises:
            LabelStudioError: ``api_key`` is an expired personal access token.
        """
        label_studio_url = (label_studio_url or "").rstrip("/")
        current = self.label_studio
        if current is not None and (current.url, current.token) == (label_studio_url, api_key or ""):
            return  # Label Studio repeats /setup often: keep the client and its cached access token
        self.label_studio_url = label_studio_url
        self.label_studio = LabelStudioClient(self.label_studio_url, api_key or "", self.timeout) \
            if self.label_studio_url else None

    def _credentials(self, refresh: bool = False) -> dict[str, str]:
        if self.label_studio is None:
            return {}
        try:
            return self.label_studio.auth_header(refresh)
        except LabelStudioError as error:
            raise ImageError(str(error)) from None

    # ------------------------------------------------------------------ URL resolution
    def _label_studio_host(self) -> str | None:
        return urlsplit(self.label_studio_url).netloc.lower() or None

    def resolve(self, uri: str, task_id=None) -> tuple[str, bool]:
        """The absolute URL to download and whether it is Label Studio's (gets credentials)."""
        if not isinstance(uri, str) or not uri:
            raise ImageError("the task has no image URL in the field the label config names")
        scheme = urlsplit(uri).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if task_id is None or not self.label_studio_url:
                raise ImageError(f"{scheme}:// images need LABEL_STUDIO_URL and a task id to be resolved")
            encoded = base64.urlsafe_b64encode(uri.encode()).decode()
            return f"{self.label_studio_url}/tasks/{task_id}/presign/?fileuri={quote(encoded)}", True
        if scheme in ("http", "https"):
            return uri, urlsplit(uri).netloc.lower() == self._label_studio_host()
        if uri.startswith("/"):
            if not self.label_studio_url:
                raise ImageError(
                    f"{uri} is a Label Studio path but the backend doesn't know Label Studio's URL: "
                    "set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)")
            return urljoin(self.label_studio_url + "/", uri.lstrip("/")), True
        raise ImageError(f"unsupported image reference {uri[:80]!r}")

    def is_allowed_host(self, url: str) -> bool:
        """Whether ``url``'s host (or host:port) is in ALLOWED_IMAGE_HOSTS."""
        parts = urlsplit(url)
        return (parts.hostname or "").lower() in self.allowed_hosts or parts.netloc.lower() in self.allowed_hosts

    def _check_host(self, url: str) -> None:
        host = (urlsplit(url).hostname or "").lower()
        if urlsplit(url).netloc.lower() == self._label_studio_host() or self.is_allowed_host(url):
            return
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except socket.gaierror as error:
            raise ImageError(f"can't resolve image host {host!r}: {error}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global:
                raise ImageError(
                    f"refusing to fetch {host!r}: it resolves to the non-public address {ip} "
                    "(add the host to ALLOWED_IMAGE_HOSTS if it is trusted)")

    # ------------------------------------------------------------------ download + decode
    def _download(self, url: str, with_credentials: bool) -> bytes:
        started = time.monotonic()
        for _ in range(5):  # redirects are followed by hand so each hop is checked
            self._check_host(url)
            headers = self._credentials() if with_credentials else {}
            try:
                response = self.session.get(url, headers=headers, timeout=self.timeout, stream=True,
                                            allow_redirects=False)
                if response.status_code == 401 and with_credentials and self.label_studio.uses_access_tokens:
                    response = self.session.get(url, headers=self._credentials(refresh=True),
                                                timeout=self.timeout, stream=True, allow_redirects=False)
            except requests.RequestException as error:
                raise ImageError(f"can't download {url}: {_describe(error)}") from None
            if response.is_redirect:
                next_url = urljoin(url, response.headers["Location"])
                with_credentials = with_credentials and urlsplit(next_url).netloc == urlsplit(url).netloc
                url = next_url
                continue
            if response.status_code != 200:
                hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
                raise ImageError(f"downloading {url} answered HTTP {response.status_code}{hint}")
            with response:
                return self._read_body(response, url, started)
        raise ImageError(f"too many redirects fetching {url}")

    def _read_body(self, response: requests.Response, url: str, started: float) -> bytes:
        """The body, within ``max_bytes`` and the download deadline however slowly the server sends it."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(f"image at {url} is {declared} bytes, over the limit of {self.max_bytes}")
        data = bytearray()
        while True:
            if time.monotonic() - started > self.deadline:
                raise ImageError(f"downloading {url} took over {self.deadline:g} s (FETCH_DEADLINE); "
                                 f"{len(data)} bytes had arrived")
            try:
                # read1 returns what one read brings, so the deadline is checked between reads.
                chunk = response.raw.read1(1 << 16, decode_content=True)
            except Exception as error:
                raise ImageError(f"can't download {url}: {error.__class__.__name__}") from None
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > self.max_bytes:
                raise ImageError(f"image at {url} is over the limit of {self.max_bytes} bytes")

    def decode(self, data: bytes) -> np.ndarray:
        """Bytes → RGB uint8 (H, W, 3): EXIF orientation applied, grey/alpha/16-bit handled."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if image.width * image.height > self.max_pixels:
                    raise ImageError(f"image is {image.width}x{image.height} pixels, over the limit of "
                                     f"{self.max_pixels} (MAX_IMAGE_PIXELS)")
                image = ImageOps.exif_transpose(image)
                image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image refused as a decompression bomb (over {self.max_pixels} pixels)") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"the file is not a readable image: no known image format ({_sniff(data)})") from None
        except Exception as error:
            # PIL's messages can hold object reprs; say what kind of failure it was, not where.
            raise ImageError(f"the file is not a readable image ({_sniff(data)}: {error.__class__.__name__})") from None
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, dtype=np.float32)
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low or 1.0) * 255
            return np.repeat(array.astype(np.uint8)[..., None], 3, axis=2)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))

    def fetch(self, uri: str, task_id=None) -> np.ndarray:
        if isinstance(uri, str) and uri.startswith("data:"):
            try:
                header, payload = uri.split(",", 1)
                data = base64.b64decode(payload) if ";base64" in header else payload.encode()
            except Exception:
                raise ImageError("malformed data: URI") from None
            if len(data) > self.max_bytes:
                raise ImageError(f"data: URI image is over the limit of {self.max_bytes} bytes")
            return self.decode(data)
        url, with_credentials = self.resolve(uri, task_id)
        return self.decode(self._download(url, with_credentials))
