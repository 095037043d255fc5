"""Studies from the hospital's PACS over DICOMweb, into a mirror on the site's own disk.

The labels table names the instances (SOP Instance UIDs) -- or, for 3-D volumes, the series
(Series Instance UIDs); QIDO-RS finds where each lives (its study, and series, many UIDs per
query as a UID list) and WADO-RS retrieves it, through
``dicomweb-client`` on a ``requests`` session that carries the site's credentials (a bearer
token, basic authentication, a client certificate) and retries connection errors and 502/503/504
with backoff (urllib3's ``Retry``). Each instance is written atomically as
``CACHE_DIR/instances/<SOP Instance UID>.dcm``, each series into a hidden folder renamed to
``CACHE_DIR/series/<Series Instance UID>/`` once every slice is on disk: an agent killed
mid-download leaves only whole instances and whole series (and stray temporaries, removed on the
next start), and started again fetches only what is not there yet. Everything downstream -- the
site's intensity range, decoding, the decoded cache, validation, the patient split -- is the
DICOM folder's (or the volume folder's) code on the mirror.

Credentials the PACS refuses (401/403) or a PACS that cannot be reached stop the agent at
start-up whatever ``on_bad_input`` says; an instance that is not in the PACS, that the PACS
fails to serve or that is not DICOM is a bad input, skipped or fatal by ``on_bad_input``, named
by its UID.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from edge_agent.data.settings import DicomWebData, PacsAuth
from edge_agent.data.site_data import Collector, DataError
from medsplit.storage import atomic_write

log = logging.getLogger(__name__)

STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
# Parallel WADO-RS requests: enough to hide the round trip, few enough to be a polite client.
RETRIEVERS = 4


class PacsError(DataError):
    """The PACS as a whole cannot be used (refused credentials, unreachable): always fatal."""


@dataclass(frozen=True)
class Location:
    study: str
    series: str
    sop: str | None = None  # None: the whole series

    @property
    def uid(self) -> str:
        """The UID the labels table names: the instance's, or the series'."""
        return self.series if self.sop is None else self.sop


@dataclass
class Retrieval:
    """What one start-up took from the PACS and what it found already on disk."""

    files: dict[str, Path]  # labelled UID -> its file (an instance) or folder (a series)
    retrieved: int = 0
    reused: int = 0
    unit: str = "instances"

    def describe(self) -> str:
        return (
            f"{len(self.files)} {self.unit} from the PACS "
            f"({self.retrieved} retrieved, {self.reused} already on disk)"
        )


def read_secret(path: Path, field: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise PacsError(f"data.auth.{field}: cannot read {path} ({exc.strerror})") from None
    if not text:
        raise PacsError(f"data.auth.{field}: {path} is empty")
    return text


class PacsSession(requests.Session):
    """A session whose own CA bundle wins: plain ``requests`` lets ``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` in the environment replace it, and a container that sets one for the
    internet would then refuse the hospital's own CA."""

    def merge_environment_settings(
        self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


def open_session(auth: PacsAuth, retries: int) -> requests.Session:
    """A session that authenticates as ``auth`` says and retries what is worth retrying:
    refused connections, resets, 408, 429 and 502/503/504, never a certificate that does not verify."""
    session = PacsSession()
    retry = Retry(
        total=retries,
        other=0,  # TLS failures: trying again cannot help
        backoff_factor=0.5,
        status_forcelist=(408, 429, 502, 503, 504),  # honouring a Retry-After
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    if auth.token_file is not None:
        token = read_secret(auth.token_file, "token_file")
        session.headers["Authorization"] = f"Bearer {token}"
    if auth.username is not None and auth.password_file is not None:
        session.auth = (auth.username, read_secret(auth.password_file, "password_file"))
    if auth.cert_file is not None:
        session.cert = (
            str(auth.cert_file)
            if auth.key_file is None
            else (str(auth.cert_file), str(auth.key_file))
        )
    if auth.ca_file is not None:
        session.verify = str(auth.ca_file)
    return session


class Pacs:
    """QIDO-RS and WADO-RS against one DICOMweb root, one ``requests`` session per thread."""

    def __init__(self, config: DicomWebData) -> None:
        self.config = config
        self.series_level = config.key == "series_instance_uid"
        self._local = threading.local()

    def client(self) -> DICOMwebClient:
        client: DICOMwebClient | None = getattr(self._local, "client", None)
        if client is None:
            session = open_session(self.config.auth, self.config.retries)
            client = DICOMwebClient(self.config.url, session=session, timeout=self.config.timeout_s)
            client.set_http_retry_params(retry=False)  # the session retries, once and politely
            self._local.client = client
        return client

    def locate(self, uids: list[str]) -> tuple[dict[str, Location], dict[str, str]]:
        """Where each instance (or series) lives, and why the PACS could not say for those it
        failed on.

        UIDs the PACS does not hold are in neither. A query the PACS fails (a 5xx: one broken
        study can fail a whole answer) is split in halves down to single UIDs, so one bad
        instance costs only itself.
        """
        found: dict[str, Location] = {}
        failed: dict[str, str] = {}
        pending = [
            uids[i : i + self.config.query_batch]
            for i in range(0, len(uids), self.config.query_batch)
        ]
        while pending:
            chunk = pending.pop()
            try:
                answers = self._search(chunk)
            except QueryFailed as exc:
                if len(chunk) == 1:
                    failed[chunk[0]] = f"the PACS failed to look it up (HTTP {exc.status})"
                else:
                    pending += [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
                continue
            tags = (STUDY, SERIES) if self.series_level else (STUDY, SERIES, SOP)
            for answer in answers:
                try:
                    location = Location(*(str(answer[tag]["Value"][0]) for tag in tags))
                except (KeyError, IndexError, TypeError):
                    continue  # an answer without its UIDs names nothing we can retrieve
                found[location.uid] = location
        return found, failed

    def _search(self, uids: list[str]) -> list[dict[str, Any]]:
        """One QIDO-RS query matching a list of SOP (or Series) Instance UIDs."""
        client, listed = self.client(), ",".join(uids)
        try:
            answers: list[dict[str, Any]] = (
                client.search_for_series(
                    search_filters={"SeriesInstanceUID": listed},
                    fields=["StudyInstanceUID"],
                    get_remaining=True,
                )
                if self.series_level
                else client.search_for_instances(
                    search_filters={"SOPInstanceUID": listed},
                    fields=["StudyInstanceUID", "SeriesInstanceUID"],
                    get_remaining=True,
                )
            )
        except requests.HTTPError as exc:
            status = _status(exc)
            if status in (401, 403) or status is None or status < 500:
                raise _fatal(self.config.url, "QIDO-RS search", exc) from None
            raise QueryFailed(status) from None
        except requests.RequestException as exc:
            raise PacsError(
                f"data.url: cannot reach the PACS at {self.config.url} ({root_cause(exc)})"
            ) from None
        return answers

    def retrieve(self, location: Location) -> list[Dataset]:
        """One instance, or every instance of a series, over WADO-RS; ``requests.HTTPError``
        names the status on failure."""
        if location.sop is None:
            series: list[Dataset] = self.client().retrieve_series(location.study, location.series)
            return series
        return [self.client().retrieve_instance(location.study, location.series, location.sop)]


def root_cause(exc: BaseException) -> str:
    """The innermost reason of a ``requests`` error (a refused connection, a certificate that
    does not verify), without the request's URL, which would list every UID of a query."""
    inner: BaseException = exc
    for _ in range(10):
        reason = getattr(inner, "reason", None)
        if isinstance(reason, BaseException):
            inner = reason
        elif inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        else:
            break
    return str(inner)


class QueryFailed(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _status(exc: requests.HTTPError) -> int | None:
    return exc.response.status_code if exc.response is not None else None


def _fatal(url: str, what: str, exc: requests.HTTPError) -> PacsError:
    status = _status(exc)
    if status in (401, 403):
        return PacsError(
            f"data.auth: the PACS at {url} refused medsplit's credentials (HTTP {status} on "
            f"{what}); check the token, user and password, or client certificate"
        )
    reason = exc.response.reason if exc.response is not None else exc
    return PacsError(f"data.url: the PACS at {url} failed {what} (HTTP {status} {reason})")


def _encoded(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Mirror:
    """Retrieved instances on the site's disk, one whole file per SOP Instance UID."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, uid: str) -> Path:
        return self.folder / f"{uid}.dcm"

    def held(self) -> set[str]:
        """UIDs already retrieved; temporaries a killed agent left behind are removed."""
        if not self.folder.is_dir():
            return set()
        for stray in self.folder.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        return {p.stem for p in self.folder.glob("*.dcm")}

    def keep(self, uid: str, datasets: list[Dataset]) -> Path:
        (dataset,) = datasets
        path = self.path(uid)
        atomic_write(path, _encoded(dataset))
        return path


class SeriesMirror(Mirror):
    """Retrieved series on the site's disk, one folder per Series Instance UID, renamed into
    place only once every instance is written (a hidden ``.UID.partial`` folder until then)."""

    def path(self, uid: str) -> Path:
        return self.folder / uid

    def held(self) -> set[str]:
        if not self.folder.is_dir():
            return set()
        for stray in self.folder.glob(".*.partial"):
            shutil.rmtree(stray, ignore_errors=True)
        return {p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def keep(self, uid: str, datasets: list[Dataset]) -> Path:
        partial = self.folder / f".{uid}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for dataset in datasets:
            (partial / f"{dataset.SOPInstanceUID}.dcm").write_bytes(_encoded(dataset))
        path = self.path(uid)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
        return path


def retrieve_labelled(config: DicomWebData, uids: Iterable[str], collect: Collector) -> Retrieval:
    """Every labelled instance (or series) in the mirror, retrieving what is missing; failures
    collected."""
    series = config.key == "series_instance_uid"
    mirror = (
        SeriesMirror(config.cache_dir / "series")
        if series
        else Mirror(config.cache_dir / "instances")
    )
    unit = "series" if series else "instances"
    wanted = sorted(set(uids))
    held = mirror.held()
    files = {uid: mirror.path(uid) for uid in wanted if uid in held}
    result = Retrieval(files, reused=len(files), unit=unit)
    missing = [uid for uid in wanted if uid not in held]
    if not missing:
        return result
    pacs = Pacs(config)
    log.info("looking up %d %s in the PACS at %s (QIDO-RS)", len(missing), unit, config.url)
    locations, failed = pacs.locate(missing)
    for uid, why in sorted(failed.items()):
        collect.problem("retrieval failed", f"{_what(series)} {uid}: {why}")
    for uid in missing:
        if uid not in locations and uid not in failed:
            collect.problem(
                "not in the PACS",
                f"{config.labels}: {config.key} {uid} has a label but the PACS at "
                f"{config.url} holds no such {_what(series)}",
            )
    log.info("retrieving %d %s from the PACS (WADO-RS)", len(locations), unit)
    for uid, outcome in _retrieve_all(pacs, mirror, list(locations.values())):
        if isinstance(outcome, Path):
            files[uid] = outcome
            result.retrieved += 1
        else:
            collect.problem("retrieval failed", f"{_what(series)} {uid}: {outcome}")
    return result


def _what(series: bool) -> str:
    return "series" if series else "instance"


def _retrieve_all(
    pacs: Pacs, mirror: Mirror, locations: list[Location]
) -> Iterator[tuple[str, Path | str]]:
    """(uid, file) for each retrieved instance, (uid, why not) for each that failed."""

    def one(location: Location) -> tuple[str, Path | str]:
        try:
            datasets = pacs.retrieve(location)
        except requests.HTTPError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise _fatal(pacs.config.url, "WADO-RS retrieve", exc) from None
            return location.uid, f"the PACS did not serve it (HTTP {status})"
        except requests.RequestException as exc:
            raise PacsError(
                f"data.url: lost the PACS at {pacs.config.url} ({root_cause(exc)})"
            ) from None
        except (ValueError, AttributeError, EOFError) as exc:
            return location.uid, f"the PACS's answer is not a DICOM instance ({exc})"
        if not datasets:
            return location.uid, "the PACS answered with no instances"
        return location.uid, mirror.keep(location.uid, datasets)

    with ThreadPoolExecutor(RETRIEVERS, thread_name_prefix="wado") as pool:
        yield from pool.map(one, locations)
