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

from backend.label_studio_client import LabelStudioClient, LabelStudioError

log = logging.getLogger(__name__)
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")


class ImageError(Exception):
    """A task's image could not be used; the message says why (shown to the user)."""


def _describe(error: Exception) -> str:
    """An exception as words, without the memory addresses that requests/urllib3 messages carry."""
    return f"{error.__class__.__name__}: " + re.sub(r" object at 0x[0-9a-fA-F]+", "", str(error))


def _sniff(data: bytes) -> str:
    """What a byte string is, for error messages: its size alone (its bytes are the remote server's)."""
    return f"{len(data)} bytes"


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
        self.label_studio = LabelStudioClient(label_studio_url, api_key or "", self.timeout) \
            if label_studio_url else None

    # ------------------------------------------------------------------ URL resolution
    def resolve(self, uri: str, task_id=None, label_studio: LabelStudioClient | None = None
                ) -> tuple[str, LabelStudioClient | None]:
        """The absolute URL to download, and the Label Studio client whose token it gets (None: no token).

        ``label_studio``: the project's Label Studio (its address and token); default: ``LABEL_STUDIO_URL``'s.
        Only Label Studio's data paths (:func:`is_data_path`) get its token; a relative path that is not one
        (``/api/…``) is refused.
        """
        label_studio = label_studio or self.label_studio
        if not isinstance(uri, str) or not uri:
            raise ImageError("the task has no image URL in the field the label config names")
        base = label_studio.url if label_studio is not None else ""
        scheme = urlsplit(uri).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if task_id is None or not base:
                raise ImageError(f"{scheme}:// images need LABEL_STUDIO_URL and a task id to be resolved")
            encoded = base64.urlsafe_b64encode(uri.encode()).decode()
            return f"{base}/tasks/{task_id}/presign/?fileuri={quote(encoded)}", label_studio
        if scheme in ("http", "https"):
            return uri, label_studio if _is_label_studio_data(uri, base) else None
        if uri.startswith("/"):
            if not base:
                raise ImageError(
                    f"{uri[:80]} is a Label Studio path but the backend doesn't know Label Studio's URL: "
                    "set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)")
            url = urljoin(base + "/", uri.lstrip("/"))
            if not _is_label_studio_data(url, base):
                raise ImageError(f"{uri[:80]!r} is not one of Label Studio's data paths ({', '.join(DATA_PATHS)}, "
                                 "/tasks/<id>/presign/): Label Studio's token is sent to those alone")
            return url, label_studio
        raise ImageError(f"unsupported image reference {uri[:80]!r}")

    def is_allowed_host(self, url: str) -> bool:
        """Whether ``url``'s host (or host:port) is in ALLOWED_IMAGE_HOSTS."""
        parts = urlsplit(url)
        return (parts.hostname or "").lower() in self.allowed_hosts or parts.netloc.lower() in self.allowed_hosts

    def _check_host(self, url: str, label_studio: LabelStudioClient | None) -> None:
        host = (urlsplit(url).hostname or "").lower()
        if (label_studio is not None and _same_host(url, label_studio.url)) or self.is_allowed_host(url):
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
    def _download(self, url: str, label_studio: LabelStudioClient | None, host_client=None) -> bytes:
        """The body at ``url``; ``label_studio``: the client whose token it gets (a data path of its host)."""
        started = time.monotonic()
        host_client = host_client or label_studio
        for _ in range(5):  # redirects are followed by hand so each hop is checked
            self._check_host(url, host_client)
            headers = _credentials(label_studio) if label_studio is not None else {}
            try:
                response = self.session.get(url, headers=headers, timeout=self.timeout, stream=True,
                                            allow_redirects=False)
                if response.status_code == 401 and label_studio is not None and label_studio.uses_access_tokens:
                    response = self.session.get(url, headers=_credentials(label_studio, refresh=True),
                                                timeout=self.timeout, stream=True, allow_redirects=False)
            except requests.RequestException as error:
                raise ImageError(f"can't download {_shown(url)}: {_describe(error)}") from None
            if response.is_redirect:
                url = urljoin(url, response.headers["Location"])
                if label_studio is not None and not _is_label_studio_data(url, label_studio.url):
                    label_studio = None  # another host, or not a data path: no token follows
                continue
            if response.status_code != 200:
                hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
                raise ImageError(f"downloading {_shown(url)} answered HTTP {response.status_code}{hint}")
            with response:
                return self._read_body(response, url, started)
        raise ImageError(f"too many redirects fetching {_shown(url)}")

    def _read_body(self, response: requests.Response, url: str, started: float) -> bytes:
        """The body, within ``max_bytes`` and the download deadline however slowly the server sends it."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(f"image at {_shown(url)} is {declared} bytes, over the limit of {self.max_bytes}")
        data = bytearray()
        while True:
            if time.monotonic() - started > self.deadline:
                raise ImageError(f"downloading {_shown(url)} took over {self.deadline:g} s (FETCH_DEADLINE); "
                                 f"{len(data)} bytes had arrived")
            try:
                # read1 returns what one read brings, so the deadline is checked between reads.
                chunk = response.raw.read1(1 << 16, decode_content=True)
            except Exception as error:
                raise ImageError(f"can't download {_shown(url)}: {error.__class__.__name__}") from None
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > self.max_bytes:
                raise ImageError(f"image at {_shown(url)} is over the limit of {self.max_bytes} bytes")

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

    def download(self, uri: str, task_id=None, label_studio: LabelStudioClient | None = None) -> bytes:
        """The image file's bytes (see :meth:`resolve` for ``label_studio``), within ``max_bytes``."""
        if isinstance(uri, str) and uri.startswith("data:"):
            try:
                header, payload = uri.split(",", 1)
                data = base64.b64decode(payload) if ";base64" in header else payload.encode()
            except Exception:
                raise ImageError("malformed data: URI") from None
            if len(data) > self.max_bytes:
                raise ImageError(f"data: URI image is over the limit of {self.max_bytes} bytes")
            return data
        url, client = self.resolve(uri, task_id, label_studio)
        return self._download(url, client, label_studio or self.label_studio)

    def fetch(self, uri: str, task_id=None, label_studio: LabelStudioClient | None = None) -> np.ndarray:
        """The image as RGB uint8 (H, W, 3)."""
        return self.decode(self.download(uri, task_id, label_studio))


# Label Studio's paths that serve task files (label_studio/*/urls.py); its token goes to these alone.
DATA_PATHS = ("/data/upload/", "/data/local-files/", "/storage-data/uploaded/")
_RESOLVER = re.compile(r"/(tasks|projects)/[0-9]+/(presign|resolve)/")


def is_data_path(path: str) -> bool:
    """Whether a URL path is one of Label Studio's file-serving paths (no dot segments, which could leave it)."""
    if "/." in path or "%2e" in path.lower() or "\\" in path:
        return False
    return path.startswith(DATA_PATHS) or _RESOLVER.fullmatch(path) is not None


def _same_host(url: str, base: str) -> bool:
    return bool(base) and urlsplit(url).netloc.lower() == urlsplit(base).netloc.lower()


def _is_label_studio_data(url: str, base: str) -> bool:
    return _same_host(url, base) and is_data_path(urlsplit(url).path)


def _credentials(label_studio: LabelStudioClient, refresh: bool = False) -> dict[str, str]:
    try:
        return label_studio.auth_header(refresh)
    except LabelStudioError as error:
        raise ImageError(str(error)) from None


def _shown(url: str) -> str:
    """A URL for an error message: without its query (presigned signatures, tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200]
