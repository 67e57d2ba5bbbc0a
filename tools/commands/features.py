"""`loyalty features export`: profile's feature matrix as Parquet, for engines off the service.

    export  profile StreamFeatures, written chunk by chunk as Parquet files (member_id and one
            float64 column per feature) with `_export.json` beside them; the matrix is never held
            whole, so memory stays at one file's rows whatever the population

Used by `loyalty evaluate --engine spark`, which exports the policy's features then runs the
scoring kernel on Spark over the files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from tools.ops import EXIT_OK, EXIT_UNREACHABLE, CommandError, add_action, add_group, call, time_argument

PROFILE = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"]
EXPORT_MANIFEST = "_export.json"
ROWS_PER_FILE = 1_000_000  # ~1M members × a dozen float64 columns: a 100 MB file, Spark's sweet spot
CHUNK_SIZE = 20_000
_RESUMES_MAX = 3


@dataclass
class Export:
    directory: Path
    as_of: datetime
    features: list[str]
    members: int
    files: int


class _Writer:
    """Parquet files of at most ROWS_PER_FILE rows, one row group per streamed chunk."""

    def __init__(self, directory: Path, names: Sequence[str], rows_per_file: int) -> None:
        import pyarrow as pa

        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        self._directory, self._names, self._rows_per_file = directory, list(names), rows_per_file
        self._schema = pa.schema([("member_id", pa.string()), *((n, pa.float64()) for n in names)])
        self._writer: Any = None
        self._rows = 0
        self.files = 0
        self.members = 0

    def write(self, member_ids: Sequence[str], columns: Sequence[Sequence[float]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None or self._rows >= self._rows_per_file:
            self.close()
            self._writer = pq.ParquetWriter(self._directory / f"part-{self.files:05d}.parquet", self._schema)
            self.files += 1
            self._rows = 0
        count = len(member_ids)
        arrays = [pa.array(member_ids, type=pa.string()),
                  *(pa.array(np.fromiter(c, dtype=np.float64, count=count)) for c in columns)]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        self._rows += count
        self.members += count

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, as_of: datetime) -> Export:
        """Close the last file and write the manifest: its presence means the export is whole."""
        self.close()
        manifest = {"as_of": as_of.isoformat(), "features": self._names, "members": self.members, "files": self.files}
        (self._directory / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return Export(self._directory, as_of, self._names, self.members, self.files)


async def export_features(stub: Any, names: Sequence[str], as_of: datetime, directory: Path,
                          deadline_s: float, rows_per_file: int = ROWS_PER_FILE) -> Export:
    """Stream the matrix as of `as_of` into `directory` (emptied first); a cut stream resumes after
    the last member written."""
    writer = _Writer(directory, names, rows_per_file)
    last, resumes = "", 0
    try:
        while True:
            request = profile_service_pb2.StreamFeaturesRequest(feature_names=list(names), chunk_size=CHUNK_SIZE,
                                                                start_after_member_id=last)
            request.as_of.FromDatetime(as_of)
            try:
                async for message in stub.StreamFeatures(request, timeout=deadline_s):
                    chunk = message.chunk
                    if message.HasField("chunk") and chunk.member_ids:
                        by_name = {c.feature_name: c.values for c in chunk.columns}
                        writer.write(chunk.member_ids, [by_name[n] for n in names])
                        last = chunk.member_ids[-1]
                    if message.last:
                        return writer.finish(as_of)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or resumes >= _RESUMES_MAX:
                    raise
            resumes += 1
            if resumes > _RESUMES_MAX:
                raise CommandError("profile kept ending the feature stream before its last chunk", EXIT_UNREACHABLE)
    finally:
        writer.close()


def _cmd_export(args: argparse.Namespace) -> int:
    as_of = args.as_of or datetime.now(UTC)
    export: Export = call(args, "profile", profile_service_pb2_grpc.ProfileServiceStub, PROFILE,
                          lambda stub: export_features(stub, args.feature, as_of, args.out, args.timeout))
    print(f"Exported {export.members:,} members × {len(export.features)} features as of {as_of.isoformat()} "
          f"to {export.directory} ({export.files} Parquet file(s)).")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "features", "export profile's feature matrix")
    export = add_action(actions, "export", _cmd_export, "the feature matrix as Parquet (profile StreamFeatures)",
                        "Write the feature matrix as of a time to a directory as Parquet files (member_id and one "
                        "float64 column per feature), streamed chunk by chunk, and _export.json beside them. The "
                        "directory is emptied first.", timeout_s=3600.0)
    export.add_argument("--feature", action="append", required=True, metavar="NAME",
                        help="a feature to export (repeat; see profile's ListFeatures)")
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.add_argument("--as-of", type=time_argument, help="features as of this time (default: now)")
