//! Strata's gRPC API: the code generated from `proto/strata/v1`, the encoded
//! descriptor set that server reflection serves, and the conversions between
//! wire messages and the domain types of `strata-core`.
//!
//! Bad input is turned into [`InvalidRequest`] here, once, so the service
//! works only with validated requests; it never reaches a tier.

#![forbid(unsafe_code)]

mod convert;
mod vectors;

pub use prost_types;

pub use convert::{
    FeatureDelete, FeatureRead, FeatureWrite, InvalidRequest, Limits, check_not_future, delete_request, echo,
    entity_to_wire, event_time_to_wire, read_request, service_to_wire, value_from_wire, value_to_wire, view_to_wire,
    write_request,
};
pub use vectors::{MAX_FEATURES_PER_REQUEST, VectorsRead, ViewRead, vectors_request};

/// Generated messages, client and server of `strata.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
    tonic::include_proto!("strata.v1");

    /// The encoded `FileDescriptorSet` of the API (and of Feast's APIs), for
    /// server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strata_descriptor");
}

/// Feast's gRPC APIs, generated from `proto/feast` (written from the
/// descriptors of the feast package, so the wire is Feast's):
/// `feast.serving.ServingService`, and `GrpcFeatureServer` with its
/// messages, which have no proto package and so sit at this module's top.
pub mod feast {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
    /// Feast's packages, where the package-less file's paths lead.
    pub mod feast {
        pub mod types {
            tonic::include_proto!("feast.types");
        }
        pub mod serving {
            tonic::include_proto!("feast.serving");
        }
        /// The part of Feast's registry that `strata feast import` reads.
        pub mod core {
            tonic::include_proto!("feast.core");
        }
    }
    pub use self::feast::{core, serving, types};
    tonic::include_proto!("_");
}
