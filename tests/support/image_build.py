"""The container images, built in the background while the rest of the suite runs.

On a cold machine `scripts/images.sh` installs docker.io, debootstraps the base images, makes
the wheelhouse and builds both images: minutes of mostly one-core, disk-bound work. The test
session starts it as soon as it knows a container test will run (tests/conftest.py), puts those
tests last, and their fixture waits for the build (``ImageBuild.wait``) -- so the build overlaps
the other tests instead of adding to them. Its output goes to files under the session's
temporary directory, which a failure quotes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ImageBuild:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @classmethod
    def start(cls, folder: Path) -> ImageBuild:
        folder.mkdir(parents=True, exist_ok=True)
        stdout, stderr = folder / "images.out", folder / "images.log"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                ["bash", str(REPO / "scripts" / "images.sh")],
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group: stopped as one if the session ends early
            )
        return cls(process, stdout, stderr)

    def wait(self, timeout: float) -> str | None:
        """Until the build is over. Returns the problem (its log's last lines), None when built."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return f"scripts/images.sh still running after {timeout:g} s: {self.tail()}"
        return None if code == 0 else f"scripts/images.sh exited {code}: {self.tail()}"

    def started_engine(self) -> int | None:
        """The pid of the dockerd the build had to start (for the fixture to stop), if any."""
        for line in self.stdout.read_text().splitlines():
            if line.startswith("started "):
                return int(line.split()[1])
        return None

    def tail(self, lines: int = 5) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
