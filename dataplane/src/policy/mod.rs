//! Traffic policies (in progress): the pieces the request path will call once policies are
//! configurable. Only the rate limiter's core exists so far; it is not wired to any route yet.

pub mod ratelimit;
