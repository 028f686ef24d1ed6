"""The web page (``GET /``, ``service/web.py`` + ``service/static/``) driven in a real headless
Chromium (Debian's ``chromium``) through Playwright for Python, against a real ``medseg serve``:
sign in, upload the bundled DICOM series with the bundled ``hippocampus`` model, follow the job,
see the label overlay in the NiiVue viewer (canvas pixels of the label colours), download the SEG,
delete the job; and the page without a key and with a wrong key. Plus the page's headers (strict
CSP, nothing inline, nothing from another origin) and the viewer's input endpoint
``GET /v1/jobs/{id}/input.nii.gz`` over plain HTTP.

Screenshots go to a temporary folder (printed) and the main one is copied to
``/tmp/medseg-web-screenshot.png``. Skips, with the reason, without chromium or playwright.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.io import read_image
from tests.test_service_support import (
    REPO,
    Server,
    assert_problem,
    build_tiny_model,
    create_key,
    dicom_files,
    wait_for,
    zip_bytes,
)

CHROMIUM = Path(os.environ.get("MEDSEG_CHROMIUM", "/usr/bin/chromium"))
SAMPLE = REPO / "medseg" / "samples" / "hippocampus_mr"
SCREENSHOT = Path("/tmp/medseg-web-screenshot.png")
# WebGL2 without a GPU: SwiftShader (software) through ANGLE
CHROMIUM_ARGS = [
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--no-sandbox",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-page")
    data = root / "data"
    keys = {
        "submit": create_key(data, "submit", "web"),
        "other": create_key(data, "submit", "other"),
        "read": create_key(data, "read", "reader"),
    }
    server = Server(data, build_tiny_model(root / "models")).start()
    yield server, keys
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path):
    folder = tmp_path / "screenshots"
    folder.mkdir()
    print(f"\nscreenshots: {folder}")
    return folder


class Watch:
    """What a page did: requests (URL, headers), console errors and CSP violations."""

    def __init__(self, page, base_url: str):
        self.requests: list[tuple[str, dict]] = []
        self.errors: list[str] = []
        self.base_url = base_url
        page.on("request", lambda r: self.requests.append((r.url, r.headers)))
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.add_init_script(
            "window.__csp = []; document.addEventListener('securitypolicyviolation', "
            "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
            # every text the progress line shows (upload, queue, progress, done)
            "window.__progress = []; document.addEventListener('DOMContentLoaded', () => {"
            " const el = document.getElementById('progress-text');"
            " new MutationObserver(() => window.__progress.push(el.textContent))"
            ".observe(el, {childList: true, characterData: true, subtree: true}); });"
        )

    def check(self, page, key: str | None = None, allowed_errors: tuple[str, ...] = ()) -> None:
        assert page.evaluate("window.__csp") == [], "CSP violations"
        errors = [e for e in self.errors if not any(a in e for a in allowed_errors)]
        assert errors == [], errors
        for url, headers in self.requests:
            assert url.startswith((self.base_url, "data:", "blob:")), f"request to another origin: {url}"
            if key:
                assert key not in url, "the API key appeared in a URL"
                if "/v1/" in url:
                    assert headers.get("authorization") == f"Bearer {key}", url


def _label_pixels(png: bytes, colors: dict[str, tuple[int, int, int]], tolerance: int = 24) -> dict:
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return {
        name: int((np.abs(rgb - np.array(color)).max(axis=-1) <= tolerance).sum()) for name, color in colors.items()
    }


def _drop_file(page, selector: str, name: str, data: bytes, media_type: str) -> None:
    """Drag and drop a file onto ``selector`` (a DataTransfer made in the page)."""
    transfer = page.evaluate_handle(
        "([name, data, type]) => { const t = new DataTransfer(); const bytes = Uint8Array.from("
        "atob(data), c => c.charCodeAt(0)); t.items.add(new File([bytes], name, {type})); return t; }",
        [name, base64.b64encode(data).decode(), media_type],
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": transfer})


def _set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector, "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }", value
    )


# --- the page's own headers and files (no browser needed) ---------------------------------------
class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_has_a_strict_csp_and_nothing_inline_or_from_elsewhere(service):
    server, _ = service
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'" and directives["connect-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        parser = _Tags()
        parser.feed(page.text)
        assert not [t for t, _ in parser.tags if t == "style"]
        assert not [a for _, a in parser.tags if "style" in a or any(k.startswith("on") for k in a)]
        scripts = [a for t, a in parser.tags if t == "script"]
        assert scripts and all(a.get("src", "").startswith("/static/") for a in scripts)
        assert not re.search(r"<script[^>]*>[^<]+</script>", page.text)
        assets = [a.get("src") or a.get("href") for t, a in parser.tags if t in ("script", "link", "img")]
        assert all(a.startswith("/static/") for a in assets), assets
        assets += ["/static/vendor/niivue/niivue.js"]
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200, asset
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "content-security-policy" in response.headers
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert "https://" not in client.get("/static/app.js").text  # nothing loaded from elsewhere
        for bad in (
            "/static/../web.py",
            "/static/%2e%2e/web.py",
            "/static/vendor/niivue/LICENSE",
            "/static/nope.js",
            "/static/vendor/../../api.py",
        ):
            assert client.get(bad).status_code == 404, bad


# --- the viewer's input endpoint ------------------------------------------------------------------
def test_input_nifti_endpoint_converts_once_with_the_job_ownership_rules(service):
    server, keys = service
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=dicom_files(SAMPLE))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        early = client.get(f"/v1/jobs/{job_id}/input.nii.gz")
        if early.status_code != 200:  # not finished yet: 409, never a half-written file
            assert_problem(early, 409, "not-ready")
        assert wait_for(client, job_id)["state"] == "succeeded"
        first = client.get(f"/v1/jobs/{job_id}/input.nii.gz")
        assert first.status_code == 200, first.text
        assert first.headers["content-type"] == "application/gzip"
        cached = server.data_dir / "jobs" / job_id / "output" / "input.nii.gz"
        assert cached.is_file()
        mtime = cached.stat().st_mtime_ns
        second = client.get(f"/v1/jobs/{job_id}/input.nii.gz")
        assert second.content == first.content and cached.stat().st_mtime_ns == mtime
        assert not [p for p in cached.parent.iterdir() if ".partial" in p.name]
        label_map = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/v1/jobs/{job_id}/result/nifti").content))
    volume = nib.Nifti1Image.from_bytes(gzip.decompress(first.content))
    source = read_image(SAMPLE)
    assert volume.shape == source.shape == label_map.shape
    assert np.allclose(volume.affine, source.affine, atol=1e-4)
    assert np.array_equal(np.asarray(volume.dataobj), source.array)
    assert_problem(httpx.get(f"{server.url}/v1/jobs/{job_id}/input.nii.gz"), 401, "unauthorized")
    with server.client(keys["other"]) as other:  # another tenant's key: as if there were no job
        assert_problem(other.get(f"/v1/jobs/{job_id}/input.nii.gz"), 404, "not-found")
    with server.client(keys["submit"]) as client:
        assert_problem(client.get(f"/v1/jobs/{'0' * 32}/input.nii.gz"), 404, "not-found")
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert_problem(client.get(f"/v1/jobs/{job_id}/input.nii.gz"), 404, "not-found")


# --- the page in Chromium -------------------------------------------------------------------------
def test_page_without_a_key_shows_only_sign_in_a_wrong_key_is_refused_problems_shown(service, browser, shots):
    server, keys = service
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    watch = Watch(page, server.url)
    page.goto(server.url + "/")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.is_visible("#api-key") and not page.is_visible("#app")
    assert not page.is_visible("#session")
    page.screenshot(path=str(shots / "sign-in.png"))

    wrong = "msk_000000000000_" + "x" * 40
    page.fill("#api-key", wrong)
    page.click("#signin-button")
    error = page.wait_for_selector("#signin-error:not([hidden])")
    text = error.inner_text()
    assert "not accepted" in text and "401" in text, text
    assert not page.is_visible("#app")
    assert page.evaluate("sessionStorage.getItem('medseg.apiKey')") is None
    page.screenshot(path=str(shots / "wrong-key.png"))

    # a read-only key signs in, but an upload is refused: the problem's title and detail shown
    page.fill("#api-key", keys["read"])
    page.click("#signin-button")
    page.wait_for_selector("#app:not([hidden])")
    assert not page.is_visible("#signin-error")
    _drop_file(
        page,
        "#dropzone",
        "series.zip",
        zip_bytes({p.name: p.read_bytes() for p in sorted(SAMPLE.iterdir())}),
        "application/zip",
    )
    assert page.inner_text("#selection-text").startswith("series.zip · ")
    page.click("#submit")
    text = page.wait_for_selector("#upload-error:not([hidden])").inner_text()
    assert "Forbidden (403)" in text and "role 'read'" in text, text
    page.screenshot(path=str(shots / "read-key-upload.png"))
    watch.check(page, allowed_errors=("401", "403"))  # the browser logs refused requests itself
    context.close()


def test_page_signs_in_uploads_views_the_overlay_downloads_and_deletes(service, browser, shots):
    server, keys = service
    key = keys["submit"]
    with server.client(key) as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()}
    assert "hippocampus" in models, list(models)
    colors = {label["name"]: tuple(label["color"]) for label in models["hippocampus"]["labels"]}

    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    watch = Watch(page, server.url)
    page.goto(server.url + "/")
    page.fill("#api-key", key)
    page.click("#signin-button")
    page.wait_for_selector("#app:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('medseg.apiKey')") == key
    assert key not in page.url
    options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert set(options) >= {"hippocampus", "tiny-hippocampus"}
    page.select_option("#model", "hippocampus")
    legend = page.inner_text("#model-labels")
    assert all(name in legend for name in colors), legend

    page.set_input_files("#folder-input", str(SAMPLE))  # a DICOM folder (webkitdirectory)
    assert "35 files" in page.inner_text("#selection-text")
    page.click("#submit")
    page.wait_for_selector("body[data-viewer=ready]", timeout=90_000)
    assert page.evaluate("window.__csp") == [], "CSP violations"
    assert page.inner_text("#progress-text").startswith("Done")
    progress = page.evaluate("window.__progress")
    for step in ("Uploading", "Queued", "Segmenting", "Done"):
        assert any(t.startswith(step) for t in progress), (step, progress)
    assert page.get_attribute("#progress-bar", "value") == "1"
    job_id = page.get_attribute("body", "data-viewer-job")

    with server.client(key) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        report = client.get(f"/v1/jobs/{job_id}/result/report").json()
    assert job["state"] == "succeeded" and job["model"] == "hippocampus"
    shown = page.eval_on_selector_all("#volumes tbody tr", "rows => rows.map(r => r.innerText)")
    assert len(shown) == len(report["labels"]) == 2
    for row, label in zip(shown, report["labels"]):
        assert label["name"] in row and f"{label['volume_ml']:.3f}" in row, (row, label)
    assert all(label["volume_ml"] > 0 for label in report["labels"]), report["labels"]

    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / "result.png"), full_page=True)
    shutil.copyfile(shots / "result.png", SCREENSHOT)
    _set_range(page, "#opacity", 1.0)  # overlay opaque: its pixels are exactly the label colours
    page.wait_for_timeout(300)
    counts = _label_pixels(page.locator("#gl").screenshot(), colors)
    assert all(n >= 30 for n in counts.values()), counts
    _set_range(page, "#opacity", 0.0)
    page.wait_for_timeout(300)
    hidden = _label_pixels(page.locator("#gl").screenshot(), colors)
    assert all(hidden[n] < counts[n] / 10 for n in colors), (hidden, counts)
    _set_range(page, "#opacity", 0.6)

    location = page.inner_text("#location")  # the crosshair: position, intensity, label
    assert " mm · intensity " in location and ("label " in location or "background" in location)
    # scrolling through slices: the axial slider moves the axial slice
    before = page.inner_text("#slice-axial-value")
    _set_range(page, "#slice-axial", 0)
    assert page.inner_text("#slice-axial-value") != before
    assert page.inner_text("#slice-axial-value").startswith("1 / ")
    page.click(".segmented button[data-view='0']")  # axial only
    page.wait_for_timeout(200)
    page.screenshot(path=str(shots / "axial.png"))
    page.click(".segmented button[data-view='3']")

    row = page.locator(f"li.job[data-job-id='{job_id}']")
    with page.expect_download() as info:
        row.locator("button.download", has_text="SEG").click()
    seg_path = shots.parent / "result.seg.dcm"
    info.value.save_as(seg_path)
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 2
    assert {s.SegmentLabel for s in seg.SegmentSequence} == set(colors)
    with page.expect_download() as info:
        row.locator("button.download", has_text="Report").click()
    assert info.value.suggested_filename.endswith(".json")

    row.locator("button.danger").click()  # first click arms, second deletes
    row.locator("button.danger.armed").click()
    page.wait_for_selector(f"li.job[data-job-id='{job_id}']", state="detached")
    with server.client(key) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    watch.check(page, key=key)
    context.close()
