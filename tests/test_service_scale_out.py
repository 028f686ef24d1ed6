"""Scale-out: Celery (real ``redis-server``) as the queue, the job store on a real PostgreSQL with
Alembic migrations, two API replicas (``medseg serve --broker ... --workers 0``) and two
``medseg worker`` processes. One worker is SIGKILLed mid-job and one replica is SIGKILLed; every
job still succeeds exactly once, with one ``output/`` each and a SEG referencing its series.

Redis and PostgreSQL are the Debian packages (``redis-server``, ``postgresql``), started here on
free loopback ports in temporary folders; the tests skip, saying why, when they are absent."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import shared_path
from tests.test_service_support import REPO, TINY_MODEL, Server, build_tiny_model, dicom_files, free_port

JOBS = int(os.environ.get("MEDSEG_SCALE_OUT_JOBS", "40"))
LEASE_S = 5.0


def _wait(check, timeout: float, what: str):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as error:  # e.g. not listening yet
            last = error
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s (last error: {last!r})")


# --- Redis and PostgreSQL, started by the tests -------------------------------------------------
def _redis_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    pytest.importorskip("celery", reason="celery[redis] not installed (pip install -e '.[scale]')")
    pytest.importorskip("redis", reason="redis client not installed (celery[redis])")
    return binary


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A real redis-server on loopback ``port`` (no persistence), answering PING."""
    import redis

    process = subprocess.Popen(
        [
            _redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=open(folder / f"redis-{port}.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    _wait(redis.Redis(host="127.0.0.1", port=port).ping, 30, "redis-server ready")
    return process


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    process = _start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def postgres_url():
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server not installed (Debian package postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")
    bin_dir = Path(initdb[-1]).parent
    # a folder of its own under /tmp (pytest's base temp is private to root, out of reach of the
    # postgres user)
    folder = Path(tempfile.mkdtemp(prefix="medseg-postgres-"))
    data = folder / "data"
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    try:
        subprocess.run(
            [
                *as_postgres,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *as_postgres,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
        ) as connection:
            connection.execute("CREATE DATABASE medseg")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/medseg"
    finally:
        _stop_postgres(data)
        shutil.rmtree(folder, ignore_errors=True)


def _stop_postgres(data: Path) -> None:
    """Immediate shut-down (SIGQUIT to the postmaster), waiting until it has exited."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("scale-out-models"))


def _fresh_database(postgres_url: str, name: str) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
    ) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.execute(f"CREATE DATABASE {name}")
    return url.set(database=name).render_as_string(hide_password=False)


# --- the store: migrations and conditional claims -----------------------------------------------
def _schema_diff(store):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.store import Base

    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata), context.get_current_heads()


def test_migrations_build_the_models_tables_on_sqlite_and_postgres(postgres_url, tmp_path):
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from service.store import Store, alembic_config

    heads = tuple(ScriptDirectory.from_config(alembic_config()).get_heads())
    for url in (f"sqlite:///{tmp_path / 'new.sqlite'}", _fresh_database(postgres_url, "migrate_new")):
        store = Store(url)
        try:
            diff, current = _schema_diff(store)
            assert diff == [] and current == heads, (url, diff, current)
            Store(url).dispose()  # a second start: already at head
        finally:
            store.dispose()
    # a store created before migrations existed (the 0001 tables, no alembic_version, a job in
    # it) is adopted: stamped 0001, upgraded to head, its rows kept
    from alembic import command

    for url in (f"sqlite:///{tmp_path / 'old.sqlite'}", _fresh_database(postgres_url, "migrate_old")):
        engine = create_engine(url)
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0001")
            connection.exec_driver_sql("DROP TABLE alembic_version")
            connection.exec_driver_sql(
                "INSERT INTO jobs (id, owner, source, model, options, input, state, created_at, "
                "attempts, progress, results, timings) VALUES ('old', 'k', 'upload', 'm', '{}', "
                "'{}', 'succeeded', 1.0, 1, 1.0, '{}', '{}')"
            )
        engine.dispose()
        store = Store(url)
        try:
            assert _schema_diff(store) == ([], heads)
            old = store.get_job("old")
            assert old.state == "succeeded" and old.published_at is None
        finally:
            store.dispose()


def test_several_processes_start_on_one_new_postgres_store_at_once(postgres_url):
    url = _fresh_database(postgres_url, "migrate_race")
    code = "import sys; from service.store import Store; Store(sys.argv[1]).dispose()"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO, stderr=subprocess.PIPE) for _ in range(3)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()[-2000:]


def _add_job(store, job_id: str, created_at: float):
    from service.store import QUEUED, Job

    store.add(
        Job(
            id=job_id,
            owner="k",
            source="upload",
            model=TINY_MODEL,
            options={},
            input={},
            state=QUEUED,
            created_at=created_at,
            attempts=0,
            progress=0.0,
            results={},
            timings={},
        )
    )


def test_claims_and_requeues_are_exclusive_across_replicas(postgres_url):
    from service.store import QUEUED, RUNNING, Store

    url = _fresh_database(postgres_url, "claims")
    stores = [Store(url) for _ in range(4)]
    try:
        _add_job(stores[0], "a" * 32, 1.0)
        winners: list = []
        barrier = threading.Barrier(len(stores))

        def claim(store, node):
            barrier.wait()
            winners.append(store.claim("a" * 32, node, lease_s=60))

        threads = [threading.Thread(target=claim, args=(s, f"n{i}")) for i, s in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        won = [job for job in winners if job is not None]
        assert len(won) == 1 and won[0].state == RUNNING and won[0].attempts == 1
        assert stores[1].claim("a" * 32, "late", lease_s=60) is None  # fresh heartbeat: taken
        # the worker died: its heartbeat goes stale; several replicas re-queue it, one wins
        stores[0].update_job("a" * 32, heartbeat_at=time.time() - 120)
        requeued: list[list[str]] = []
        barrier = threading.Barrier(len(stores))

        def requeue(store):
            barrier.wait()
            requeued.append(store.requeue_interrupted(lease_s=60))

        threads = [threading.Thread(target=requeue, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(sum(requeued, [])) == ["a" * 32]
        assert stores[2].get_job("a" * 32).state == QUEUED
        # a stale running job can also be re-claimed directly by a re-delivered message
        assert stores[2].claim("a" * 32, "n2", lease_s=60).attempts == 2
        stores[0].update_job("a" * 32, heartbeat_at=time.time() - 120)
        assert stores[3].claim("a" * 32, "n3", lease_s=60).attempts == 3
        assert stores[3].heartbeat(["a" * 32], "n2") == 0  # not n2's any more
        assert stores[3].heartbeat(["a" * 32], "n3") == 1
        # a queued job whose message may be lost is re-published by exactly one sweeping process
        _add_job(stores[0], "e" * 32, time.time() - 3600)
        swept: list[list[str]] = []
        barrier = threading.Barrier(len(stores))

        def sweep(store):
            barrier.wait()
            swept.append(store.claim_republish(older_than_s=60))

        threads = [threading.Thread(target=sweep, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(sum(swept, [])) == ["e" * 32]
        assert stores[1].claim_republish(older_than_s=60) == []  # just published
        stores[0].update_job("e" * 32, state="succeeded")
        # queue position comes from the store, whoever asks
        for index in range(3):
            _add_job(stores[index], f"{index:032d}", 10.0 + index)
        assert [stores[3].queue_position(stores[0].get_job(f"{i:032d}")) for i in range(3)] == [1, 2, 3]
    finally:
        for store in stores:
            store.dispose()


def test_dead_letter_states_interrupted_and_retries_exhausted(tmp_path):
    """A job interrupted ``max_attempts`` times, or whose claim keeps failing, ends ``failed``
    with its reason (no broker needed: the task body is called directly)."""
    pytest.importorskip("celery", reason="celery not installed")
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from service.broker import WorkerRuntime
    from service.config import Settings
    from service.jobs import job_view
    from service.store import FAILED, Store

    settings = Settings.load({"data_dir": tmp_path, "broker_url": "memory://", "max_attempts": 2}, environ={})
    runtime = WorkerRuntime(settings, node="w-test")
    try:
        store: Store = runtime.store
        _add_job(store, "c" * 32, 1.0)
        store.update_job("c" * 32, attempts=2)  # interrupted twice already
        task = SimpleNamespace(request=SimpleNamespace(retries=0))
        assert runtime.execute(task, "c" * 32) == "ran"
        job = store.get_job("c" * 32)
        assert job.state == FAILED and job.attempts == 3
        assert job.error["type"].endswith("/interrupted")
        assert runtime.execute(task, "c" * 32) == "skipped"  # a late duplicate changes nothing

        # a queued job never published (its replica died first) is published by the sweep
        _add_job(store, "f" * 32, 3.0)
        assert runtime.queue.sweep_once() == ["f" * 32]
        assert store.get_job("f" * 32).published_at is not None
        assert runtime.queue.sweep_once() == []

        _add_job(store, "d" * 32, time.time())

        def broken(*_, **__):
            raise OperationalError("UPDATE", None, ConnectionError("store down"))

        runtime.store.claim = broken
        retried = []

        class Retry(Exception):
            pass

        def retry(**kwargs):
            retried.append(kwargs)
            return Retry()

        with pytest.raises(Retry):
            runtime.execute(SimpleNamespace(request=SimpleNamespace(retries=0), retry=retry), "d" * 32)
        assert retried and retried[0]["max_retries"] == 2
        assert store.get_job("d" * 32).state == "queued"
        task = SimpleNamespace(request=SimpleNamespace(retries=2), retry=retry)
        assert runtime.execute(task, "d" * 32) == "retries-exhausted"
        view = job_view(store.get_job("d" * 32), store)
        assert view.state == "failed" and view.error["type"].endswith("/retries-exhausted"), view
    finally:
        runtime.stop()


def test_submit_never_blocks_and_publishes_once_the_broker_is_back(redis_url, tmp_path):
    """The API hands a job id to the broker without waiting for it: with Redis down ``submit``
    returns at once, and the id is published when Redis is reachable again."""
    import redis
    from kombu.exceptions import OperationalError

    from service.broker import BrokerQueue
    from service.config import Settings
    from service.store import Store

    port = free_port()  # nothing listens there yet
    settings = Settings.load(
        {"data_dir": tmp_path, "broker_url": f"redis://127.0.0.1:{port}/0", "broker_queue": "late"}, environ={}
    )
    store = Store(settings.db_url)
    queue = BrokerQueue(settings, store)
    server = None
    try:
        _add_job(store, "b" * 32, time.time())
        started = time.monotonic()
        queue.submit("b" * 32)
        assert time.monotonic() - started < 0.5
        time.sleep(1.0)
        assert store.get_job("b" * 32).published_at is None
        with pytest.raises((OSError, OperationalError)):  # what /readyz reports as "broker unreachable"
            queue.check_reachable(timeout=1.0)
        server = subprocess.Popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp_path),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: store.get_job("b" * 32).published_at is not None, 30, "published")
        assert redis.Redis(host="127.0.0.1", port=port).llen("late") == 1
        queue.check_reachable(timeout=5.0)
    finally:
        queue.close()
        store.dispose()
        if server is not None:
            server.terminate()
            server.wait(30)


def test_readyz_answers_503_over_http_while_the_broker_is_down(models, tmp_path):
    """An API replica on a real Redis: /readyz 200, then 503 problem+json naming the broker once
    redis-server is killed, and 200 again when it is back (a load balancer's view)."""
    port = free_port()
    redis = _start_redis(port, tmp_path)
    replica = Server(
        tmp_path / "data", models, workers=0, env={"MEDSEG_SERVICE_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
    )
    try:
        replica.start()
        redis.kill()
        redis.wait(30)
        down = _wait(lambda: (r := httpx.get(replica.url + "/readyz", timeout=30)).status_code == 503 and r, 60, "503")
        assert down.headers["content-type"].startswith("application/problem+json")
        assert down.json()["checks"]["broker"].startswith("unreachable"), down.json()
        assert "broker unreachable" in down.json()["detail"]
        redis = _start_redis(port, tmp_path)
        _wait(lambda: httpx.get(replica.url + "/readyz", timeout=30).status_code == 200, 60, "ready again")
    finally:
        replica.stop()
        if redis.poll() is None:
            redis.terminate()
            redis.wait(30)


# --- the whole set-up, with failures ------------------------------------------------------------
class Worker:
    """``medseg worker`` as a subprocess."""

    def __init__(self, name: str, data_dir: Path, models: Path, env: dict[str, str]):
        self.name = name
        self.log_path = data_dir.parent / f"{name}.log"
        self.command = [sys.executable, "-m", "medseg", "worker", "--data-dir", str(data_dir), "--node-id", name]
        self.env = {
            **os.environ,
            "MEDSEG_MODEL_PATH": str(models),
            "OMP_NUM_THREADS": "1",
            "MEDSEG_SERVICE_DEFAULT_MODEL": TINY_MODEL,
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self.env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT
        )
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def records(self) -> list[dict]:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def test_two_replicas_two_workers_every_job_succeeds_exactly_once(redis_url, postgres_url, models, tmp_path):
    import pydicom

    from service.auth import create_key
    from service.store import RUNNING, SUCCEEDED, Job, Store

    series = shared_path("dicom", "hippocampus_crop_study1")
    source_uid = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID
    database = _fresh_database(postgres_url, "scale_out")
    data = tmp_path / "data"
    data.mkdir()
    store = Store(database)
    key = create_key(store, "submit", "scale-out")[0]
    env = {
        "MEDSEG_SERVICE_DATABASE_URL": database,
        "MEDSEG_SERVICE_BROKER_URL": redis_url,
        "MEDSEG_SERVICE_LEASE_S": str(LEASE_S),
        "MEDSEG_SERVICE_MAINTENANCE_INTERVAL_S": "0.5",
        # short, so that the killed worker's unacknowledged message is re-delivered during
        # the test and must be dropped (the job was re-queued, re-run and finished meanwhile)
        "MEDSEG_SERVICE_BROKER_VISIBILITY_TIMEOUT_S": "20",
    }
    replicas = [Server(data, models, workers=0, env={**env, "MEDSEG_SERVICE_NODE_ID": f"api-{i}"}) for i in (1, 2)]
    workers = [Worker(f"w{i}", data, models, env) for i in (1, 2)]
    try:
        for replica in replicas:
            replica.start()
        files = dicom_files(series)
        ids: list[str] = []
        clients = [replica.client(key) for replica in replicas]
        started = time.monotonic()
        slow = set(range(2, JOBS, 3))  # mirroring TTA: long enough to be killed mid-job
        for index in range(JOBS):  # no worker yet: every job waits in the queue, in order
            form = {"formats": "seg,report", **({"tta": "true"} if index in slow else {})}
            response = clients[index % 2].post("/v1/jobs", files=files, data=form)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        submit_s = time.monotonic() - started
        # queue positions, as either replica sees them, count the queued jobs created before
        for index in (0, 1, JOBS // 2, JOBS - 1):
            for client in clients:
                view = client.get(f"/v1/jobs/{ids[index]}").json()
                assert view["state"] == "queued" and view["queue_position"] == index + 1, view

        for worker in workers:
            worker.start()
        started = time.monotonic()
        # SIGKILL the first worker while it runs a (slow) job, after it has finished one
        w1 = f"w1:worker:{workers[0].process.pid}"

        def w1_running():
            with store.session() as session:
                done = session.query(Job).filter(Job.node == w1, Job.state == SUCCEEDED).count()
                running = [
                    job
                    for job in session.query(Job).filter(Job.node == w1, Job.state == RUNNING)
                    if job.options.get("tta")
                ]
            return running[0] if done and running else None

        killed_job = _wait(w1_running, 150, "worker w1 running a TTA job").id
        workers[0].kill()
        interrupted = store.get_job(killed_job)
        assert interrupted.state == RUNNING and interrupted.node == w1  # really killed mid-job
        replicas[0].kill()  # one API replica goes too; the other serves everything
        client = clients[1]
        seen_progress: list[float] = []

        def all_done():
            page = client.get("/v1/jobs", params={"state": "succeeded", "limit": 1}).json()
            running = client.get("/v1/jobs", params={"state": "running", "limit": 5}).json()
            seen_progress.extend(item["progress"] for item in running["items"])
            return page["total"] == JOBS

        _wait(all_done, 240, f"{JOBS} jobs succeeded")
        run_s = time.monotonic() - started
        # a message delivered again (what Redis does with the killed worker's unacknowledged
        # one after the visibility timeout) finds its job finished and is dropped
        from service.broker import TASK, celery_app
        from service.config import Settings

        before = {job_id: store.get_job(job_id).finished_at for job_id in (killed_job, ids[0])}
        publisher = celery_app(Settings.load({"broker_url": redis_url}, environ={}))
        for job_id in before:
            publisher.send_task(TASK, args=[job_id])
        publisher.close()
        for job_id in before:
            _wait(
                lambda job_id=job_id: any(
                    r.get("msg") == "job message dropped (not claimable)" and r.get("job_id") == job_id
                    for r in workers[1].records()
                ),
                60,
                f"duplicate message of {job_id} dropped",
            )
            assert store.get_job(job_id).finished_at == before[job_id]
    finally:
        for worker in workers:
            worker.stop()
        for replica in replicas:
            replica.stop()
    print(
        f"\n{JOBS} jobs: submitted in {submit_s:.1f} s, run in {run_s:.1f} s "
        f"({JOBS / run_s * 60:.1f} jobs/min, 2 workers then 1)"
    )

    assert all(0.0 <= p <= 1.0 for p in seen_progress)
    finished = {}  # job id -> how many times a worker recorded it succeeded
    for worker in workers:
        for record in worker.records():
            if record.get("msg") == "job finished" and record.get("state") == "succeeded":
                finished[record["job_id"]] = finished.get(record["job_id"], 0) + 1
    assert finished == {job_id: 1 for job_id in ids}, finished
    try:
        for job_id in ids:
            job = store.get_job(job_id)
            assert job.state == SUCCEEDED and job.progress == 1.0 and job.error is None, job_id
            assert job.published_at is not None  # handed to the broker, recorded
            expected = 2 if job_id == killed_job else 1
            assert job.attempts >= expected, (job_id, job.attempts)
            folder = data / "jobs" / job_id
            assert sorted(p.name for p in folder.iterdir()) == ["input", "output"], job_id
            seg = pydicom.dcmread(folder / job.results["seg"], stop_before_pixels=True)
            assert seg.Modality == "SEG"
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
        assert store.get_job(killed_job).attempts == 2
        assert sum(store.get_job(job_id).attempts for job_id in ids) <= JOBS + 2
    finally:
        store.dispose()


def test_unacknowledged_job_is_redelivered_by_redis_after_the_visibility_timeout(redis_url, models, tmp_path):
    """Celery + Redis's own at-least-once delivery: a worker takes a job and is frozen (SIGSTOP),
    its message stays unacknowledged; after the visibility timeout the other worker's periodic
    scan puts it back in the queue, that worker claims the job (heartbeat stale) and runs it:
    it succeeds once, with ``attempts == 2``, and nothing but the broker brought it back (the
    heartbeat loops that re-queue stale jobs are disabled: maintenance interval 1 h)."""
    from medseg.package import resolve_model
    from service.broker import BatchClient
    from service.config import Settings
    from service.inputs import JobOptions
    from service.store import RUNNING, SUCCEEDED

    visibility_s, lease_s = 8.0, 3.0
    crop = shared_path("dicom", "hippocampus_crop_study1")
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "MEDSEG_SERVICE_BROKER_URL": redis_url,
        "MEDSEG_SERVICE_BROKER_QUEUE": "redelivery",
        "MEDSEG_SERVICE_BROKER_VISIBILITY_TIMEOUT_S": str(visibility_s),
        "MEDSEG_SERVICE_BROKER_RESTORE_INTERVAL_S": "1",
        "MEDSEG_SERVICE_LEASE_S": str(lease_s),
        "MEDSEG_SERVICE_MAINTENANCE_INTERVAL_S": "3600",
    }
    workers = [Worker(f"r{i}", data, models, env).start() for i in (1, 2)]
    settings = Settings.load(
        {"data_dir": data, "broker_url": redis_url, "broker_queue": "redelivery", "lease_s": lease_s}, environ={}
    )
    client = BatchClient(settings)
    frozen = None
    try:
        # both workers past their start-up re-queue of stale jobs before the job exists
        for worker in workers:
            _wait(lambda w=worker: any(r.get("msg") == "worker started" for r in w.records()), 120, "worker up")
        card = resolve_model(models / TINY_MODEL).card
        options = JobOptions(tta=True, overlap=0.9, formats=["seg", "report"])  # a few seconds of work
        job = client.submit(sorted(crop.iterdir()), card, TINY_MODEL, options)
        first = _wait(
            lambda: (row := client.store.get_job(job.id)).state == RUNNING and row,
            120,
            "a worker running the job",
        )
        frozen = next(w for w in workers if first.node == f"{w.name}:worker:{w.process.pid}")
        frozen.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert client.store.get_job(job.id).state == RUNNING  # frozen mid-job, message unacked
        other = next(w for w in workers if w is not frozen)

        done = _wait(
            lambda: (row := client.store.get_job(job.id)).state in (SUCCEEDED, "failed") and row,
            visibility_s + 60,
            "the job re-delivered and finished",
        )
        took_s = time.monotonic() - stopped
        assert done.state == SUCCEEDED and done.error is None, done.error
        assert done.node.startswith(f"{other.name}:worker:") and done.attempts == 2
        # taken again only once the visibility timeout had passed since the first delivery
        assert done.started_at - first.started_at >= visibility_s - 1.0, (first.started_at, done.started_at)
        assert done.published_at == first.published_at  # published once, by the client
        folder = data / "jobs" / job.id
        assert sorted(p.name for p in folder.iterdir()) == ["input", "output"]
        assert _is_seg(folder / done.results["seg"])
        records = [r for w in workers for r in w.records()]
        assert not [r for r in records if r.get("msg", "").startswith("job re-queued")]
        finished = [r for r in records if r.get("msg") == "job finished" and r.get("job_id") == job.id]
        assert [r["state"] for r in finished] == [SUCCEEDED]
        assert [r.get("attempt") for r in other.records() if r.get("msg") == "job started"] == [2]
    finally:
        for worker in workers:
            if worker is frozen:
                worker.kill()  # SIGKILL ends a stopped process too
            else:
                worker.stop()
        client.close(timeout=1)
    print(f"\nre-delivered and finished {took_s:.1f} s after the first worker was frozen")


def _is_seg(path: Path) -> bool:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).Modality == "SEG"
