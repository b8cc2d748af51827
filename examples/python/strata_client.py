"""A Strata client for model servers, in Python with grpcio.

Copy this file next to your model server. It generates the gRPC stubs from
Strata's proto/ on first use (grpcio-tools), keeps one channel per process,
sends a deadline with every call, and turns rows into plain dicts.

    pip install grpcio grpcio-tools
    python examples/python/strata_client.py 127.0.0.1:50051 user_features user_000001 user_000002
    python examples/python/strata_client.py 127.0.0.1:50051 --service ranker_v1 user_id=user_000001 item_id=8485,5676

The test suite runs this file against a real stack (tests/operations.rs).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from typing import Any

import grpc

_HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.environ.get("STRATA_PROTO_DIR", os.path.join(_HERE, "..", "..", "proto"))


def _stubs():
    """Imports (generating them first if needed) the strata.v1 modules."""
    proto = os.path.join(PROTO_DIR, "strata", "v1", "feature_store.proto")
    with open(proto, "rb") as f:
        version = hashlib.sha256(f.read()).hexdigest()[:12]
    # Keyed by the proto's content, so a changed API regenerates them.
    out = os.path.join(tempfile.gettempdir(), f"strata-python-stubs-{version}")
    if out not in sys.path:
        sys.path.insert(0, out)
    try:
        return (importlib.import_module("strata.v1.feature_store_pb2"),
                importlib.import_module("strata.v1.feature_store_pb2_grpc"))
    except ImportError:
        pass
    from grpc_tools import protoc
    import grpc_tools

    os.makedirs(out, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}",
            proto]
    if protoc.main(args) != 0:
        raise RuntimeError(f"generating stubs from {PROTO_DIR} failed")
    for package in ("strata", os.path.join("strata", "v1")):
        open(os.path.join(out, package, "__init__.py"), "a").close()
    importlib.invalidate_caches()
    return (importlib.import_module("strata.v1.feature_store_pb2"),
            importlib.import_module("strata.v1.feature_store_pb2_grpc"))


pb, pb_grpc = _stubs()


def _value(v) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "float_list_value":
        return list(v.float_list_value.values)
    if kind == "int64_list_value":
        return list(v.int64_list_value.values)
    if kind == "timestamp_value":
        return v.timestamp_value.ToDatetime(tzinfo=timezone.utc)
    return getattr(v, kind)


class StrataClient:
    """One channel per process; thread-safe, like the grpcio channel under it."""

    def __init__(self, target: str, timeout: float = 0.05, client_id: str | None = None,
                 ca_file: str | None = None, token: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None):
        """TLS when ca_file (the CA the server's certificate chains to) or a
        client certificate (cert_file and key_file, for mutual TLS) is given;
        token is sent as `authorization: Bearer <token>` with every call."""
        # Keepalive notices a dead connection between calls; round_robin
        # spreads calls over every address a DNS name resolves to (a
        # headless Kubernetes Service, for one).
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if ca_file or cert_file:
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(ca_file) if ca_file else None,
                private_key=read(key_file) if key_file else None,
                certificate_chain=read(cert_file) if cert_file else None,
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._timeout = timeout
        metadata = []
        if client_id:
            metadata.append(("x-client-id", client_id))
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(metadata)

    def get(self, view: str, keys: list[str], features: list[str] | None = None) -> list[dict]:
        """Rows in request order: entity_key, status (FOUND, NOT_FOUND, STALE,
        UNAVAILABLE, OUTSIDE_MAX_AGE), source (L1, L2, L3), event_time and
        features as a dict. A STALE or UNAVAILABLE row is an answer, not an
        error: decide per row whether the model can use it."""
        request = pb.GetFeaturesRequest(feature_view=view, entity_keys=keys, features=features or [])
        response = self._stub.GetFeatures(request, timeout=self._timeout, metadata=self._metadata)
        rows = []
        for row in response.rows:
            rows.append({
                "entity_key": row.entity_key,
                "status": pb.RowStatus.Name(row.status),
                "source": pb.Source.Name(row.source),
                "event_time": row.event_time.ToJsonString() if row.HasField("event_time") else None,
                "features": {name: _value(v) for name, v in zip(response.features, row.values)},
            })
        return rows

    def vectors(self, entities: dict[str, list], service: str | None = None,
                features: list[str] | None = None, full_feature_names: bool = False) -> list[dict]:
        """Features of many views in one call, by a feature service or by
        `view:feature` references, for entity rows given column-wise: one list
        per join key, all as long (ints are int64 join keys, str string ones,
        bytes bytes ones). One dict per entity row, in order: `features`
        (name -> value), `statuses` (name -> PRESENT, NULL_VALUE,
        ENTITY_NOT_FOUND, STALE_VALUE, VALUE_UNAVAILABLE,
        VALUE_OUTSIDE_MAX_AGE) and `sources` (name -> L1, L2, L3)."""
        def key(value):
            if isinstance(value, bool):
                raise TypeError("a join key cannot be a bool")
            if isinstance(value, int):
                return pb.Value(int64_value=value)
            if isinstance(value, bytes):
                return pb.Value(bytes_value=value)
            return pb.Value(string_value=str(value))

        # Grouped: each view's values come once per distinct key (a user's
        # once, not once per candidate item), and are spread over the rows here.
        request = pb.GetFeatureVectorsRequest(
            feature_service=service or "", features=features or [], full_feature_names=full_feature_names,
            grouped=True)
        for name, values in entities.items():
            request.entities[name].values.extend(key(v) for v in values)
        response = self._stub.GetFeatureVectors(request, timeout=self._timeout, metadata=self._metadata)
        rows = len(next(iter(entities.values()), []))
        out = [{"features": {}, "statuses": {}, "sources": {}} for _ in range(rows)]
        names = list(response.feature_names)
        for group in response.groups:
            keys = [{
                "features": [_value(v) for v in key.values],
                "statuses": [pb.FeatureStatus.Name(s) for s in key.statuses],
                "sources": [pb.Source.Name(key.source)] * len(key.values),
            } for key in group.keys]
            for row, index in zip(out, group.row_keys):
                for i, at in enumerate(group.features):
                    for part in ("features", "statuses", "sources"):
                        row[part][names[at]] = keys[index][part][i]
        # In answer order, whatever the groups' order.
        return [{part: {n: row[part][n] for n in names} for part in row} for row in out]

    def views(self) -> list[str]:
        response = self._stub.ListFeatureViews(pb.ListFeatureViewsRequest(), timeout=self._timeout)
        return [v.name for v in response.views]

    def close(self) -> None:
        self._channel.close()


def _join_keys(args: list[str]) -> dict[str, list]:
    """`name=v,v,...` arguments as columns; digits are int64 values, and a
    single value is used for every row."""
    columns = {}
    for arg in args:
        name, _, values = arg.partition("=")
        columns[name] = [int(v) if v.lstrip("-").isdigit() else v for v in values.split(",")]
    rows = max(len(v) for v in columns.values())
    return {name: v * rows if len(v) == 1 else v for name, v in columns.items()}


def _json_default(value: Any) -> Any:
    """Timestamps as RFC 3339, bytes as base64, for printing rows as JSON."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print("usage: strata_client.py HOST:PORT VIEW KEY...\n"
              "       strata_client.py HOST:PORT --service NAME JOIN_KEY=VALUE[,VALUE...]...", file=sys.stderr)
        return 2
    # TLS and a token as the strata CLI takes them.
    client = StrataClient(argv[1], timeout=2.0, client_id="python-example",
                          ca_file=os.environ.get("STRATA_CA_FILE"), token=os.environ.get("STRATA_TOKEN"))
    try:
        if argv[2] == "--service":
            rows = client.vectors(_join_keys(argv[4:]), service=argv[3])
        else:
            rows = client.get(argv[2], argv[3:])
        for row in rows:
            print(json.dumps(row, default=_json_default))
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
