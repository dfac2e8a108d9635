//! The control plane's integration tests, in one binary so the suite links once. Each module
//! starts the real `gateway` binary (`support`) and talks to it over loopback.

#[macro_use]
mod support;

mod access_log;
mod admin;
mod aggregate;
mod cli;
mod cluster;
mod conformance;
mod curl;
mod dashboard;
mod etcd;
mod grpc;
mod http2;
mod policies;
mod proxy;
mod schemathesis;
mod tls;
mod upgrade;
mod upstream_tls;
mod upstreams;
