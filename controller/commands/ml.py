"""``flowtruth train|evaluate|predict|report|dataset``: classifiers over labelled bi-flows.

A thin front end over :mod:`analysis.ml`; pandas, scikit-learn and matplotlib are
imported inside the command bodies so that ``flowtruth --help`` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from analysis.ml.datasets import DatasetFilter
    from analysis.ml.evaluate import TrainConfig


class Task(StrEnum):
    app = "app"
    genre = "genre"
    ovr = "ovr"


class Model(StrEnum):
    rf = "rf"
    extratrees = "extratrees"
    hgb = "hgb"
    knn = "knn"
    majority = "majority"


class Protocol(StrEnum):
    kfold = "kfold"
    cross_device = "cross-device"
    cross_activity = "cross-activity"


class Split(StrEnum):
    session = "session"
    flow = "flow"


class DatasetFormat(StrEnum):
    mirage2022 = "mirage2022"
    parquet = "parquet"


DataArg = Annotated[
    list[Path],
    typer.Argument(help="MIRAGE JSON files or folders, flowtruth Parquet files or folders"),
]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="output directory")]
FeaturesOpt = Annotated[
    str,
    typer.Option(
        "--features", help="feature sets, comma-separated: stats, series, counters or all"
    ),
]
WithEndpointsOpt = Annotated[
    bool,
    typer.Option(
        "--with-endpoints",
        help="also use server port and address (lets a model learn the "
        "labeller; for comparison only)",
    ),
]
SeriesOpt = Annotated[int, typer.Option("--packets", help="packets in the series features")]
TaskOpt = Annotated[
    Task,
    typer.Option(
        "--task",
        help="app: which app; genre: encrypted messaging app or not; ovr: one-vs-rest per app",
    ),
]
ModelOpt = Annotated[Model, typer.Option("--model", help="classifier")]
TreesOpt = Annotated[
    int, typer.Option("--trees", help="trees (rf, extratrees) or boosting iterations (hgb)")
]
MessagingOpt = Annotated[
    list[str],
    typer.Option(
        "--messaging-app",
        help="an app label counted as encrypted messaging (repeatable; adds "
        "to Signal, Telegram, WhatsApp and their packages)",
    ),
]
LabelTypeOpt = Annotated[
    list[str],
    typer.Option("--labeling-type", help="keep only flows of this BF_labeling_type (repeatable)"),
]
MinPacketsOpt = Annotated[int, typer.Option("--min-packets", help="drop flows with fewer packets")]
KeepDnsOpt = Annotated[bool, typer.Option("--keep-dns", help="keep port-53 flows")]
KeepBgOpt = Annotated[
    bool, typer.Option("--keep-background", help="keep unlabelled, ambiguous and resolver flows")
]
TargetOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--target-app-only", help="tcbench's rule: a flow not of its session's app is background"
    ),
]
HandshakeOpt = Annotated[
    bool, typer.Option("--require-handshake", help="drop TCP flows that do not start SYN, SYN-ACK")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
PermOpt = Annotated[
    int,
    typer.Option(
        "--permutations", help="repeats of the grouped permutation importance (0: skip it)"
    ),
]


def _filter(
    labeling_type: LabelTypeOpt = [],  # noqa: B006
    min_packets: MinPacketsOpt = 0,
    keep_dns: KeepDnsOpt = False,
    keep_background: KeepBgOpt = False,
    target_app_only: TargetOnlyOpt = False,
    require_handshake: HandshakeOpt = False,
) -> DatasetFilter:
    """The dataset filter of the options every command that loads flows takes."""
    from analysis.errors import BadInputError
    from analysis.ml.datasets import DatasetFilter

    if min_packets < 0:
        raise BadInputError("--min-packets must not be negative")
    return DatasetFilter(
        labeling_types=tuple(labeling_type),
        min_packets=min_packets,
        drop_background=not keep_background,
        background_is_other_apps=target_app_only,
        drop_dns=not keep_dns,
        require_handshake=require_handshake,
    )


def _config(
    task: TaskOpt = Task.app,
    features: FeaturesOpt = "stats",
    model: ModelOpt = Model.rf,
    trees: TreesOpt = 200,
    packets: SeriesOpt = 20,
    with_endpoints: WithEndpointsOpt = False,
    messaging_app: MessagingOpt = [],  # noqa: B006
    *,
    seed: int,
    permutations: int = 3,
) -> TrainConfig:
    """The training configuration of the model options (``seed`` and ``permutations``
    are options of their own, listed after the dataset filter's)."""
    from analysis.errors import BadInputError
    from analysis.ml.evaluate import TrainConfig
    from analysis.ml.features import FeatureSpec, parse_sets
    from analysis.ml.models import DEFAULT_MESSAGING_APPS

    if trees < 1 or packets < 1 or permutations < 0:
        raise BadInputError("--trees and --packets must be positive, --permutations not negative")
    spec = FeatureSpec(parse_sets(features), packets, with_endpoints)
    return TrainConfig(
        task=task.value,
        kind=model.value,
        features=spec,
        n_estimators=trees,
        seed=seed,
        messaging_apps=(*DEFAULT_MESSAGING_APPS, *messaging_app),
        permutation_repeats=permutations,
    )


# A command parameter whose default is one of these stands for the builder's options.
FilterBuilder = Callable[[], "DatasetFilter"]
ConfigBuilder = Callable[..., "TrainConfig"]
_OPTION_GROUPS = (_filter, _config)


def _params(fn: Callable[..., object]) -> list[inspect.Parameter]:
    """``fn``'s parameters with their annotations evaluated, as typer needs them (they are
    strings here; the return annotation may name a lazily imported type, so not that)."""
    return [
        p.replace(annotation=eval(p.annotation, fn.__globals__))
        if isinstance(p.annotation, str)
        else p
        for p in inspect.signature(fn).parameters.values()
    ]


def _option_groups(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the options of each option group it takes.

    A parameter whose default is a builder of ``_OPTION_GROUPS`` is replaced, in its
    place (``--help`` lists options in order), by the builder's typer parameters; the
    command receives the builder bound to their values and calls it where it needs the
    value, so a bad option is reported where it always was.
    """
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[Callable[..., object], list[str]]] = {}
    for p in _params(command):
        if not any(p.default is g for g in _OPTION_GROUPS):
            params.append(p)
            continue
        fields = [q for q in _params(p.default) if q.kind is q.POSITIONAL_OR_KEYWORD]
        groups[p.name] = (p.default, [q.name for q in fields])
        params += fields

    @functools.wraps(command)
    def run(**kwargs: object) -> None:
        for name, (build, fields) in groups.items():
            kwargs[name] = functools.partial(build, **{f: kwargs.pop(f) for f in fields})
        command(**kwargs)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def _say(msg: str) -> None:
    sys.stderr.write(f"flowtruth: {msg}\n")


def _print_event(event: object) -> None:
    """The CLI's sink for the protocol's typed events: one stderr line each."""
    from analysis.ml.evaluate import FoldFinished, FoldStarted

    if isinstance(event, FoldFinished):
        _say(
            f"{event.protocol} {event.index + 1}/{event.total}: accuracy "
            f"{event.accuracy:.3f}, macro-F1 {event.macro_f1:.3f}"
        )
    elif isinstance(event, FoldStarted):
        _say(f"{event.protocol} {event.index + 1}/{event.total}: {event.description}")


def _load(data, flt):
    from analysis.ml.datasets import card_text, load_dataset

    ds = load_dataset(data, flt)
    sys.stdout.write(card_text(ds.card()) + "\n")
    return ds


def _headline(m: dict) -> str:
    if m.get("warning"):
        _say(f"warning: {m['warning']}")
    s = (
        f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
        f"weighted-F1 {m['weighted_f1']:.3f}"
    )
    if "roc" in m.get("binary", {}):
        s += f", ROC AUC {m['binary']['roc']['auc']:.3f}"
    for kind in ("permutation", "impurity"):
        f = m.get("importance", {}).get(kind, {}).get("finding") or {}
        if f.get("top_group"):
            s += f"; top feature group ({kind}): {f['top_group']}"
            break
    return s


def register(app: typer.Typer) -> None:
    @app.command("train")
    @_option_groups
    def train(
        data: DataArg,
        out: OutOpt,
        make_config: ConfigBuilder = _config,
        cv: Annotated[
            int,
            typer.Option(
                "--cv",
                help="session-grouped folds for the report's "
                "metrics (0: score the training data, optimistic)",
            ),
        ] = 5,
        make_filter: FilterBuilder = _filter,
        seed: SeedOpt = 0,
        permutations: PermOpt = 3,
    ) -> None:
        """Train a classifier on labelled flows; writes the model, metrics.json and a report."""
        from analysis.ml.datasets import write_card
        from analysis.ml.evaluate import evaluate_model, run_protocol
        from analysis.ml.features import build_features, feature_infos
        from analysis.ml.models import fit_model, save_model, task_labels
        from analysis.ml.report import write_report

        cfg = make_config(seed=seed, permutations=permutations)
        ds = _load(data, make_filter())
        X = build_features(ds.frame, cfg.features)
        y = task_labels(ds.frame["app"], cfg.task, cfg.messaging_apps)
        trained = fit_model(
            X,
            y,
            cfg.kind,
            cfg.task,
            cfg.features,
            [f.name for f in feature_infos(cfg.features)],
            cfg.n_estimators,
            cfg.seed,
            cfg.n_jobs,
            cfg.messaging_apps,
        )
        card = ds.card()
        trained.fingerprint = card["fingerprint"]
        trained.dataset_card = card
        save_model(trained, out)
        if cv >= 2:
            _say(f"scoring with {cv}-fold cross-validation grouped by session")
            metrics = run_protocol(ds, "kfold", cfg, folds=cv, sink=_print_event).metrics
        else:
            metrics = evaluate_model(trained, ds, permutations).metrics
        report = write_report(metrics, out, "flowtruth train")
        write_card(card, out)
        sys.stdout.write(f"{_headline(metrics)}\nmodel and report in {out} ({report.name})\n")

    @app.command("evaluate")
    @_option_groups
    def evaluate(
        inputs: Annotated[
            list[Path],
            typer.Argument(help="MODEL_DIR then DATA..., or with --protocol only DATA..."),
        ],
        out: OutOpt,
        protocol: Annotated[
            Optional[Protocol],  # noqa: UP045
            typer.Option(
                "--protocol", help="train and test within DATA instead of testing a model"
            ),
        ] = None,
        train_on: Annotated[
            list[str],
            typer.Option(
                "--train-on", help="device/activity to train on (repeatable; cross-* protocols)"
            ),
        ] = [],  # noqa: B006
        test_on: Annotated[
            list[str], typer.Option("--test-on", help="device/activity to test on (repeatable)")
        ] = [],  # noqa: B006
        folds: Annotated[int, typer.Option("--folds", help="k of the k-fold protocol")] = 5,
        split_by: Annotated[
            Optional[Split],  # noqa: UP045
            typer.Option(
                "--split-by",
                help="kfold groups: session (flows of a capture stay together, the "
                "default) or flow (leaky, for comparison only)",
            ),
        ] = None,
        make_config: ConfigBuilder = _config,
        make_filter: FilterBuilder = _filter,
        seed: SeedOpt = 0,
        permutations: PermOpt = 3,
    ) -> None:
        """Test a trained model on DATA, or run a protocol (kfold, cross-device, cross-activity)."""
        from analysis.errors import BadInputError
        from analysis.ml.datasets import write_card
        from analysis.ml.evaluate import evaluate_model, run_protocol
        from analysis.ml.models import load_model
        from analysis.ml.report import write_report

        flt = make_filter()
        if protocol is None:
            if len(inputs) < 2 or not (inputs[0] / "model.json").is_file():
                raise BadInputError(
                    "evaluate needs MODEL_DIR DATA..., or --protocol with DATA",
                    hint=f"{inputs[0]} is not a model directory (no model.json)",
                )
            trained = load_model(inputs[0])
            ds = _load(inputs[1:], flt)
            metrics = evaluate_model(trained, ds, permutations).metrics
        else:
            if (train_on or test_on) and protocol == Protocol.kfold:
                raise BadInputError("--train-on/--test-on go with cross-device or cross-activity")
            cfg = make_config(seed=seed, permutations=permutations)
            ds = _load(inputs, flt)
            if split_by is not None and protocol != Protocol.kfold:
                raise BadInputError("--split-by goes with --protocol kfold")
            metrics = run_protocol(
                ds,
                protocol.value,
                cfg,
                folds,
                train_on,
                test_on,
                sink=_print_event,
                split_by=(split_by or Split.session).value,
            ).metrics
        report = write_report(metrics, out, f"flowtruth evaluate ({metrics['protocol']})")
        write_card(ds.card(), out)
        sys.stdout.write(f"{_headline(metrics)}\nreport in {report}\n")

    @app.command("predict")
    def predict(
        model_dir: Annotated[Path, typer.Argument(help="a model directory from flowtruth train")],
        inputs: Annotated[
            list[Path] | None,
            typer.Argument(
                help="pcap/pcapng, MIRAGE JSON, Parquet, or a folder of them"
            ),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option("-o", "--out", help="predictions file: .csv, .parquet or .json"),
        ] = None,
        store: Annotated[
            Path | None,
            typer.Option(
                "--store",
                help="a campus flow store: score every flow in place (prediction columns "
                "written back) and report the messaging share per hour with a plot",
            ),
        ] = None,
        workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes (--store)")] = 1,
        scheduler: Annotated[
            str | None, typer.Option("--scheduler", help="Dask scheduler tcp://HOST:PORT (--store)")
        ] = None,
        plot: Annotated[
            Path | None,
            typer.Option("--plot", help="PNG of the hourly share (--store; default STORE/messaging_share.png)"),
        ] = None,
    ) -> None:
        """Per-flow predictions with class probabilities (files), or score a flow store."""
        from analysis.errors import BadInputError

        if store is not None:
            if inputs or out is not None:
                raise BadInputError(
                    "give either --store DIR or INPUTS... -o FILE, not both",
                    "flowtruth predict MODEL --store DIR  |  flowtruth predict MODEL IN... -o OUT",
                )
            from controller.commands.campus import predict_store_command

            predict_store_command(model_dir, store, workers=workers, scheduler=scheduler, plot=plot)
            return
        if not inputs or out is None:
            raise BadInputError(
                "nothing to predict", "give INPUTS... -o FILE, or --store DIR for a flow store"
            )
        from analysis.ml.predict import predict_inputs, write_predictions

        frame, summary = predict_inputs(model_dir, inputs)
        path = write_predictions(frame, out)
        counts = ", ".join(f"{k} {v:,}" for k, v in summary.items())
        sys.stdout.write(f"{len(frame):,} flows predicted ({counts}) -> {path}\n")

    @app.command("report")
    def report(
        source: Annotated[Path, typer.Argument(help="metrics.json or a report directory")],
        out: OutOpt,
        data: Annotated[
            list[Path],
            typer.Option(
                "--data", help="dataset to redraw the per-app distributions from (repeatable)"
            ),
        ] = [],  # noqa: B006
    ) -> None:
        """Render the HTML report and plots of a metrics.json again (e.g. into a new folder)."""
        from analysis.ml.evaluate import distributions
        from analysis.ml.report import load_metrics, write_report

        metrics = load_metrics(source)
        if data:
            from analysis.ml.datasets import load_dataset

            ds = load_dataset(data)
            metrics["distributions"] = distributions(ds.frame)
            metrics["dataset"] = ds.card()
        path = write_report(metrics, out, f"flowtruth report ({metrics.get('protocol', '?')})")
        sys.stdout.write(f"{_headline(metrics)}\nreport in {path}\n")

    dataset_app = typer.Typer(help="Build and describe datasets.", no_args_is_help=True)
    app.add_typer(dataset_app, name="dataset")

    @dataset_app.command("ndpi")
    def dataset_ndpi(
        out: Annotated[Path, typer.Argument(help="output folder")],
        pcaps: Annotated[
            Path, typer.Option("--pcaps", help="folder with nDPI's captures and flow_labels.csv")
        ] = Path("../shared/data/ndpi_pcaps"),
        fmt: Annotated[
            DatasetFormat, typer.Option("--format", help="output layout")
        ] = DatasetFormat.mirage2022,
    ) -> None:
        """Label nDPI's captures from flow_labels.csv (nDPI's opinion) into a dataset."""
        from analysis.ml.ndpi import build_ndpi_dataset

        summary = build_ndpi_dataset(pcaps, out, fmt.value)
        for cap, why in summary.skipped.items():
            _say(f"warning: {cap}: {why}")
        sys.stdout.write(f"{summary.line()} -> {out}\n")

    @dataset_app.command("card")
    @_option_groups
    def dataset_card(
        data: DataArg,
        out: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option("-o", "--out", help="folder for dataset_card.json/.txt"),
        ] = None,
        make_filter: FilterBuilder = _filter,
    ) -> None:
        """Print (and save) the counts per app, device, activity and labelling type."""
        from analysis.ml.datasets import write_card

        ds = _load(data, make_filter())
        if out is not None:
            sys.stdout.write(f"card in {write_card(ds.card(), out)}\n")
