//! # vivian-storage
//!
//! Backends of `vivian_core::storage` for Vivian's job buckets:
//!
//! * [`s3::S3Store`]: S3 data operations through `aws-sdk-s3`;
//! * [`minio::MinioAdmin`]: identities through the MinIO admin API
//!   (`/minio/admin/v3`, SigV4, [`sio`] body encryption);
//! * [`iam::IamAdmin`]: identities through the AWS IAM Query API (AWS,
//!   SeaweedFS, moto);
//! * [`http::SignedClient`]: SigV4-signed raw requests ([`sigv4`]), also
//!   from a chosen source address (what a DUT does);
//! * [`testing`]: real peers for tests (SeaweedFS from PyPI).

#![warn(missing_docs)]

pub mod fake_minio;
pub mod http;
pub mod iam;
pub mod minio;
pub mod s3;
pub mod sigv4;
pub mod sio;
pub mod testing;

pub use http::SignedClient;
pub use iam::IamAdmin;
pub use minio::MinioAdmin;
pub use s3::S3Store;
