"""On an NVIDIA GPU: split-u against centralized training per epoch, fp32 against bf16, and a
site killed with SIGKILL resuming bit for bit.

    python bench/gpu.py [--write-docs] [--quick]

Rows: the built-in ``cnn`` on 64 px images and torchvision's DenseNet-121 on 224 px images
(synthetic radiographs written as DICOM, read back by the site), each in fp32 and bf16. The
aggregator's trunk and the site's head and tail run on the same GPU (``device: cuda``), as
separate processes through Mosquitto; centralized training runs in this process on that GPU.
The last row kills the site with SIGKILL in round 1 of a bf16 job with deterministic
algorithms on, restarts it, and compares every final tensor with an uninterrupted run.

Without a GPU it says so in one line and measures nothing (exit status 2).
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import bench_main, machine
from bench.split_overhead_heavy import (
    CLASSES,
    Setup,
    centralized_epoch_seconds,
    split_epoch,
)
from edge_agent.data.dicom_source import load_dicom_site
from edge_agent.data.dicom_synth import synthesize_site
from edge_agent.data.settings import DicomData
from experiments.federation import Federation, small_job
from medsplit.brokers.mosquitto import Mosquitto

NETWORKS = {
    "cnn, 64 px": (
        {"name": "cnn", "args": {"in_channels": 1, "image_size": 64}},
        64,
    ),
    "DenseNet-121, 224 px": (
        {"name": "torchvision.densenet121", "args": {"in_channels": 1, "image_size": 224}},
        224,
    ),
}


def _need_a_gpu() -> None:
    if not torch.cuda.is_available():
        print(
            "bench/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False); nothing "
            "was measured",
            file=sys.stderr,
        )
        raise SystemExit(2)


def epoch_rows(tmp: Path, quick: bool) -> list[str]:
    images, rounds = (64, 1) if quick else (256, 2)
    rows = []
    for label, (model, size) in NETWORKS.items():
        folder = synthesize_site(tmp / f"dicom-{size}", 0, images, size=size)
        config = DicomData.model_validate(
            {
                "source": "dicom",
                "folder": str(folder),
                "classes": CLASSES,
                "preprocessing": {"size": size},
            }
        )
        data, _ = load_dicom_site(config)
        for precision in ("fp32", "bf16"):
            setup = Setup(model=model, size=size, device="cuda", precision=precision)
            central = centralized_epoch_seconds(data.x_train, data.y_train, 2, setup)
            split, _ = split_epoch(tmp / f"{size}-{precision}", folder, rounds, setup)
            rows.append(
                f"| {label} | {precision} | {central:.2f} | {split:.2f} | {split / central:.2f}x |"
            )
            print(rows[-1], flush=True)
    return rows


def resume_row(tmp: Path) -> str:
    """A bf16 job on the GPU, its site killed in round 1 and restarted, against a clean run."""
    job = small_job("split-u", "sequential", rounds=3)
    job |= {
        "device": "cuda",
        "defenses": {"gradient_noise": 0},
        "training": {"precision": "bf16", "deterministic": True},
    }
    settings = {site: {"device": "cuda"} for site in job["sites"]}
    with Mosquitto(tmp / "broker") as broker:
        runs = {}
        for name in ("clean", "killed"):
            (tmp / name).mkdir()
            fed = Federation(
                tmp / name,
                broker.url,
                {**job, "job_id": f"{job['job_id']}-{name}"},
                site_settings=settings,
            )
            try:
                fed.start_all()
                if name == "killed":
                    fed.await_file(fed.checkpoint(1))
                    fed.kill("site-b", signal.SIGKILL)
                    fed.start("site-b")
                codes = fed.wait_all(1800)
            finally:
                fed.stop_all()
            if any(codes.values()):
                raise RuntimeError("\n".join(fed.tail(n) for n in codes))
            runs[name] = {s: fed.site_weights(s) for s in fed.sites}
    same = all(
        torch.equal(runs["clean"][s][k], runs["killed"][s][k])
        for s in runs["clean"]
        for k in runs["clean"][s]
    )
    return (
        f"Site killed with SIGKILL in round 1 of a bf16 job (deterministic algorithms), "
        f"restarted: final tensors {'identical to' if same else 'DIFFERENT from'} an "
        f"uninterrupted run's."
    )


def run(quick: bool) -> str:
    _need_a_gpu()
    with tempfile.TemporaryDirectory() as tmp:
        rows = epoch_rows(Path(tmp), quick)
        resume = resume_row(Path(tmp) / "resume")
    return "\n".join(
        [
            f"GPU: {torch.cuda.get_device_name(0)}.",
            "",
            "| network | precision | centralized, s/epoch | split-u, s/epoch | ratio |",
            "|---|---|---|---|---|",
            *rows,
            "",
            resume,
        ]
    )


def intro() -> str:
    return (
        "## On a GPU: split-u against centralized, fp32 against bf16, resume after SIGKILL\n\n"
        f"Command: `python bench/gpu.py --write-docs`. Machine: {machine()}. Both processes "
        "and the centralized run on the same GPU."
    )


if __name__ == "__main__":
    bench_main("gpu", __doc__, intro, run)
