"""Datasets, classifiers, evaluation protocols and reports over labelled bi-flows.

``datasets`` loads MIRAGE JSON, Parquet and captures into one pandas table;
``features`` turns it into feature matrices; ``models`` trains, saves and reloads
classifiers; ``evaluate`` runs the protocols (session k-fold, cross-device,
cross-activity); ``report`` writes ``metrics.json`` and a self-contained HTML report;
``ndpi`` builds a labelled dataset from the nDPI captures. pandas, scikit-learn and
matplotlib are imported by these modules, never by ``analysis`` itself.
"""
