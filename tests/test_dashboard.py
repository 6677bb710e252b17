"""The offline dashboard: self-contained HTML, data matching the scan, and a real headless browser."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_sae_eval import HOOK, make_sae, random_windows

from interp.errors import UserError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]
FEATURES = [1, 4, 9]


@pytest.fixture(scope="module")
def built(tiny_model):
    from saes.dashboard import build_dashboard

    sae = make_sae(tiny_model.cfg.d_model, 24, 4, HOOK, seed=6)
    windows = random_windows(tiny_model, 5, ctx=10, seed=7)
    # A token that cannot break out of the JSON <script> block must survive verbatim.
    windows[3, 4] = tiny_model.tokenizer.encode("</", add_special_tokens=False)[0]
    dash = build_dashboard(sae, tiny_model, windows, features=FEATURES, n_tokens=5 * 9, top_k=3, batch_size=2, progress=False)
    return sae, windows, dash


def embedded_data(page: str) -> dict:
    match = re.search(r'<script id="dashboard-data" type="application/json">(.*?)</script>', page, re.S)
    assert match, "data block missing"
    return json.loads(match.group(1))


def test_html_is_self_contained(built):
    _, _, dash = built
    page = dash.html
    assert "__PLOTLY_JS__" not in page and "__DASHBOARD_DATA__" not in page
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    assert plotly_js in page  # plotly.js itself is inlined
    # Outside plotly.js (whose strings mention plotly.com links), nothing names an external resource.
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page.replace(plotly_js, ""))
    assert embedded_data(page) == json.loads(json.dumps(dash.data))


def test_data_matches_scan(built, tiny_model):
    from saes.features import logit_lens, neighbours

    sae, windows, dash = built
    features = {f["id"]: f for f in dash.data["features"]}
    assert sorted(features) == FEATURES
    lens = logit_lens(sae, tiny_model, FEATURES, 10)
    near = neighbours(sae, FEATURES, 8)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(windows, names_filter=[HOOK])
        f = sae.encode(cache[HOOK])
    f[:, 0] = 0
    for i, item in features.items():
        assert item["max"] == pytest.approx(float(f[..., i].max()), rel=1e-5)
        assert [t for t, _ in item["logits"]["top"]] == [t for t, _ in lens[i]["top"]]
        assert [j for j, _ in item["neighbours"]] == [j for j, _ in near[i]]
        assert item["n_fired"] == int((f[..., i] > 0).sum())
        assert sum(item["hist"]["counts"]) == item["n_fired"]
        if item["contexts"]:
            best = item["contexts"][0]
            assert best["acts"][best["max_index"]] == pytest.approx(item["max"], rel=1e-4)


def test_repr_html_and_save(built, tmp_path):
    _, _, dash = built
    frame = dash._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and html.unescape(frame.split('srcdoc="')[1].split('" style=')[0]) == dash.html
    path = dash.save(tmp_path / "report.html")
    assert path.read_text(encoding="utf-8") == dash.html


def test_bad_feature_index(built, tiny_model):
    from saes.dashboard import build_dashboard

    sae, windows, _ = built
    with pytest.raises(UserError, match="out of range"):
        build_dashboard(sae, tiny_model, windows, features=[99], n_tokens=9, progress=False)


@pytest.mark.browser
def test_renders_in_headless_chromium(built, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("INTERP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} not found but INTERP_REQUIRE_BROWSER=1: install Debian's chromium")
        pytest.skip(f"{CHROMIUM} not found (install Debian's chromium to run the browser test)")
    from playwright.sync_api import sync_playwright

    _, _, dash = built
    page_path = dash.save(tmp_path / "report.html")
    errors: list[str] = []
    blocked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # launch() uses a fresh temporary profile
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            def route(r):
                if r.request.url.startswith("file://"):
                    r.continue_()
                else:
                    blocked.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(page_path.as_uri())
            page.wait_for_selector("#feature-1.shown .js-plotly-plot", timeout=30_000)
            assert page.locator(".feature-panel").count() == len(FEATURES)
            assert page.locator("#feature-list li").count() == len(FEATURES)
            # Clicking a list entry shows that panel and draws its histogram.
            page.click('#feature-list li[data-feature="9"]')
            page.wait_for_selector("#feature-9.shown .js-plotly-plot", timeout=30_000)
            assert not page.locator("#feature-1").is_visible()
            # Searching by id hides the other entries.
            page.fill("#search", "#4")
            visible = [li.get_attribute("data-feature") for li in page.locator("#feature-list li").all() if li.is_visible()]
            assert visible == ["4"]
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert blocked == []
    assert (tmp_path / "dashboard.png").stat().st_size > 1000
