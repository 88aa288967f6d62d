//! Where results go. `grpc`: the hub every `Subscribe` stream reads from, and the server.
pub mod grpc;
