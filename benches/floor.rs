//! The gRPC floor: a FeatureStore server that does no work at all, answering
//! GetFeatures with a canned response captured from the real server for the
//! same number of keys (so the same bytes go over the wire). What Strata's
//! L1-hit path costs above this is Strata's own cost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use strata_proto::v1::feature_store_server::{FeatureStore, FeatureStoreServer};
use strata_proto::v1::{self};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

struct Floor {
    /// Canned answers by number of keys asked for.
    canned: Arc<HashMap<usize, v1::GetFeaturesResponse>>,
    /// The canned GetFeatureVectors answer, if any.
    vectors: Option<Arc<v1::GetFeatureVectorsResponse>>,
}

#[tonic::async_trait]
impl FeatureStore for Floor {
    async fn get_features(
        &self,
        request: Request<v1::GetFeaturesRequest>,
    ) -> Result<Response<v1::GetFeaturesResponse>, Status> {
        let n = request.get_ref().entity_keys.len();
        self.canned
            .get(&n)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::invalid_argument(format!("no canned answer for {n} keys")))
    }

    async fn write_features(
        &self,
        _: Request<v1::WriteFeaturesRequest>,
    ) -> Result<Response<v1::WriteFeaturesResponse>, Status> {
        Err(Status::unimplemented("the floor only answers GetFeatures"))
    }

    async fn delete_features(
        &self,
        _: Request<v1::DeleteFeaturesRequest>,
    ) -> Result<Response<v1::WriteFeaturesResponse>, Status> {
        Err(Status::unimplemented("the floor only answers GetFeatures"))
    }

    async fn list_feature_views(
        &self,
        _: Request<v1::ListFeatureViewsRequest>,
    ) -> Result<Response<v1::ListFeatureViewsResponse>, Status> {
        Err(Status::unimplemented("the floor only answers GetFeatures"))
    }

    async fn get_feature_vectors(
        &self,
        _: Request<v1::GetFeatureVectorsRequest>,
    ) -> Result<Response<v1::GetFeatureVectorsResponse>, Status> {
        let canned = self.vectors.as_ref().ok_or_else(|| Status::unimplemented("no canned vectors"))?;
        Ok(Response::new(canned.as_ref().clone()))
    }
}

/// Starts the floor server on a free local port (TCP_NODELAY, like
/// Strata's) and returns its address; it runs until the process ends.
pub async fn start(canned: HashMap<usize, v1::GetFeaturesResponse>) -> Result<SocketAddr> {
    let incoming =
        TcpIncoming::bind("127.0.0.1:0".parse()?).context("cannot bind the floor server")?.with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let service = FeatureStoreServer::new(Floor { canned: Arc::new(canned), vectors: None });
    tokio::spawn(Server::builder().add_service(service).serve_with_incoming(incoming));
    Ok(addr)
}

/// A floor that answers every GetFeatureVectors call with `canned`.
pub async fn start_vectors(canned: v1::GetFeatureVectorsResponse) -> Result<SocketAddr> {
    let incoming =
        TcpIncoming::bind("127.0.0.1:0".parse()?).context("cannot bind the floor server")?.with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let floor = Floor { canned: Arc::new(HashMap::new()), vectors: Some(Arc::new(canned)) };
    let service =
        FeatureStoreServer::new(floor).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    tokio::spawn(Server::builder().add_service(service).serve_with_incoming(incoming));
    Ok(addr)
}
