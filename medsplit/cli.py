"""The ``medsplit`` command line.

Subcommands arrive with the features they drive; each one validates its inputs and prints a
one-line error (exit status 2) instead of a traceback when a file or flag is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsplit import __version__, logs
from medsplit.cli_http import add_http_commands
from models.config_errors import ConfigError, ModelError
from models.plan_names import builtin_plan_names

# Commands import what they drive when they run: `medsplit --help`, `--version` and a config
# typo answer in a fraction of a second instead of waiting for torch (bench/startup.py).


def _cmd_models(args: argparse.Namespace) -> int:
    from models import names as architecture_names
    from models.registry import get as get_architecture

    for name in architecture_names():
        arch = get_architecture(name)
        defaults = arch.parse_args({}).model_dump()
        print(f"{name:28s} {arch.description}")
        print(f"{'':28s} args (defaults): {defaults}")
        if arch.cuts is not None:
            print(f"{'':28s} default cuts: cut {arch.cuts[0]}, tail_cut {arch.cuts[1]}")
    print(
        '\nor your own network: model: {factory: "package.module:function", args: {...}, '
        "input_shape: [...]} (docs/bring-your-own-model.md)"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from models import cut_shapes, load_plan
    from models.plan_check import PlanCheckError, check_plan

    plan = load_plan(args.plan)
    shapes = cut_shapes(plan, args.batch_size)
    print(f"model      {plan.model.name or plan.model.factory} {plan.model.args}")
    if plan.model.traced:
        print(f"cut        after {plan.cuts[0]}    (head: edge; trunk: aggregator)")
        if plan.u_shaped:
            print(f"tail_cut   after {plan.cuts[1]}    (tail: edge, labels stay on site)")
        print(
            f"segments   {len(plan.head_keys)} / {len(plan.trunk_keys)} / "
            f"{len(plan.tail_keys)} tensors (head / trunk / tail)"
        )
        if args.cuts:
            print(f"cuttable   {', '.join(plan.model.layers)}")
    else:
        print(f"head       {', '.join(plan.head)}    (edge)")
        print(f"trunk      {', '.join(plan.trunk)}    (aggregator)")
        if plan.u_shaped:
            print(f"tail       {', '.join(plan.tail)}    (edge, U-shaped: labels stay on site)")
    for name, shape in shapes.items():
        print(f"{name:10s} {list(shape)} per batch of {args.batch_size}")
    print(f"shared     {len(plan.shared_keys)} tensors")
    print(f"private    {len(plan.private_keys)} tensors: {', '.join(sorted(plan.private_keys))}")
    try:
        check = check_plan(plan, export=not args.no_export)
    except PlanCheckError as exc:
        print(f"error: {args.plan}: {exc}", file=sys.stderr)
        return 1
    exported = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in check.onnx_bytes.items())
    print(f"checked    segments recompose the model exactly; ONNX: {exported or 'not checked'}")
    return 0


def _cmd_aggregator(args: argparse.Namespace) -> int:
    from aggregator.config import JobConfig

    config = JobConfig.from_yaml(args.config)
    if args.out:
        config = config.model_copy(
            update={"state": config.state.model_copy(update={"run_dir": Path(args.out)})}
        )
    from aggregator.main import run  # the CLI is the composition root: processes load lazily

    return run(config, events=args.events, fresh=args.fresh, linger=args.after_finish == "wait")


def _cmd_agent(args: argparse.Namespace) -> int:
    from edge_agent.config import SiteConfig

    config = SiteConfig.from_yaml(args.config)
    from edge_agent.data.site_data import DataError
    from edge_agent.main import run

    try:
        return run(config, linger=args.after_finish == "wait")
    except DataError as exc:  # the site's data, checked before it joins the job
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo
    from experiments.demo_options import DemoOptions

    return run_demo(DemoOptions.from_args(args))


def _quieten() -> None:
    for chatty in ("medsplit.transport", "edge_agent", "aggregator"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _load_experiment(args: argparse.Namespace) -> Any:
    """The experiment file with ``--out`` applied; the job logs quietened (the progress bar
    says what runs)."""
    from experiments.config import ExperimentConfig

    config = ExperimentConfig.from_yaml(args.config)
    _quieten()
    if args.out:
        config = config.model_copy(update={"out": Path(args.out)})
    return config


def _cmd_experiment(args: argparse.Namespace) -> int:
    from experiments.results import write_results
    from experiments.runner import run_experiment
    from experiments.vertical_experiment import is_vertical

    if is_vertical(args.config):
        return _vertical_experiment(args)
    config = _load_experiment(args)
    results = run_experiment(config)
    for path in write_results(config, results):
        print(path)
    failed = [r for r in results if r.status != "completed"]
    if config.privacy is not None:
        status = _run_privacy(config, f"medsplit experiment --config {args.config}", docs=False)
        return 1 if failed else status
    return 1 if failed else 0


def _vertical_experiment(args: argparse.Namespace) -> int:
    """An experiment over vertical partitions (docs/vertical.md): its own grid and table."""
    from experiments.vertical_experiment import (
        VerticalExperiment,
        run_vertical_experiment,
        write_vertical_results,
    )

    config = VerticalExperiment.from_yaml(args.config)
    _quieten()
    if args.out:
        config = config.model_copy(update={"out": Path(args.out)})
    results = run_vertical_experiment(config)
    command = f"medsplit experiment --config {args.config}"
    print(write_vertical_results(config, results, command))
    return 1 if any(r.status != "completed" for r in results) else 0


def _cmd_privacy(args: argparse.Namespace) -> int:
    command = f"medsplit privacy --config {args.config}"
    from experiments.vertical_experiment import is_vertical

    if is_vertical(args.config):
        return _vertical_privacy(args, command)
    return _run_privacy(_load_experiment(args), command, docs=args.write_docs)


def _vertical_privacy(args: argparse.Namespace, command: str) -> int:
    """The label-leak attacks of vertical jobs (docs/vertical.md, docs/privacy.md)."""
    from experiments.privacy.vertical import run_vertical_privacy, write_vertical_privacy
    from experiments.vertical_experiment import VerticalExperiment

    config = VerticalExperiment.from_yaml(args.config)
    _quieten()
    if args.out:
        config = config.model_copy(update={"out": Path(args.out)})
    results = run_vertical_privacy(config)
    print(write_vertical_privacy(config, results, command, docs=args.write_docs))
    return 1 if any(r.status != "completed" for r in results) else 0


def _run_privacy(config: Any, command: str, *, docs: bool) -> int:
    from experiments.privacy.report import write_privacy
    from experiments.privacy.sweep import run_privacy

    results = run_privacy(config)
    for path in write_privacy(config, results, command=command, docs=docs):
        print(path)
    return 1 if any(r.status != "completed" for r in results) else 0


def _cmd_dicom_synth(args: argparse.Namespace) -> int:
    from edge_agent.data.dicom_synth import synthesize
    from edge_agent.data.volume_synth import synthesize_volumes

    make = synthesize_volumes if args.volumes else synthesize
    size = args.size or (32 if args.volumes else 64)
    try:
        folders = make(Path(args.out), args.sites, args.per_site, seed=args.seed, size=size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder in folders:
        print(folder)  # stdout: the folders, one a line, for scripts
        print(f"  {_describe_synth(folder)}", file=sys.stderr)
    return 0


def _describe_synth(folder: Path) -> str:
    """What one dicom-synth folder holds, as a person wants to read it."""
    import collections
    import csv

    import pydicom

    with (folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts = collections.Counter(row["label"] for row in rows)
    labels = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
    if "folder" in rows[0]:  # volumes: one series per study folder
        slices = sorted((folder / rows[0]["folder"]).glob("*.dcm"))
        ds = pydicom.dcmread(slices[0], stop_before_pixels=True)
        return (
            f"{folder.name}: {len(rows)} {ds.Modality} series of {len(slices)} slices "
            f"{ds.Rows}x{ds.Columns}, {float(ds.SliceThickness):g} mm apart "
            f"({ds.BitsStored}-bit, rescale {float(ds.RescaleSlope):g}/"
            f"{float(ds.RescaleIntercept):g}) and labels.csv ({labels})"
        )
    ds = pydicom.dcmread(folder / rows[0]["file"], stop_before_pixels=True)
    return (
        f"{folder.name}: {len(rows)} {ds.Modality} images {ds.Rows}x{ds.Columns} "
        f"({ds.BitsStored}-bit, {ds.PhotometricInterpretation}, rescale {float(ds.RescaleSlope):g}/"
        f"{float(ds.RescaleIntercept):g}) and labels.csv ({labels})"
    )


def _cmd_data_stats(args: argparse.Namespace) -> int:
    """Per-site sums out, combined statistics back: normalisation without pooling raw values."""

    from edge_agent.config import SiteConfig
    from edge_agent.data.csv_source import site_sums
    from edge_agent.data.settings import CsvData
    from edge_agent.data.site_data import DataError
    from medsplit.statistics import FeatureSums

    try:
        if args.combine:
            parts = [_sums_from_json(Path(path)) for path in args.combine]
            mean, std = FeatureSums.combine(parts)
            print(json.dumps({"normalization": {"mean": mean.tolist(), "std": std.tolist()}}))
            return 0
        config = SiteConfig.from_yaml(args.config)
        if not isinstance(config.data, CsvData):
            raise DataError(f"{args.config}: data-stats needs a site whose data source is csv")
        sums = site_sums(config.data)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = {"count": sums.count, "sum": sums.total.tolist(), "sum_sq": sums.total_sq.tolist()}
    print(json.dumps(payload))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    """Load a site's data as its agent would, and say what came of it, without joining a job:
    bad input found before the job starts, and a PACS's studies retrieved ahead of time."""
    from edge_agent.config import SiteConfig
    from edge_agent.data.site_data import DataError, SiteData
    from edge_agent.main import load_data

    try:
        config = SiteConfig.from_yaml(args.config)
        data = load_data(config)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, SiteData):  # a vertical party: rows are split once aligned
        return _vertical_party_check(config.site_id, data)
    test = len(data.y_test)
    shape = list(data.x_train.shape[1:])
    print(f"{config.site_id}: {data.train_samples} training and {test} test samples, input {shape}")
    return 0


def _vertical_party_check(site_id: str, data: Any) -> int:
    """A vertical party's records, their keys (salted as in a job: a missing or repeated key is
    refused naming the rows) and the PSI library the alignment will use."""
    from edge_agent.alignment import AlignmentError, psi_self_check

    try:
        data.salted("data-check")
        library = psi_self_check()
    except AlignmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = list(data.x.shape[1:])
    labels = "with labels" if data.y is not None else "no labels"
    print(f"{site_id}: {len(data.keys)} patients ({labels}), input {shape}")
    print(f"{site_id}: keys in {data.key_column!r} all present and distinct; alignment: {library}")
    return 0


def _sums_from_json(path: Path) -> Any:

    import torch

    from medsplit.statistics import FeatureSums

    try:
        data = json.loads(path.read_text())
        return FeatureSums(
            int(data["count"]),
            torch.tensor(data["sum"], dtype=torch.float64),
            torch.tensor(data["sum_sq"], dtype=torch.float64),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not the output of `medsplit data-stats` ({exc})") from None


def _cmd_provision(args: argparse.Namespace) -> int:
    from medsplit.security.pki import PkiError
    from medsplit.security.provision import Federation, Provisioner, load_federation
    from models.config_errors import validate

    out = Path(args.out)
    try:
        if args.add_site or args.renew or args.revoke or (args.helm and out.exists()):
            kit = Provisioner(out)
            if args.add_site:
                lines = kit.add_site(args.add_site)
            elif args.renew:
                lines = kit.renew(args.renew)
            elif args.revoke:
                lines = kit.revoke(args.revoke)
            else:
                lines = kit.enable_helm(args.helm_namespace)
        else:
            if args.federation:
                federation = load_federation(Path(args.federation))
            else:
                fields = {
                    "job_id": args.job,
                    "sites": [s for s in (args.sites or "").split(",") if s],
                    "broker_hosts": args.broker_host or [],
                    "port": args.port,
                    "validity_days": args.validity_days,
                    "bind_address": args.bind_address,
                    "broker_user": args.broker_user,
                    "helm_namespace": args.helm_namespace if args.helm else None,
                }
                federation = validate(
                    Federation, {k: v for k, v in fields.items() if v is not None}, "flags"
                )
            if args.helm and args.federation:
                federation = federation.model_copy(update={"helm_namespace": args.helm_namespace})
            kit = Provisioner.create(federation, out)
            lines = _provisioned(out, federation)
        lines += kit.notes
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


def _provisioned(out: Path, federation: Any) -> list[str]:
    from medsplit.security.helm_files import describe

    return [
        f"{out / 'ca'}: the CA (ca.key is 0600: move it offline once the kits are out)",
        f"{out / 'mosquitto'}: mosquitto -c {out / 'mosquitto' / 'mosquitto.conf'}",
        *(
            line
            for study in federation.studies()
            for line in (
                f"{study.kit(out, 'aggregator')}: certificate of {study.identity('aggregator')}, "
                "job.yaml fragment, revocations.json, roster.json",
                *(
                    f"{study.kit(out, site)}: certificate of {study.identity(site)} and "
                    "site.yaml fragment"
                    for site in study.sites
                ),
            )
        ),
        *(
            f"{out / 'bridges' / site}: the hospital broker of {site}, bridged to the central "
            f"one: mosquitto -c {out / 'bridges' / site / 'mosquitto.conf'} (in the hospital; "
            "Mosquitto 2.0.15 or newer, docs/security.md)"
            for site in federation.hospital_brokers
        ),
        f"certificates valid {federation.validity_days:g} days: renew with "
        f"`medsplit provision --out {out} --renew ID`",
        *(describe(out, federation) if federation.helm_namespace else []),
    ]


def _cmd_report(args: argparse.Namespace) -> int:
    from aggregator.report_page import redraw

    print(f"wrote {redraw(args.run_dir)} and curves.png")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from edge_agent.site_model import SiteModelError, export_site_model
    from models.onnx_export import ExportError

    if args.format != "onnx":
        return _export_for_platform(args)
    try:
        result = export_site_model(Path(args.run), Path(args.out), site=args.site)
    except (SiteModelError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{result.path}  ({result.bytes / 1e6:.2f} MB, opset {result.opset}, "
        f"max |onnxruntime - torch| {result.max_abs_diff:.2g})"
    )
    return 0


def _cmd_export_joint(args: argparse.Namespace) -> int:
    from edge_agent.vertical_joint import JointExportError, export_joint

    heads: dict[str, Path] = {}
    for given in args.head:
        party, sep, path = given.partition("=")
        if not sep or not party or not path:
            print(f"error: --head {given!r}: expected PARTY=PATH/head.onnx", file=sys.stderr)
            return 2
        heads[party] = Path(path)
    try:
        path, diff = export_joint(Path(args.top), heads, Path(args.out))
    except JointExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}  (one input per party; max |joint - parts| {diff:.2g})")
    return 0


def _export_for_platform(args: argparse.Namespace) -> int:
    from edge_agent.serving.platforms import PlatformError, export_for_platform
    from edge_agent.serving.predictor import ModelLoadError
    from edge_agent.site_model import SiteModelError
    from models.onnx_export import ExportError

    try:
        written = export_for_platform(
            Path(args.run),
            Path(args.out),
            args.format,
            site=args.site,
            name=args.name,
            storage_uri=args.storage_uri,
            max_batch=args.max_batch,
        )
    except (SiteModelError, ExportError, PlatformError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if args.format == "kserve":
        print(
            f"copy {args.out}/{written[0].parent.name} to {args.storage_uri}, then kubectl apply -f {written[-1]}"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from edge_agent.serving.app import Limits
    from edge_agent.serving.predictor import ModelLoadError, ProviderUnavailable
    from edge_agent.serving.server import ServeOptions, serve

    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_client_ca is not None and args.tls_cert is None:
        print("error: --tls-client-ca needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    for flag, path in (
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--tls-client-ca", args.tls_client_ca),
    ):
        if path is not None and not Path(path).is_file():
            print(f"error: {flag} {path}: file not found", file=sys.stderr)
            return 2
    options = ServeOptions(
        model=Path(args.model),
        host=args.host,
        port=args.port,
        device=args.device,
        threads=args.threads,
        limits=Limits(max_body_bytes=args.max_body_mb * 1024 * 1024, max_batch=args.max_batch),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        name=args.name,
        grpc_port=None if args.no_grpc else args.grpc_port,
    )
    try:
        serve(options)
    except (ModelLoadError, ProviderUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_await_model(args: argparse.Namespace) -> int:
    from edge_agent.serving.predictor import ModelLoadError
    from edge_agent.serving.server import await_model

    try:
        predictor = await_model(Path(args.model), timeout_s=args.timeout)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    card = predictor.card
    print(f"{args.model}: site {card.site_id} of job {card.job_id}, ready to serve")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsplit",
        description="Train one model across hospitals without moving patient records: "
        "split learning and partial-network federated learning over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"medsplit {__version__}")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=logs.default_format(),
        help="log lines for a person (text), or one JSON object a line for log collectors "
        "(default: $MEDSPLIT_LOG_FORMAT, else text)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models_cmd = commands.add_parser(
        "models", help="list the built-in and catalogue architectures (torchvision, MONAI)"
    )
    models_cmd.set_defaults(func=_cmd_models)

    plan_cmd = commands.add_parser(
        "plan", help="validate a split plan and show where it cuts the model"
    )
    plan_cmd.add_argument(
        "plan", help=f"a plan YAML file or a built-in plan ({', '.join(builtin_plan_names())})"
    )
    plan_cmd.add_argument("--batch-size", type=int, default=32, help="for the cut-layer shapes")
    plan_cmd.add_argument(
        "--cuts", action="store_true", help="list every module a traced network may be cut after"
    )
    plan_cmd.add_argument(
        "--no-export", action="store_true", help="skip exporting each segment to ONNX"
    )
    plan_cmd.set_defaults(func=_cmd_plan)

    agg = commands.add_parser("aggregator", help="run the aggregator of a job (server side)")
    agg.add_argument("--config", required=True, help="job YAML; MEDSPLIT_* variables override it")
    agg.add_argument("--out", help="run directory (default: run_dir from the config)")
    agg.add_argument("--events", action="store_true", help="print progress as JSON lines")
    agg.add_argument(
        "--fresh",
        action="store_true",
        help="start the job over, ignoring (and then replacing) its checkpoints",
    )
    _add_after_finish(agg)
    agg.set_defaults(func=_cmd_aggregator)

    agent = commands.add_parser("agent", help="run an edge agent (hospital side)")
    agent.add_argument(
        "--config", required=True, help="site YAML; MEDSPLIT_* variables override it"
    )
    _add_after_finish(agent)
    agent.set_defaults(func=_cmd_agent)

    from experiments.demo_options import add_demo_arguments

    demo = commands.add_parser(
        "demo", help="a whole federation on this machine, one process per site"
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    _add_experiment_commands(commands)
    synth = commands.add_parser(
        "dicom-synth",
        help="write chest-radiograph-like DICOM files (or CT series), one scanner per site",
    )
    synth.add_argument("--out", required=True, help="output folder (site-N/ subfolders)")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--per-site", type=int, default=100, help="images (or series) per site")
    synth.add_argument(
        "--size", type=int, default=None, help="image rows and columns (default 64; 32 volumes)"
    )
    synth.add_argument(
        "--volumes", action="store_true", help="CT series (3-D volumes) instead of radiographs"
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_dicom_synth)

    stats = commands.add_parser(
        "data-stats", help="a site's feature sums (safe to share), or combine them into statistics"
    )
    which = stats.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="site YAML with a csv data source: print its sums")
    which.add_argument("--combine", nargs="+", metavar="SUMS.json", help="combine sites' sums")
    stats.set_defaults(func=_cmd_data_stats)
    check = commands.add_parser(
        "data-check",
        help="load a site's data as its agent would (retrieving from its PACS) and summarise it",
    )
    check.add_argument("--config", required=True, help="the site's YAML")
    check.set_defaults(func=_cmd_data_check)
    _add_provision_command(commands)
    _add_model_commands(commands)
    add_http_commands(commands)
    report = commands.add_parser(
        "report", help="draw a run's report.html and curves.png again from its report.json"
    )
    report.add_argument("run_dir", type=Path, help="a run directory (holds report.json)")
    report.set_defaults(func=_cmd_report)
    return parser


def _add_after_finish(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--after-finish",
        choices=["exit", "wait"],
        default="exit",
        help="when the job is over: exit (0), or wait, serving the health endpoints, until "
        "SIGTERM (Kubernetes restarts every exit; the charts use wait)",
    )


def _add_experiment_commands(commands: Any) -> None:
    experiment = commands.add_parser(
        "experiment", help="compare every mode on the same data (a grid over a real broker)"
    )
    experiment.add_argument("--config", required=True, help="experiment YAML (docs/experiments.md)")
    experiment.add_argument("--out", help="output directory (default: out from the config)")
    experiment.set_defaults(func=_cmd_experiment)
    privacy = commands.add_parser(
        "privacy",
        help="attack what the aggregator received in each mode, with and without defenses",
    )
    privacy.add_argument(
        "--config", required=True, help="experiment YAML with a privacy section (docs/privacy.md)"
    )
    privacy.add_argument("--out", help="output directory (default: out from the config)")
    privacy.add_argument(
        "--write-docs", action="store_true", help="also write the table into docs/privacy.md"
    )
    privacy.set_defaults(func=_cmd_privacy)


def _add_provision_command(commands: Any) -> None:
    provision = commands.add_parser(
        "provision",
        help="certificates, Mosquitto config and ACL, and a kit per participant (mutual TLS)",
        description="Create a federation's kits in --out from --federation FILE or the flags; "
        "or change an existing one with --add-site, --renew or --revoke (docs/security.md).",
    )
    provision.add_argument("--out", required=True, help="the federation's folder")
    provision.add_argument(
        "--federation", help="federation.yaml (job_id and sites, or jobs; broker_hosts…)"
    )
    provision.add_argument("--job", help="job id")
    provision.add_argument("--sites", help="site ids, comma-separated")
    provision.add_argument(
        "--broker-host", action="append", help="broker host name or IP (repeatable)"
    )
    provision.add_argument("--port", type=int, help="broker TLS port (default 8883)")
    provision.add_argument("--validity-days", type=float, help="certificate lifetime (30)")
    provision.add_argument("--bind-address", help="the broker listens on this address only")
    provision.add_argument("--broker-user", help="the OS user Mosquitto runs as")
    change = provision.add_mutually_exclusive_group()
    change.add_argument(
        "--add-site", metavar="SITE", help="issue a new site's kit (SITE@JOB with several jobs)"
    )
    change.add_argument(
        "--renew", metavar="ID", help="renew broker, aggregator or a site (PARTY@JOB: one job's)"
    )
    change.add_argument(
        "--revoke",
        metavar="SITE",
        help="revoke a site: CRL, ACL, aggregator (SITE@JOB: from one job; SITE: from every job)",
    )
    provision.add_argument(
        "--helm",
        action="store_true",
        help="also write DIR/helm: values and Secret manifests for both charts (kept current by "
        "every later change); on an existing folder, the broker certificate is renewed to name "
        "its in-cluster service",
    )
    provision.add_argument(
        "--helm-namespace", default="medsplit", help="the Kubernetes namespace (medsplit)"
    )
    provision.set_defaults(func=_cmd_provision)


def _add_model_commands(commands: Any) -> None:
    """``export`` and ``serve``: a site's trained model, after the job."""
    export = commands.add_parser(
        "export", help="export a site's trained model to ONNX (checked against torch)"
    )
    export.add_argument(
        "--run", required=True, help="the run directory (RUN/state/SITE), or a site's state_dir"
    )
    export.add_argument("--site", help="site id (needed for a run directory of several sites)")
    export.add_argument(
        "--out",
        required=True,
        help="the .onnx file to write; with --format triton or kserve, a folder",
    )
    export.add_argument(
        "--format",
        choices=["onnx", "triton", "kserve"],
        default="onnx",
        help="onnx: one file; triton: a model repository (NAME/config.pbtxt, NAME/1/model.onnx); "
        "kserve: that repository and an InferenceService for KServe's ONNX runtime",
    )
    export.add_argument("--name", help="the served model's name (default: the site's id)")
    export.add_argument(
        "--storage-uri", help="kserve: where the repository will lie (s3://, gs://, pvc://...)"
    )
    export.add_argument(
        "--max-batch", type=int, default=64, help="triton and kserve: the largest batch served"
    )
    export.set_defaults(func=_cmd_export)

    joint = commands.add_parser(
        "export-joint",
        help="vertical jobs: the label party's top.onnx and every other party's head.onnx as "
        "one model, if every party agreed (joint_export: true)",
    )
    joint.add_argument("--top", required=True, help="the label party's state/top.onnx")
    joint.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="PARTY=PATH",
        help="another party's head.onnx, as that party sent it (once per party)",
    )
    joint.add_argument("--out", required=True, help="the .onnx file to write")
    joint.set_defaults(func=_cmd_export_joint)

    serve = commands.add_parser(
        "serve",
        help="serve an exported model over HTTP (onnxruntime): /predict and the Open Inference "
        "Protocol (/v2)",
    )
    serve.add_argument("--model", required=True, help="a model.onnx written by medsplit")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda fails if unavailable"
    )
    serve.add_argument("--threads", type=int, default=0, help="per inference (0: automatic)")
    serve.add_argument(
        "--name",
        help="the model's name in the Open Inference Protocol, /v2/models/NAME (default: the "
        "ONNX file's stem)",
    )
    serve.add_argument(
        "--grpc-port",
        type=int,
        default=8081,
        help="the Open Inference Protocol over gRPC (GRPCInferenceService), same TLS as HTTP",
    )
    serve.add_argument("--no-grpc", action="store_true", help="serve REST only")
    serve.add_argument("--max-batch", type=int, default=64, help="inputs per batch request")
    serve.add_argument("--max-body-mb", type=int, default=64, help="largest request body")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, help="and this private key (PEM)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )
    serve.set_defaults(func=_cmd_serve)

    wait = commands.add_parser(
        "await-model",
        help="wait until a job writes its model.onnx, then check it loads (a serving pod's "
        "init container)",
    )
    wait.add_argument("--model", required=True, help="the model.onnx the agent will write")
    wait.add_argument("--timeout", type=float, default=0, help="seconds; 0: wait for ever")
    wait.set_defaults(func=_cmd_await_model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_format)
    if args.command is None:
        parser.print_help()
        return 0
    from medsplit.transport.base import TransportError

    try:
        status: int = args.func(args)
    except (ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TransportError as exc:  # expected (an unreachable broker): one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status
