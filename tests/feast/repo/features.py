# The Feast repo of tests/feast.rs: an int64 and a string entity, a view
# keyed by both, a push source, a feature service, and a feature of every
# type Strata stores. Strata's test config
# (tests/support/lib.rs, TEST_VIEWS) declares the same views.
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Bool, Bytes, Float32, Float64, Int32, Int64, String, UnixTimestamp
from feast.value_type import ValueType

driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)

driver_source = FileSource(name="fe_driver_source", path="data/driver.parquet", timestamp_field="event_timestamp")
driver_push = PushSource(name="fe_driver_push", batch_source=driver_source)

fe_driver = FeatureView(
    name="fe_driver",
    entities=[driver],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="conv_rate", dtype=Float64),
        Field(name="trips", dtype=Int64),
        Field(name="name", dtype=String),
        Field(name="active", dtype=Bool),
        Field(name="raw", dtype=Bytes),
        Field(name="emb", dtype=Array(Float32)),
        Field(name="ids", dtype=Array(Int64)),
        Field(name="rank", dtype=Int32),
        Field(name="score", dtype=Float32),
        Field(name="seen", dtype=UnixTimestamp),
    ],
    source=driver_push,
    online=True,
)

customer_source = FileSource(name="fe_customer_source", path="data/customer.parquet", timestamp_field="event_timestamp")
fe_customer = FeatureView(
    name="fe_customer",
    entities=[customer],
    ttl=timedelta(days=3650),
    schema=[Field(name="tier", dtype=String), Field(name="spend", dtype=Float64)],
    source=customer_source,
    online=True,
)

pair_source = FileSource(name="fe_pair_source", path="data/pair.parquet", timestamp_field="event_timestamp")
fe_pair = FeatureView(
    name="fe_pair",
    entities=[driver, customer],
    ttl=timedelta(days=3650),
    schema=[Field(name="orders", dtype=Int64)],
    source=pair_source,
    online=True,
)

fe_ranker = FeatureService(
    name="fe_ranker",
    features=[fe_driver[["conv_rate", "trips"]], fe_pair[["orders"]], fe_customer[["tier"]]],
)
