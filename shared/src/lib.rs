//! tunnel-lib: the protocol, its frame rules, the rules engine and the
//! configuration shared by `tunnel-server`, `tunnel-client` and `tunnel-tui`.

#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
pub mod frame;
pub mod head;
pub mod policy;
pub mod rules;
pub mod tls;
pub mod traffic;
pub mod units;

/// Code generated from `proto/`, nested as the proto packages are, so that
/// cross-package references resolve.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod tunnel {
        pub mod v1 {
            tonic::include_proto!("tunnel.v1");
        }
        pub mod introspection {
            pub mod v1 {
                tonic::include_proto!("tunnel.introspection.v1");
            }
        }
        pub mod cluster {
            pub mod v1 {
                tonic::include_proto!("tunnel.cluster.v1");
            }
        }
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// The subset of etcd's v3 API that servers use (`proto/etcd.proto`).
pub use pb::etcdserverpb as etcd;
/// What servers of a cluster store in etcd (`proto/cluster.proto`).
pub use pb::tunnel::cluster::v1 as cluster;
/// The server's introspection service (`proto/introspection.proto`).
pub use pb::tunnel::introspection::v1 as introspection;
/// The tunnel protocol (`proto/tunnel.proto`).
pub use pb::tunnel::v1 as proto;

/// The encoded descriptors of both protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tunnel_descriptor.bin"));

/// Software version sent in every registration.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// gRPC metadata key carrying the client's group name.
pub const GROUP_METADATA: &str = "x-tunnel-group";
/// gRPC metadata key carrying the client's session id.
pub const SESSION_METADATA: &str = "x-tunnel-session";
