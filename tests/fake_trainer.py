"""Stand-in for `python -m trainer` in job-manager tests: same arguments, same job-folder files, fast steps.

`-q train --config CFG` / `-q resume JOB`; SIGTERM or the job's stop file (naming this pid) saves a "checkpoint" and
ends as stopped. Env: FAKE_STEP_S (step
time, default 0.02 s), FAKE_FAIL (exit 2 at once with a CLI-style error line), FAKE_CACHE_S (stay this long in
"caching"; SIGTERM there ends as the real trainer does: stopped, with the finished shards kept, exit code 0),
FAKE_GRANDCHILD (start a helper process in a session of its own, as a data-loader worker could, and write its pid to
<job>/grandchild.pid).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.jobfolder import JobFolder, JobState, JobStatus


def write_checkpoint(job: JobFolder, step: int) -> None:
    folder = job.checkpoints_dir / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "concept.safetensors").write_bytes(f"concept {step}".encode())
    (folder / "train_state.pt").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"format": "gcfg.trainer-checkpoint/1", "step": step}))
    (job.checkpoints_dir / "latest").write_text(folder.name)


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "-q"]
    if args[0] == "train":
        config = json.loads(Path(args[2]).read_text())
        start = 0
    else:
        config = json.loads((Path(args[1]) / "config.json").read_text())
        marker = Path(args[1]) / "checkpoints" / "latest"
        start = int(marker.read_text().split("-")[1]) if marker.exists() else 0
    if os.environ.get("FAKE_FAIL"):
        sys.stderr.write("error: dataset_dir='x' is broken\n")
        return 2
    job = JobFolder(config["job_dir"])
    if os.environ.get("FAKE_GRANDCHILD"):
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        (job.path / "grandchild.pid").write_text(str(helper.pid))
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: signals.append(1))

    def stop() -> bool:  # polled like the real trainer polls its StopFileFlag
        return bool(signals) or job.stop_requested(os.getpid())

    total = config["max_steps"]
    cache_until = time.monotonic() + float(os.environ.get("FAKE_CACHE_S", "0"))
    while time.monotonic() < cache_until:
        job.write_status(JobStatus(state=JobState.CACHING, phase_done=1, phase_total=2, pid=os.getpid()))
        time.sleep(0.02)
        if stop():
            job.write_status(JobStatus(state=JobState.STOPPED, pid=os.getpid(),
                                       message="stopped while caching latents; resume continues from the finished "
                                               "shards"))
            return 0
    job.write_status(JobStatus(state=JobState.TRAINING, step=start, total_steps=total, pid=os.getpid()))
    step = start
    while step < total and not stop():
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.02")))
        step += 1
        job.append_event({"type": "step", "step": step, "loss": 1.0 / step})
        job.write_status(JobStatus(state=JobState.TRAINING, step=step, total_steps=total, pid=os.getpid(),
                                   images_per_second=100.0, eta_seconds=1.0))
    write_checkpoint(job, step)
    final = JobState.COMPLETED if step >= total else JobState.STOPPED
    job.write_status(JobStatus(state=final, step=step, total_steps=total, pid=os.getpid(), message=final.value))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
