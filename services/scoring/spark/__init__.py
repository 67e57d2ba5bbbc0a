"""Tier evaluation on Apache Spark: the scoring kernel run over partitions of a Parquet export of the
feature matrix, and the result set that scoring imports as an evaluation run. See README.md in the
scoring service."""
