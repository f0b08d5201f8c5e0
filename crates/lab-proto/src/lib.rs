//! The lab's gRPC contracts, generated at build time from `proto/`.
//!
//! Package `lab.<lab>.v1` becomes module `lab_proto::<lab>::v1`.

/// `lab.catalog.v1`: the product catalog.
pub mod catalog {
    pub mod v1 {
        tonic::include_proto!("lab.catalog.v1");
    }
}

/// Every compiled file as one encoded `FileDescriptorSet`, for gRPC server
/// reflection (`grpcurl -plaintext localhost:50051 list`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lab_descriptor");
