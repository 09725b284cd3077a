"""Campus Wi-Fi header captures: anonymisation, ingest into a flow store, queries, scoring.

* :mod:`.anonymise` - keyed prefix-preserving Crypto-PAn for IPv4 and IPv6;
* :mod:`.ingest` - rotated pcaps to the store in parallel workers (local or Dask);
* :mod:`.join` - flows cut by file rotation joined across file boundaries;
* :mod:`.store` - the Parquet dataset (``date=/hour=`` partitions) and its manifest;
* :mod:`.query` - DuckDB SQL and the hourly summary over a store;
* :mod:`.mongo` - MongoDB as an optional sink (idempotent upserts by flow id);
* :mod:`.predict` - scoring every stored flow with a trained model.
"""
