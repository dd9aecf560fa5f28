"""Serve the "GCFG Training" tab on its own (gradio 3.41, fake WebUI host) for the browser test.

    python tests/browser/serve_tab.py --workdir DIR --port PORT

Loads scripts/gcfg_training.py the way the WebUI does (against tests/fake_webui), renders its tab inside a page with
style.css and javascript/gcfg_training.js, registers the REST routes, and writes "READY <url>" to stdout. The models
folder, a tiny random SD 1.x checkpoint and 16 generated 64-px images are made under --workdir. Jobs are cancelled
when the server ends (SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO_ROOT / "tests" / "fake_webui"), str(REPO_ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_inputs(workdir: Path) -> tuple[Path, Path]:
    """A tiny random SD 1.x checkpoint and a folder of 16 random 64-px PNGs (reused when present)."""
    import numpy as np
    from PIL import Image

    from gcfg_core.configs import TINY
    from gcfg_core.models import random_sd_model, save_sd_checkpoint

    checkpoint = workdir / "models" / "Stable-diffusion" / "tiny-sd15.safetensors"
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_sd_checkpoint(random_sd_model(TINY, seed=0), checkpoint)
    dataset = workdir / "GCFG-datasets" / "tiny16"  # the allowed dataset folder of a WebUI whose data dir is workdir
    dataset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        path = dataset / f"img{i:02d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return checkpoint, dataset


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port", type=int, default=7899)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    checkpoint, dataset = make_inputs(workdir)

    from harness import enable_fake_modules

    enable_fake_modules()
    from modules import paths, script_callbacks, sd_models

    paths.models_path = str(workdir / "models")
    paths.data_path = str(workdir)
    sd_models.register(str(checkpoint))
    tabs, app_started = [], []
    script_callbacks.on_ui_tabs = lambda fn, **_: tabs.append(fn)  # the fake host has no tab callbacks
    script_callbacks.on_app_started = lambda fn, **_: app_started.append(fn)

    spec = importlib.util.spec_from_file_location("gcfg_training.py", REPO_ROOT / "scripts" / "gcfg_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    import gradio as gr

    [(tab_blocks, title, elem_id)] = tabs[0]()
    script = (REPO_ROOT / "javascript" / "gcfg_training.js").read_text()
    with gr.Blocks(css=(REPO_ROOT / "style.css").read_text(), title="GCFG Training (test page)") as page:
        with gr.Tabs():
            with gr.Tab(title, id=elem_id, elem_id=f"tab_{elem_id}"):
                tab_blocks.render()
        page.load(None, _js=f"() => {{ {script} }}")
    page.queue(64)
    app, url, _ = page.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True,
                              show_error=True, quiet=True)
    for callback in app_started:  # after launch, as the WebUI does
        callback(page, app)

    from gcfg_webui import jobs_api

    manager = jobs_api._webui_host.manager
    done = threading.Event()

    def finish(*_):
        done.set()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    sys.stdout.write(f"READY {url} dataset={dataset}\n")
    sys.stdout.flush()
    done.wait()
    for info in manager.list_jobs():
        if "cancel" in [a.value for a in info.actions]:
            manager.cancel(info.id)
    manager.shutdown()
    page.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
