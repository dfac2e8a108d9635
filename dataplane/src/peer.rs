//! Who is at the other end of a client connection ([`Peer`]): a leaf module, shared by the
//! worker that accepts, the park lot that holds idle connections, and the request path.

use std::net::IpAddr;

/// Who is at the other end of a client connection, and which listener it came in on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub ip: IpAddr,
    /// Index into the snapshot's listeners (for listener policies).
    pub listener: u16,
}
