"""Pushing results to a PACS over DICOMweb STOW-RS (DICOM PS3.18 10.5), with dicomweb-client.

Configured by ``pacs_url`` (the DICOMweb root, e.g. ``http://orthanc:8042/dicom-web``) and
``pacs_headers`` (e.g. ``{"Authorization": "Basic ..."}``). Nothing is sent unless configured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from service.config import Settings


class PushError(Exception):
    """The PACS did not accept the instances (after retries)."""


def push_instances(settings: Settings, paths: Sequence[os.PathLike], attempts: int = 3) -> None:
    """STOW-RS the DICOM files at ``paths`` to ``settings.pacs_url``.

    Raises:
        PushError: the PACS is unreachable or refused the instances ``attempts`` times; the
            message names the HTTP status or connection error (never the data).
    """
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(Path(p)) for p in paths]
    client = DICOMwebClient(settings.pacs_url, headers=dict(settings.pacs_headers), timeout=settings.pacs_timeout_s)
    last = ""
    for attempt in range(attempts):
        try:
            client.store_instances(datasets)
            return
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            last = f"PACS answered HTTP {status}"
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                break  # the PACS refuses these instances; retrying will not help
        except requests.RequestException as error:
            last = f"PACS unreachable ({type(error).__name__})"
        if attempt + 1 < attempts:
            time.sleep(min(10.0, 1.0 * 2**attempt))
    raise PushError(last or "PACS push failed")
