"""Datasets, classifiers, evaluation protocols and reports over labelled bi-flows.

``datasets`` loads MIRAGE JSON (2019/2020/2022/2024 layouts), flowtruth Parquet and
captures into one pandas table; ``features`` turns it into feature matrices;
``models`` trains, saves (skops + sha256-checked ``model.json``) and reloads
classifiers; ``evaluate`` runs the protocols (session-grouped k-fold, cross-device,
cross-activity) and groups feature importance by direction and family; ``report``
writes ``metrics.json`` and a self-contained HTML report; ``predict`` scores new
flows; ``ndpi`` builds a labelled dataset from nDPI's captures. pandas, scikit-learn
and matplotlib are imported by these modules, never by ``analysis`` itself.

From Python (the CLI's ``dataset ndpi`` / ``evaluate --protocol kfold`` do the same)::

    from analysis.ml.ndpi import build_ndpi_dataset
    from analysis.ml.datasets import load_dataset
    from analysis.ml.evaluate import TrainConfig, run_protocol
    from analysis.ml.report import write_report

    build_ndpi_dataset("../shared/data/ndpi_pcaps", "ndpi_ds")
    ds = load_dataset(["ndpi_ds"])
    ev = run_protocol(ds, "kfold", TrainConfig(task="genre"))
    write_report(ev.metrics, "report")
"""
