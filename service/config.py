"""Service settings: one validated object, from defaults, ``MEDSEG_SERVICE_*`` variables and flags.

Every field can be set by an environment variable named ``MEDSEG_SERVICE_<FIELD>`` (upper case),
e.g. ``MEDSEG_SERVICE_MAX_UPLOAD_BYTES=1000000``; list fields take comma-separated values and
mapping fields take JSON. ``medseg serve`` flags override the environment.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from medseg.errors import ConfigError, config_error

ENV_PREFIX = "MEDSEG_SERVICE_"
GiB = 1024**3


class Settings(BaseModel):
    """Everything the service needs to run; sizes in bytes, durations in seconds."""

    data_dir: Path = Field(Path("medseg-data"), description="job store, uploads and results")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store; default SQLite (WAL) in data_dir"
    )
    workers: int = Field(1, ge=0, description="in-process worker threads (0: submit only)")
    device: str = "cpu"
    default_model: str = Field("hippocampus", description="model used when a request names none")
    node_id: str = Field(
        default_factory=socket.gethostname, description="this process's name in the job store (restart recovery)"
    )
    # limits
    max_upload_bytes: int = Field(2 * GiB, gt=0, description="request body limit, streamed")
    max_instances: int = Field(5000, gt=0, description="files per upload or zip entries")
    max_uncompressed_bytes: int = Field(8 * GiB, gt=0, description="zip: total uncompressed size")
    max_zip_ratio: float = Field(200.0, gt=1, description="zip: uncompressed / compressed size")
    max_form_fields: int = Field(32, gt=0)
    max_voxels: int = Field(
        2**29,
        gt=0,
        description="most voxels a series may declare (all channels), checked on the "
        "headers before pixels are decoded; the default holds a 512 x 512 x 2048 CT",
    )
    max_windows: int = Field(
        500_000,
        gt=0,
        description="most network evaluations (sliding windows x TTA passes) per "
        "job; the default holds a 410 x 410 x 1500 mm whole-body CT at 1 mm, overlap 0.5 and "
        "8-pass TTA with a 32 x 48 x 32 patch",
    )
    max_validations: int = Field(2, gt=0, description="uploads validated at the same time")
    request_timeout_s: float = Field(600.0, gt=0, description="time to receive one request body")
    retention_s: float = Field(72 * 3600.0, gt=0, description="finished jobs' data kept this long")
    max_attempts: int = Field(3, ge=1, description="a job interrupted this often is failed")
    lease_s: float = Field(900.0, gt=0, description="a running job without a heartbeat this long is re-queued")
    maintenance_interval_s: float = Field(2.0, gt=0)
    # scale-out (service/broker.py): a Celery broker instead of in-process workers
    broker_url: str | None = Field(
        None,
        description="Celery broker URL (redis://host:6379/0, amqp://user:pass@host//); "
        "set: submitted job ids go to the broker and `medseg worker` processes run them",
    )
    broker_queue: str = Field("medseg", min_length=1, description="Celery queue name for jobs")
    broker_visibility_timeout_s: float = Field(
        6 * 3600.0,
        gt=0,
        description="Redis: an unacknowledged job message is re-delivered "
        "after this long; keep it longer than the longest job",
    )
    broker_restore_interval_s: float = Field(
        60.0,
        gt=0,
        description="Redis: seconds between a worker's scans for unacknowledged messages "
        "older than the visibility timeout (those are put back in the queue); lower it with a "
        "short visibility timeout",
    )
    broker_republish_s: float = Field(
        900.0,
        gt=0,
        description="a queued job not handed to the broker for this long (message "
        "lost) is published again; a duplicate is harmless",
    )
    worker_concurrency: int = Field(1, ge=1, description="jobs one `medseg worker` runs at once")
    worker_health_file: Path | None = Field(
        None,
        description="`medseg worker` touches this file every maintenance interval while its "
        "heartbeat loop reaches the job store (for container health checks)",
    )
    # HTTP
    cors_origins: list[str] = Field(default_factory=list)
    max_connections: int = Field(
        256,
        gt=0,
        description="open HTTP connections (and requests in progress) served at once; "
        "past it uvicorn answers 503 (keep it well above the expected concurrent uploads)",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this many seconds"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request's complete line and "
        "headers, from the connection (or the previous response); then the connection is closed",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request line + headers, in bytes (bigger: 400)"
    )
    retry_after_s: int = Field(
        5,
        ge=1,
        description="seconds sent in Retry-After with a 503 for a storage fault "
        "(database locked, data folder unwritable or full)",
    )
    # DICOMweb
    stow_quiet_s: float = Field(10.0, ge=0, description="series complete after this long quiet")
    stow_model: str | None = Field(None, description="model for STOW-RS series; default_model if unset")
    pacs_url: str | None = Field(None, description="DICOMweb root to push each finished SEG to")
    pacs_headers: dict[str, str] = Field(
        default_factory=dict, description="extra HTTP headers for the PACS (e.g. auth)"
    )
    pacs_timeout_s: float = Field(60.0, gt=0)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(value).expanduser().resolve()

    @property
    def read_policy(self):
        """What reading an upload may touch: self-contained files only, ``max_voxels``."""
        from medseg.io.safety import ReadPolicy

        return ReadPolicy(detached_data="refuse", max_voxels=self.max_voxels)

    @property
    def db_url(self) -> str:
        """The job store URL (SQLite file ``<data_dir>/jobs.sqlite`` unless configured)."""
        return self.database_url or f"sqlite:///{self.data_dir / 'jobs.sqlite'}"

    @property
    def jobs_dir(self) -> Path:
        """``<data_dir>/jobs/<job id>/{input,output}``."""
        return self.data_dir / "jobs"

    @property
    def stow_dir(self) -> Path:
        """``<data_dir>/stow/<series key>/<sop uid>.dcm`` while a STOW-RS series is collected."""
        return self.data_dir / "stow"

    @property
    def incoming_dir(self) -> Path:
        """Uploads being received or validated (same file system as jobs_dir, for ``os.replace``)."""
        return self.data_dir / "incoming"

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
        """Defaults, then ``MEDSEG_SERVICE_*`` variables, then ``overrides`` (None values ignored).

        Raises:
            ConfigError: a value does not validate; the message names the key.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            annotation = str(field.annotation)
            if "list" in annotation:
                values[name] = [v.strip() for v in raw.split(",") if v.strip()]
            elif "dict" in annotation:
                try:
                    values[name] = json.loads(raw)
                except ValueError:
                    raise ConfigError(f"{ENV_PREFIX}{name.upper()}: not JSON") from None
            else:
                values[name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise config_error(error, "service settings") from None
