"""Screenshots of the Prefect UI for docs/deploy.md, taken with a real browser (Playwright + Debian
chromium) against a real local stack.

    .venv/bin/pip install -e ".[docs]" && apt-get install chromium
    .venv/bin/python scripts/ui_screenshot.py [--model fake:1] [--out docs/img]

Starts a throwaway stack (deployments.stack) in a temp folder, deploys, runs `stage1/pilot` twice —
one plain run, one that waits for approval — and saves:
  - pilot-run-artifacts.png: the finished run's page, Artifacts tab (QC table, preview, progress);
  - pilot-approval-form.png: the waiting run's resume form with the QC table beside it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments import stack  # noqa: E402

SCALE_VERDICT = "qc:\n  instruction_acceptance_min: 0.2\n  min_n: 3\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(flow_run_id, done, timeout: float = 300):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            fr = client.read_flow_run(flow_run_id)
            if fr.state is not None and done(fr.state):
                return fr
            time.sleep(1)
    raise TimeoutError(str(flow_run_id))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fake:1")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="stage1-ui-"))
    port = _free_port()
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    stack.up(state, port, no_auth=True)  # a throwaway loopback stack: the browser needs no login
    try:
        stack.deploy(state, port, ["pilot", "approval-timeout"])
        env = stack.stack_env(state, port)
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        from prefect.deployments import run_deployment
        from playwright.sync_api import sync_playwright

        cfg = state / "scale_verdict.yaml"
        cfg.write_text(SCALE_VERDICT)
        done = run_deployment("stage1/pilot", parameters={"count": 12, "model": args.model, "seed": 3}, timeout=0)
        waiting = run_deployment("stage1/pilot", parameters={"count": 3, "model": args.model, "config": str(cfg),
                                                            "require_approval": True}, timeout=0)
        _wait(done.id, lambda s: s.is_final())
        _wait(waiting.id, lambda s: s.is_paused())
        ui = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium,
                                        args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(f"{ui}/runs/flow-run/{done.id}", wait_until="networkidle")
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("stage1-qc").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "pilot-run-artifacts.png"), full_page=True)
            page.goto(f"{ui}/runs/flow-run/{waiting.id}", wait_until="networkidle")
            page.wait_for_timeout(2000)
            page.get_by_role("button", name="Resume").first.click()
            page.get_by_text("Approve scaling?").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "pilot-approval-form.png"), full_page=True)
            browser.close()
        print(f"wrote {args.out / 'pilot-run-artifacts.png'} and {args.out / 'pilot-approval-form.png'}")
    finally:
        stack.down(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
