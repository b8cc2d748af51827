"""Drives Feast's own SDK (the pinned feast package) for tests/feast.rs.

usage: sdk.py REPO STEPS

STEPS is a JSON list of steps, each {"cmd": COMMAND, ...}; the script runs
them in order with one FeatureStore (importing feast takes seconds) and
prints a JSON list of their results:
  seed         {"files": {NAME: rows}}: writes REPO/data/NAME.parquet
  synth        {"n": N, "at": ISO}: writes N generated rows of each view's Parquet
               (drivers 1..N, customers cN, pairs (i, ci)), all at one event time
  read         {"features": [...] | "service": NAME, "entities": {...}, "full": bool}:
               get_online_features(): {"dict": to_dict(), "statuses": {name: [status, ...]}}
  write        {"view": NAME, "rows": {...}}: write_to_online_store
  push         {"source": NAME, "rows": {...}}: push to the online store
  materialize  {"start": ISO, "end": ISO}: every view, by Feast's engine here; its seconds
  feast_materialize  the same by store.materialize() (a remote store's server does it)
  post         {"path": "/push", "body": ...}: a raw POST to the online store; its status and body
  grpc         {"addr": HOST:PORT, "calls": [{"service", "method", "request"}]}: Feast's generated
               gRPC stubs; per call {"ok": answer} or {"code": STATUS, "details": TEXT}

Rows are column-wise; "event_timestamp", "created" and "seen" columns are ISO 8601
in UTC. In results, datetimes are Unix seconds: Feast 0.67's remote client
gives a timestamp feature as the seconds it reads (as from Feast's own server),
its Redis store as a datetime.
A step that raises gives {"error": CLASS, "message": TEXT} and the next
steps still run, so the test can check which exception the SDK raised.
"""

import base64
import json
import sys
import time
from datetime import datetime

import pandas as pd
from feast import FeatureStore
from feast.protos.feast.serving.ServingService_pb2 import FieldStatus


def frame(rows):
    df = pd.DataFrame(rows)
    for column in ("event_timestamp", "created", "seen"):
        if column in df:
            df[column] = pd.to_datetime(df[column], utc=True)
    if "raw" in df:
        df["raw"] = [None if v is None else base64.b64decode(v) for v in df["raw"]]
    return df


class _Quiet:
    """A progress bar that shows nothing."""

    def update(self, n):
        pass

    def close(self):
        pass


def plain(value):
    """A to_dict() value as JSON: bytes in base64, datetimes in Unix seconds,
    floats as they are."""
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return value


def step(store, repo, arg):
    command = arg["cmd"]
    if command == "seed":
        for name, rows in arg["files"].items():
            frame(rows).to_parquet(f"{repo}/data/{name}.parquet")
        return {"ok": True}
    if command == "synth":
        n, at = arg["n"], pd.Timestamp(arg["at"], tz="UTC")
        ids = pd.Series(range(1, n + 1), dtype="int64")
        customers = [f"c{i}" for i in ids]
        frames = {
            "driver": pd.DataFrame({
                "driver_id": ids, "event_timestamp": at, "conv_rate": ids / n, "trips": ids * 10,
                "name": [f"driver-{i}" for i in ids], "active": ids % 2 == 0,
                # Feast 0.67's remote client cannot send bytes.
                "raw": [None] * n, "emb": [[(i % 100) / 100, 0.5] for i in ids],
                "ids": [[i, i + 1] for i in ids], "rank": (ids % 1000).astype("int32"),
                "score": (ids / 8).astype("float32"), "seen": at}),
            "customer": pd.DataFrame({
                "customer_id": customers, "event_timestamp": at,
                "tier": [("gold", "silver", "bronze")[i % 3] for i in ids], "spend": ids * 0.25}),
            "pair": pd.DataFrame({
                "driver_id": ids, "customer_id": customers, "event_timestamp": at, "orders": ids % 50}),
        }
        for name, df in frames.items():
            df.to_parquet(f"{repo}/data/{name}.parquet")
        return {"ok": True}
    if command == "read":
        features = store.get_feature_service(arg["service"]) if arg.get("service") else arg["features"]
        response = store.get_online_features(
            features=features, entity_rows=arg["entities"], full_feature_names=arg.get("full", False))
        names = list(response.proto.metadata.feature_names.val)
        statuses = {
            name: [FieldStatus.Name(s) for s in result.statuses]
            for name, result in zip(names, response.proto.results)
        }
        return {"dict": plain(response.to_dict()), "statuses": statuses}
    if command == "write":
        store.write_to_online_store(feature_view_name=arg["view"], df=frame(arg["rows"]))
        return {"ok": True}
    if command == "push":
        store.push(arg["source"], frame(arg["rows"]))
        return {"ok": True}
    if command == "materialize":
        # Feast 0.67's store.materialize() hands a remote online store's
        # materialization to the server's /materialize, which needs the
        # offline store; this runs Feast's own engine here instead, writing
        # each batch through the remote store (POST /write-to-online-store).
        start, end = datetime.fromisoformat(arg["start"]), datetime.fromisoformat(arg["end"])
        began = time.perf_counter()
        provider = store._get_provider()
        for view in store.list_feature_views():
            provider.materialize_single_feature_view(
                config=store.config, feature_view=view, start_date=start, end_date=end,
                registry=store.registry, project=store.project, tqdm_builder=lambda n: _Quiet())
        return {"ok": True, "seconds": time.perf_counter() - began}
    if command == "feast_materialize":
        store.materialize(start_date=datetime.fromisoformat(arg["start"]),
                          end_date=datetime.fromisoformat(arg["end"]))
        return {"ok": True}
    if command == "post":
        import requests
        body = arg["body"] if isinstance(arg["body"], str) else json.dumps(arg["body"])
        response = requests.post(store.config.online_store.path + arg["path"], data=body,
                                 headers=arg.get("headers", {}))
        try:
            answer = response.json()
        except ValueError:
            answer = response.text
        return {"status": response.status_code, "body": answer}
    if command == "grpc":
        # Feast's generated stubs (in the feast package), each call's request
        # written as JSON; the answers as JSON, errors as their status code.
        import grpc
        from google.protobuf import json_format
        from feast.protos.feast.serving import GrpcServer_pb2, GrpcServer_pb2_grpc
        from feast.protos.feast.serving import ServingService_pb2, ServingService_pb2_grpc
        channel = grpc.insecure_channel(arg["addr"])
        stubs = {
            "ServingService": (ServingService_pb2_grpc.ServingServiceStub(channel), ServingService_pb2),
            "GrpcFeatureServer": (GrpcServer_pb2_grpc.GrpcFeatureServerStub(channel), GrpcServer_pb2),
        }
        answers = []
        for call in arg["calls"]:
            stub, messages = stubs[call["service"]]
            method = getattr(stub, call["method"])
            request_type = {
                "GetFeastServingInfo": ServingService_pb2.GetFeastServingInfoRequest,
                "GetOnlineFeatures": ServingService_pb2.GetOnlineFeaturesRequest,
                "Push": GrpcServer_pb2.PushRequest,
                "WriteToOnlineStore": GrpcServer_pb2.WriteToOnlineStoreRequest,
            }[call["method"]]
            request = json_format.ParseDict(call["request"], request_type())
            try:
                answer = method(request, timeout=10)
                answers.append({"ok": json_format.MessageToDict(answer, preserving_proto_field_name=True)})
            except grpc.RpcError as e:
                answers.append({"code": e.code().name, "details": e.details()})
        return answers
    raise SystemExit(f"unknown command {command}")


def main():
    repo, steps = sys.argv[1], json.loads(sys.argv[2])
    store = FeatureStore(repo_path=repo)
    results = []
    for arg in steps:
        try:
            results.append(step(store, repo, arg))
        except Exception as e:  # the SDK's own exception is what the test checks
            results.append({"error": type(e).__name__, "message": str(e)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
